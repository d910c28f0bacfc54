"""The run report: one self-contained HTML file (figures inline as base64 PNG) plus ``report.md``.

Built from a run folder's artifacts only (the layout of :mod:`layercard.run_layout`): card.json,
plan.json, train_metrics.json, trace.json / trim.json and eval.json, each read through its typed loader
(:mod:`.results`). Nothing is recomputed on the model, so a report can be rebuilt anywhere the folder is
copied. A missing stage (no coupling, trimming off, no base evaluation) leaves its section with a line
saying so instead of failing.

Sections (:mod:`.build`): headline comparison, Layer Card (heat map, profiles), coupling matrix, plans,
training curves, boundary trace and sweep, predicted vs measured gain, quality against cost, evaluation,
provenance. Figures are in :mod:`.figures`, tables in :mod:`.tables`.
"""

from __future__ import annotations

from layercard.report.build import build_report
from layercard.report.results import (
    collect_results,
    measured_step_text,
    memory_figure_note,
    placement_names,
    planning_share,
    predicted_forward_s,
    predicted_peak_mib,
    predicted_s_per_step,
    read_train_metrics,
    report_inputs,
)
from layercard.report.tables import fmt, seconds_text
from layercard.run_layout import FIGURES_DIR, HTML_FILE, MD_FILE

__all__ = [
    "FIGURES_DIR",
    "HTML_FILE",
    "MD_FILE",
    "REPORT_VERSION",
    "build_report",
    "collect_results",
    "fmt",
    "seconds_text",
    "measured_step_text",
    "memory_figure_note",
    "placement_names",
    "planning_share",
    "predicted_forward_s",
    "predicted_peak_mib",
    "predicted_s_per_step",
    "read_train_metrics",
    "report_inputs",
]

# Part of the report stage's fingerprint: bump when the report's content changes.
REPORT_VERSION = 5
