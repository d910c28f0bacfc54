"""layercard: decide where parameter-efficient adapters go in an LLM, and prove the choice.

The public API (``from layercard import measure_card, make_plan, train_adapter, ...``) is in
:mod:`layercard.api`; its names load on first use, so ``import layercard`` stays light:

- models and tasks: ``load_model``, ``load_task`` (``LoadedModel``, ``Task``);
- the stages: ``measure_card`` → ``Card``; ``make_plan`` → ``Plan`` (``check_plan``);
  ``estimate_training`` and ``train_adapter`` (``load_adapter`` attaches its result); ``trim_adapter``;
  ``evaluate_model`` → ``EvalResult``;
- the whole run: ``load_config``, ``run_pipeline``;
- each stage's settings: ``CardConfig``, ``PlanConfig``, ``TrainConfig``, ``TrimConfig``, ``TraceConfig``,
  ``EvalConfig``; every failure the user can mend raises ``LayercardError`` with one line.
"""

from __future__ import annotations

from typing import Any

from layercard.config import CardConfig, EvalConfig, PlanConfig, TraceConfig, TrainConfig, TrimConfig
from layercard.errors import LayercardError

__version__ = "0.1.0"

_API = (
    "Card", "EvalResult", "LoadedModel", "Plan", "Task", "check_plan", "evaluate_model", "load_adapter",
    "load_config", "load_model", "load_task", "make_plan", "measure_card", "run_pipeline",
    "estimate_training", "train_adapter", "trim_adapter",
)  # fmt: skip
__all__ = [
    "CardConfig",
    "EvalConfig",
    "LayercardError",
    "PlanConfig",
    "TraceConfig",
    "TrainConfig",
    "TrimConfig",
    "__version__",
    *_API,
]


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name in _API:
        from layercard import api

        return getattr(api, name)
    raise AttributeError(f"module 'layercard' has no attribute {name!r}")
