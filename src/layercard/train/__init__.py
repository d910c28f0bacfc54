"""Training a planned placement: LoRA through PEFT, or bottleneck adapters (houlsby/parallel).

See docs/design.md §7.

A plain PyTorch loop under :class:`accelerate.Accelerator` (device placement, multi-GPU, optional mixed
precision). The loss of an optimizer step is the mean cross-entropy over the target tokens of all its
micro-batches (prompt tokens carry the ignore index), exactly what the card measured.

Data order is a function of the seed alone: epoch ``e`` is the ``e``-th permutation drawn from one
generator seeded with ``seed``, and a step consumes the next ``grad_accum`` micro-batches of the cycled
stream. A checkpoint therefore needs only the number of micro-batches consumed, the trainable weights,
the optimizer and scheduler state and the RNG states (dropout) for a resumed run to reproduce the
uninterrupted loss curve.

Run folder::

    out_dir/checkpoints/step-N/   trainable.safetensors, trainer_state.pt, state.json (last 2 kept)
    out_dir/adapter/              PEFT folder (lora) or layercard folder (houlsby/parallel)
    out_dir/train_metrics.json

``adapter/`` and ``train_metrics.json`` are written atomically at the end; an interrupted run leaves
only checkpoints, which ``resume=True`` continues from.

Modules: ``config`` (TrainConfig), ``data`` (stream and lr schedule), ``checkpoints``, ``model``
(adapting and restoring the base), ``eva`` (EVA initialisation of LoRA), ``metrics`` (TrainMetrics and
measurements), ``loop`` (train), ``importance`` (LoRA-drop: each layer's share of a trained adapter's
output, and layer selection by it).
"""

from layercard.train.checkpoints import CHECKPOINT_DIR, latest_checkpoint
from layercard.train.config import SCHEDULERS, VALID_KINDS, TrainConfig
from layercard.train.importance import layer_importance, layers_by_coverage, select_layers
from layercard.train.loop import (
    StepCallback,
    TrainData,
    check_plan_settings,
    estimate,
    is_launch_main,
    launch_world,
    planned_positions,
    planned_steps,
    prepare_data,
    train,
)
from layercard.train.metrics import KIND, METRICS_FILE, TrainMetrics
from layercard.train.model import ADAPTER_DIR

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_DIR",
    "KIND",
    "METRICS_FILE",
    "SCHEDULERS",
    "VALID_KINDS",
    "StepCallback",
    "check_plan_settings",
    "estimate",
    "is_launch_main",
    "launch_world",
    "TrainConfig",
    "TrainData",
    "TrainMetrics",
    "latest_checkpoint",
    "layer_importance",
    "planned_positions",
    "planned_steps",
    "prepare_data",
    "layers_by_coverage",
    "select_layers",
    "train",
]
