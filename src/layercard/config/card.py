"""Settings of the card stage (docs/design.md §3)."""

from __future__ import annotations

import dataclasses

from layercard.config.schema import Schema, setting

COUPLING_DIRECTIONS = ("first_step", "capacity")
# `sketch: auto` on a model wider than AUTO_EXACT_WIDTH projects every input to AUTO_SKETCH_MAX. The
# statistics eigen-decompose one K × K covariance per input, a cost cubic in K that the probe pass does not
# share: on a 2048-wide model a 2048 sketch took 10.6× a training step and a 512 sketch 3.3×. On smollm2
# (576 wide) a 512 sketch saved no statistics time and its projections made the pass slower (card 1.39×
# against 1.20× a plain forward+backward), so narrower models keep K = hidden size. The threshold lies
# between those two measured widths (docs/card.md, "Memory").
AUTO_EXACT_WIDTH = 1024
AUTO_SKETCH_MAX = 512
# Largest lr·lora_alpha/lora_rank the card accepts. The first-step rate's quadratic term squares it, and a
# float64 square overflows past ~1.3e154; no learning rate or alpha a run could use comes near the bound.
MAX_FIRST_STEP = 1e150
# Predicted-gain scores kept side by side (docs/design.md §3). Each is per unit; per-layer values
# aggregate the units of the chosen roles (sums, or a root-sum-square for the gradient norms).
SCORES: dict[str, str] = {
    "capacity": "½·N_t·resnorm² at damping δ: the local quadratic model's optimal decrease of the mean loss",
    "capacity_energy": "resnorm² × activation energy tr(Σ)/d_in",
    "gradnorm": "‖∇W‖_F, the raw gradient norm (the 'gradnorm' baseline)",
    "gradnorm_energy": "‖∇W‖_F × √(tr(Σ)/d_in)",
    "rate": "loss decrease of the first Adam step of a LoRA module at the unit (B=0, seeded A), "
    "first-order term minus the quadratic term of the local model",
    "rate_linear": "first-order term of the rate alone: lr·s·‖∇W Aᵀ‖₁",
    "saturating": "C·(1 − exp(−ρ·T/C)) with capacity C, rate ρ and horizon T steps",
}


@dataclasses.dataclass(frozen=True)
class CardConfig(Schema):
    """What the Layer Card measures and how."""

    SECTION = "card"

    roles: str = setting(
        "all-linear",
        kind="roles",
        help="roles to measure: all-linear | q,v | attention | mlp | any comma list",
    )
    examples: int = setting(64, kind="int", minimum=1, help="probe examples from the task")
    max_length: int = setting(128, kind="int", minimum=8, help="max tokens per probe example")
    batch_size: int = setting(8, kind="int", minimum=1, help="micro-batch size of the probe pass")
    delta: float = setting(1e-3, kind="pos_float", help="damping δ: λ = δ·tr(Σ)/d_in")
    lora_rank: int = setting(
        8, kind="int", minimum=1, help="LoRA rank assumed by the first-step rate and the parameter counts"
    )
    lora_alpha: float = setting(16.0, kind="pos_float", help="LoRA alpha assumed by the first-step rate")
    lr: float = setting(1e-3, kind="pos_float", help="learning rate assumed by the first-step rate")
    a_draws: int = setting(4, kind="int", minimum=1, help="LoRA A draws averaged by the first-step rate")
    seed: int = setting(
        0,
        kind="seed",
        yaml=False,
        help="seed of the probe subset and draws (and of a synthetic task's generation)",
    )
    sketch: int | str | None = setting(
        "auto",
        kind="sketch",
        optional=True,
        help="project inputs wider than K to K dims (their resnorm, captured: lower bounds); "
        f"auto: K = hidden size, or {AUTO_SKETCH_MAX} above {AUTO_EXACT_WIDTH}; off: exact",
    )
    layer_groups: int = setting(
        1, kind="int", minimum=1, help="split the layers into G probe passes to bound memory"
    )
    coupling: bool = setting(
        False, kind="bool", help="measure the layer coupling matrix (the `card` policy's set gain uses it)"
    )
    coupling_examples: int = setting(8, kind="int", minimum=1, help="examples for the coupling probe")
    coupling_direction: str = setting(
        "first_step", kind="choice", choices=COUPLING_DIRECTIONS, help="direction of each layer's correction"
    )
    calibrate: bool = setting(
        True, kind="bool", help="time short LoRA runs: the cost model behind predicted s/step"
    )
    calibrate_steps: int = setting(
        2, kind="int", minimum=1, help="timed steps per placement and round, after an untimed warm-up step"
    )
    calibrate_rounds: int = setting(
        1,
        kind="int",
        minimum=1,
        help="interleaved rounds over the calibration placements (time: the fastest step of all rounds; "
        "memory: the median start plus the median each round added)",
    )
    calibrate_dropout: float = setting(
        0.0,
        kind="unit",
        help="LoRA dropout the calibration placements train with: the plans' dropout, whose costs it prices "
        "(dropout keeps a copy of each adapted module's input and adds time)",
    )
    calibrate_checkpointing: bool = setting(
        False,
        kind="bool",
        help="the calibration placements train with activation (gradient) checkpointing, as runs with "
        "train.gradient_checkpointing do, whose slower steps and lower peaks it then prices",
    )
    weight_snr: bool = setting(
        False,
        kind="bool",
        help="measure each frozen weight's SNR (read only by the `spectrum` policy; a run with a "
        "`spectrum` placement turns it on)",
    )
    horizon_steps: int = setting(100, kind="int", minimum=1, help="T of the saturating score")

    @property
    def needs_exact_covariance(self) -> bool:
        """The coupling probe's ``capacity`` direction whitens with the exact covariances."""
        return self.coupling and self.coupling_direction == "capacity"

    def validate(self) -> None:
        if self.needs_exact_covariance and self.sketch not in (None, "auto"):
            raise self.fail("coupling_direction", "'capacity' needs an exact covariance (sketch: off)")
        step = self.lr * self.lora_alpha / self.lora_rank
        if not step <= MAX_FIRST_STEP:
            # Name the setting that is out of range (an lr above alpha is one).
            field = "lr" if self.lr >= self.lora_alpha else "lora_alpha"
            raise self.fail(
                field,
                f"lr·lora_alpha/lora_rank = {step:.3g} (lr {self.lr:g}, lora_alpha {self.lora_alpha:g}, "
                f"lora_rank {self.lora_rank}) must be at most {MAX_FIRST_STEP:g}: the first-step rate "
                "squares it",
            )

    def sketch_size(self, hidden_size: int) -> int | None:
        """The sketch size K this config asks of a model of ``hidden_size``, or None for exact covariances.

        ``auto`` is the residual stream's width up to :data:`AUTO_EXACT_WIDTH`, so that only the inputs
        wider than it (the MLP down-projection's) are projected, and :data:`AUTO_SKETCH_MAX` on a wider
        model, where every input is projected; with :attr:`needs_exact_covariance` it is exact.
        """
        if self.sketch == "auto":
            if self.needs_exact_covariance:
                return None
            return hidden_size if hidden_size <= AUTO_EXACT_WIDTH else AUTO_SKETCH_MAX
        return self.sketch  # type: ignore[return-value]
