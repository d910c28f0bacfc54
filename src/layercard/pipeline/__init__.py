"""The whole job in one run folder: card → plan → train → trim → eval → report (docs/design.md §1).

A run is described by one YAML config (:func:`load_config`, in :mod:`.config`), validated in full before
anything runs: every error names the file and the key (``config.yaml: train.steps: must be a positive
integer, got -3``) and unknown keys are errors. :func:`run_pipeline` (:mod:`.run`) then runs the stages
over one loaded model into the layout of :mod:`layercard.run_layout`::

    RUN_DIR/run.json                      the resolved config (every default filled in) and its file
    RUN_DIR/card/                         card.json, card.md, card_*.png
    RUN_DIR/plan/<placement>/plan.json
    RUN_DIR/train/<placement>/            adapter/, train_metrics.json, checkpoints/
    RUN_DIR/trim/                         trace.json, trim.json, adapter-trimmed/, *.png
    RUN_DIR/eval/{base,<placement>,trimmed}/   eval.json, predictions.jsonl
    RUN_DIR/report.html, report.md, figures/
    RUN_DIR/summary.json                  what the last invocation did, with the headline numbers

Resuming (:mod:`.stages`): each stage folder holds ``stage.json`` with the stage's fingerprint, the
sha256 of the stage config and of its input artifacts. A stage whose recorded fingerprint matches and
whose outputs exist is skipped; one whose fingerprint changed is recomputed (and everything downstream of
it); a stage stopped part-way is resumed (training from its last checkpoint).
"""

from __future__ import annotations

from layercard.pipeline.config import (
    PlacementSpec,
    RunConfig,
    TaskSpec,
    TrimSpec,
    apply_overrides,
    demo_config_path,
    load_config,
    parse_config,
)
from layercard.pipeline.run import choose_threads, default_run_dir, run_pipeline
from layercard.pipeline.stages import StageResult
from layercard.run_layout import RUN_FILE, STAGE_FILE, SUMMARY_FILE

__all__ = [
    "RUN_FILE",
    "STAGE_FILE",
    "SUMMARY_FILE",
    "PlacementSpec",
    "RunConfig",
    "StageResult",
    "TaskSpec",
    "TrimSpec",
    "apply_overrides",
    "choose_threads",
    "default_run_dir",
    "demo_config_path",
    "load_config",
    "parse_config",
    "run_pipeline",
]
