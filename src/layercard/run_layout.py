"""The layout of a run folder and its file names (docs/design.md §1), shared by the pipeline and the report.

A low module (pathlib only): the pipeline writes this layout, the report reads it, and neither imports
the other for it::

    RUN_DIR/run.json                      the resolved config
    RUN_DIR/summary.json                  what the last invocation did
    RUN_DIR/report.stage.json             the report stage's record
    RUN_DIR/card/                         card.json (+ stage.json, as in every stage folder)
    RUN_DIR/plan/<placement>/plan.json
    RUN_DIR/train/<placement>/            adapter/, train_metrics.json
    RUN_DIR/trim/                         trace.json, trim.json, adapter-trimmed/
    RUN_DIR/eval/{base,<placement>,trimmed}/eval.json
    RUN_DIR/report.html, report.md, figures/

The file names inside a stage folder are those the stage itself writes (``layercard.train``,
``layercard.trim``, ``layercard.evaluate``); the pipeline's tests check that the two agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from layercard.config.run import RESERVED_NAMES

__all__ = [
    "ADAPTER_DIR",
    "BASE_EVAL",
    "EVAL_FILE",
    "FIGURES_DIR",
    "HTML_FILE",
    "MD_FILE",
    "PLAN_FILE",
    "REPORT_STAGE_FILE",
    "RESERVED_NAMES",
    "RUN_FILE",
    "STAGE_FILE",
    "SUMMARY_FILE",
    "TRACE_FILE",
    "TRAIN_METRICS_FILE",
    "TRIMMED_ADAPTER_DIR",
    "TRIMMED_EVAL",
    "TRIM_FILE",
    "RunLayout",
]

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
SUMMARY_FILE = "summary.json"
REPORT_STAGE_FILE = "report.stage.json"
CARD_DIR = "card"
CARD_FILE = "card.json"
PLAN_DIR = "plan"
PLAN_FILE = "plan.json"
TRAIN_DIR = "train"
ADAPTER_DIR = "adapter"
TRAIN_METRICS_FILE = "train_metrics.json"
TRIM_DIR = "trim"
TRIM_FILE = "trim.json"
TRACE_FILE = "trace.json"
TRIMMED_ADAPTER_DIR = "adapter-trimmed"
EVAL_DIR = "eval"
EVAL_FILE = "eval.json"
HTML_FILE = "report.html"
MD_FILE = "report.md"
FIGURES_DIR = "figures"
# Evaluations of the base model and of the trimmed adapter sit beside the placements' own, so no
# placement may take these names.
BASE_EVAL, TRIMMED_EVAL = RESERVED_NAMES


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where each artifact of the run in ``root`` lives."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / RUN_FILE

    @property
    def summary_json(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def report_record(self) -> Path:
        return self.root / REPORT_STAGE_FILE

    @property
    def report_html(self) -> Path:
        return self.root / HTML_FILE

    @property
    def report_md(self) -> Path:
        return self.root / MD_FILE

    @property
    def card_dir(self) -> Path:
        return self.root / CARD_DIR

    @property
    def card_json(self) -> Path:
        return self.card_dir / CARD_FILE

    @property
    def plans_dir(self) -> Path:
        """The folder holding one plan folder per placement."""
        return self.root / PLAN_DIR

    def plan_dir(self, name: str) -> Path:
        return self.plans_dir / name

    def plan_json(self, name: str) -> Path:
        return self.plan_dir(name) / PLAN_FILE

    def train_dir(self, name: str) -> Path:
        return self.root / TRAIN_DIR / name

    def adapter_dir(self, name: str) -> Path:
        return self.train_dir(name) / ADAPTER_DIR

    def train_metrics(self, name: str) -> Path:
        return self.train_dir(name) / TRAIN_METRICS_FILE

    @property
    def trim_dir(self) -> Path:
        return self.root / TRIM_DIR

    @property
    def trim_json(self) -> Path:
        return self.trim_dir / TRIM_FILE

    @property
    def trace_json(self) -> Path:
        return self.trim_dir / TRACE_FILE

    @property
    def trimmed_adapter(self) -> Path:
        return self.trim_dir / TRIMMED_ADAPTER_DIR

    def eval_dir(self, name: str) -> Path:
        return self.root / EVAL_DIR / name

    def eval_json(self, name: str) -> Path:
        return self.eval_dir(name) / EVAL_FILE

    @staticmethod
    def stage_record(folder: Path) -> Path:
        """The record (``stage.json``) of the stage that owns ``folder``."""
        return folder / STAGE_FILE
