"""Settings of the train stage (docs/design.md §7)."""

from __future__ import annotations

import dataclasses
from typing import Any

from layercard.config.schema import Schema, setting

SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
INITS = ("default", "eva")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Schema):
    """Training hyper-parameters. Exactly one of ``steps`` / ``epochs`` (``steps=None`` with epochs).

    ``eval_every=0`` evaluates only at the end, ``checkpoint_every=0`` writes no checkpoints,
    ``eval_examples=0`` skips validation. ``keep_best`` keeps the weights of the validation with the lowest
    loss as the adapter; ``early_stopping=N`` stops once N validations in a row find none lower (by more
    than ``early_stopping_min_delta``), and keeps those weights too. ``bottleneck=None`` takes the plan's
    (else 16). ``dtype`` is the compute precision (Accelerate mixed precision for bfloat16/float16); the
    weights keep their dtype.
    ``init=eva`` (LoRA only) sets each LoRA A from the SVD of its module's inputs on the first training
    batches and moves rank between modules, keeping the planned total; ``eva_rho`` caps the growth.
    """

    SECTION = "train"

    steps: int | None = setting(
        100, optional=True, kind="int", minimum=1, help="optimizer steps (null with epochs)"
    )
    epochs: float | None = setting(None, kind="pos_float", help="or: passes over the training data")
    batch_size: int = setting(8, kind="int", minimum=1, help="examples per micro-batch")
    grad_accum: int = setting(1, kind="int", minimum=1, help="micro-batches per optimizer step")
    lr: float = setting(1e-3, kind="pos_float", help="AdamW learning rate")
    weight_decay: float = setting(0.0, kind="nonneg_float", help="AdamW weight decay")
    max_grad_norm: float | None = setting(
        None,
        kind="pos_float",
        help="clip the trainable parameters' gradient to this global norm before each update; null: no "
        "clipping",
    )
    warmup_steps: int = setting(0, kind="int", minimum=0, help="linear warm-up steps")
    scheduler: str = setting("constant", kind="choice", choices=SCHEDULERS, help="learning-rate schedule")
    max_length: int = setting(128, kind="int", minimum=2, help="max tokens per training example")
    group_by_length: bool = setting(
        False,
        kind="bool",
        help="form each micro-batch from examples of near length (sorted within windows of 50 "
        "micro-batches, whose order is then shuffled): less padding, so fewer positions per step; the same "
        "examples per epoch",
    )
    train_examples: int | None = setting(
        None, kind="int", minimum=1, help="seeded subset of the training task; null: all"
    )
    eval_examples: int = setting(64, kind="int", minimum=0, help="validation examples; 0: no validation")
    eval_every: int = setting(25, kind="int", minimum=0, help="validate every N steps; 0: at the end only")
    checkpoint_every: int = setting(
        50,
        kind="int",
        minimum=0,
        help="checkpoint every N steps (the last two kept; once finished, the newest); 0: never",
    )
    keep_best: bool = setting(
        False,
        kind="bool",
        help="adapter/ holds the weights of the validation with the lowest loss, not the last step's",
    )
    early_stopping: int = setting(
        0,
        kind="int",
        minimum=0,
        help="stop once N validations in a row find no lower loss than the best, and keep the best "
        "weights; 0: train every step",
    )
    early_stopping_min_delta: float = setting(
        0.0,
        kind="nonneg_float",
        help="early stopping counts a validation as lower only when its loss is more than this below the "
        "last one it counted so (nats per token); the adapter still holds the lowest loss's weights",
    )
    log_every: int = setting(
        1, kind="int", minimum=1, help="keep every N-th step in the loss curve (and the first and last)"
    )
    seed: int = setting(0, kind="seed", yaml=False, help="seed of init, dropout and data order")
    bottleneck: int | None = setting(
        None, kind="int", minimum=1, help="houlsby/parallel width; null: the plan's (else 16)"
    )
    load_in_4bit: bool = setting(False, kind="bool", help="4-bit base weights (QLoRA; CUDA + bitsandbytes)")
    gradient_checkpointing: bool = setting(
        False,
        kind="bool",
        help="recompute each decoder layer's activations in backward (activation checkpointing): a lower "
        "peak, slower steps; priced where the card's calibration used it (card.calibrate_checkpointing)",
    )
    dtype: str = setting(
        "float32",
        kind="choice",
        choices=DTYPES,
        help="compute precision; the 16-bit ones run under Accelerate's mixed precision, the weights keep "
        "their own dtype",
    )
    init: str = setting(
        "default",
        kind="choice",
        choices=INITS,
        help="LoRA init; eva: A from the SVD of module inputs, ranks moved between modules",
    )
    eva_rho: float = setting(
        2.0,
        kind="pos_float",
        help="the most a module's rank may grow, as a multiple of its planned rank, or of the largest "
        "planned rank among the modules reading its input (q,k,v; gate,up) (init: eva; >= 1)",
    )

    @property
    def keeps_best(self) -> bool:
        """Whether the adapter is the weights of the lowest validation loss (``keep_best`` or early
        stopping), not the last step's."""
        return self.keep_best or self.early_stopping > 0

    @property
    def best_setting(self) -> str:
        """The setting that asks for the best weights, as errors name it: ``keep_best`` where it is on,
        else ``early_stopping``."""
        return "keep_best" if self.keep_best else "early_stopping"

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise self.fail(
                "steps",
                f"give exactly one of steps and epochs (got steps={self.steps!r}, epochs={self.epochs!r}); "
                "set steps to null to train by epochs",
            )
        for name, on in (("keep_best", self.keep_best), ("early_stopping", self.early_stopping > 0)):
            if on and not (self.eval_examples and self.eval_every):
                off = "eval_examples is 0" if not self.eval_examples else "eval_every is 0 (the end only)"
                raise self.fail(
                    name,
                    f"chooses among validations, and {off}; validate every N steps, or leave it off",
                )
        if self.early_stopping_min_delta and not self.early_stopping:
            raise self.fail(
                "early_stopping_min_delta",
                f"is {self.early_stopping_min_delta!r}, and early_stopping is 0 (off); set early_stopping "
                "to N validations, or leave it 0",
            )
        if self.eva_rho < 1:
            raise self.fail("eva_rho", f"must be a number >= 1, got {self.eva_rho!r}")

    @classmethod
    def prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        if values.get("epochs") is not None and "steps" not in values:
            values["steps"] = None  # epochs given alone replaces the default step count
        return values
