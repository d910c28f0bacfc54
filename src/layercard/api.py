"""The public Python API: each stage as one function over typed artifacts.

>>> from layercard import CardConfig, PlanConfig, load_model, load_task, make_plan, measure_card
>>> loaded = load_model("smollm2")                                    # doctest: +SKIP
>>> card = measure_card(loaded, "e2e_nlg:validation", CardConfig(examples=32))  # doctest: +SKIP
>>> plan = make_plan(card, PlanConfig(budget="params=0.25x"))  # the recommendation  # doctest: +SKIP
>>> lora_config = plan.peft_config()  # a peft.LoraConfig for any training loop  # doctest: +SKIP

``load_adapter`` attaches a trained adapter folder (PEFT's or layercard's) to a loaded base.
``train_adapter``, ``trim_adapter`` and ``evaluate_model`` are the stage functions ``layercard.train.train``,
``layercard.trim.trim`` and ``layercard.evaluate.evaluate`` under names that do not shadow their modules.
The command line is a thin layer over these functions; so are the run pipeline and the benchmarks.
"""

from __future__ import annotations

import os
from typing import Any

from layercard.adapters import load_adapter
from layercard.card import Card, compute_card
from layercard.config import CardConfig
from layercard.errors import LayercardError, expect
from layercard.evaluate import EvalResult
from layercard.evaluate import evaluate as evaluate_model
from layercard.models import LoadedModel, load_model, resolve_device
from layercard.pipeline import load_config, run_pipeline
from layercard.plan import Plan, check_plan, make_plan
from layercard.tasks import Task, load_task
from layercard.train import estimate as estimate_training
from layercard.train import train as train_adapter
from layercard.trim import trim as trim_adapter

__all__ = [
    "Card",
    "EvalResult",
    "LoadedModel",
    "Plan",
    "Task",
    "check_plan",
    "evaluate_model",
    "load_adapter",
    "load_config",
    "load_model",
    "load_task",
    "make_plan",
    "measure_card",
    "run_pipeline",
    "estimate_training",
    "train_adapter",
    "trim_adapter",
]


def measure_card(
    model: LoadedModel | str | os.PathLike[str],
    task: Task | str | os.PathLike[str],
    cfg: CardConfig | None = None,
    *,
    split: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    **load_kwargs: Any,
) -> Card:
    """The Layer Card of ``model`` on ``task`` (a loaded model or a model spec; a Task or a task spec).

    Specs are resolved as the command line resolves them (``load_model``, ``load_task`` with the card's
    seed and ``load_kwargs``: field mapping, prompt settings); ``device`` (default: auto, a GPU where there
    is one) places a model spec, and a loaded model is measured where it is. Nothing is written
    (``layercard.card.write_card_folder`` writes card.json and the figures).
    """
    cfg = cfg or CardConfig()
    expect("measure_card", "cfg", cfg, CardConfig, "such as CardConfig(examples=16)")
    if not isinstance(task, Task):
        task = load_task(task, split=split, seed=cfg.seed, **load_kwargs)
    if isinstance(model, LoadedModel) and device is not None:
        # A loaded model stays where it is; a device here would be dropped without a word.
        raise LayercardError(
            f"measure_card: device={device!r} applies to a model spec; a loaded model is measured where it "
            "is (load_model(..., device=...))"
        )
    if not isinstance(model, LoadedModel):
        where = str(resolve_device(device or "auto"))
        model = load_model(model, dtype=dtype, device=where, trust_remote_code=trust_remote_code)
    return compute_card(model, task, cfg, progress=progress)
