"""Settings of the plan stage (docs/design.md §6): the policy, the budget and the adapter."""

from __future__ import annotations

import dataclasses
import math

from layercard.config.schema import Schema, setting
from layercard.errors import LayercardError

POLICIES: tuple[str, ...] = (
    "card",
    "card-additive",
    "card-stratified",
    "all",
    "top",
    "bottom",
    "middle",
    "uniform",
    "random",
    "gradnorm",
)
BUDGET_KINDS: tuple[str, ...] = ("layers", "params", "step_time", "modules")
ADAPTER_KINDS: tuple[str, ...] = ("lora", "houlsby", "parallel")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


@dataclasses.dataclass(frozen=True)
class Budget:
    """A cap on one cost of a placement: ``layers``, ``params``, ``step_time`` (seconds) or ``modules``."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise LayercardError(
                f"budget {self.kind!r}: unknown kind; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise LayercardError(f"budget {self.kind}={v!r}: must be a positive finite number")
        if self.kind in ("layers", "modules") and float(v) != int(v):
            raise LayercardError(f"budget {self.kind}={v!r}: must be a whole number")
        object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``'layers=8'``, ``'params=2.5M'``, ``'step_time=1.5'``, ``'modules=16'``."""
        kind, sep, raw = str(text).partition("=")
        kind, raw = kind.strip().lower().replace("-", "_"), raw.strip().lower()
        if not sep or not kind or not raw:
            raise LayercardError(
                f"budget {text!r}: expected KIND=VALUE, e.g. layers=8; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        if kind not in BUDGET_KINDS:
            raise LayercardError(
                f"budget {text!r}: unknown kind {kind!r}; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        mult = 1.0
        if kind == "params" and raw[-1] in _SUFFIX:
            raw, mult = raw[:-1], _SUFFIX[raw[-1]]
        try:
            value = float(raw) * mult
        except ValueError:
            raise LayercardError(f"budget {text!r}: value {raw!r} is not a number") from None
        return cls(kind, value)

    def __str__(self) -> str:
        v = int(self.value) if self.value == int(self.value) else self.value
        return f"{self.kind}={v}"


def _scores() -> tuple[str, ...]:
    from layercard.card.artifact import SCORES

    return tuple(SCORES)


@dataclasses.dataclass(frozen=True)
class PlanConfig(Schema):
    """What to plan and under which budget.

    ``target`` asks for the cheapest placement (cost in the budget's kind, default params) whose predicted
    gain reaches that fraction of the all-layer gain; a budget given with it also caps the cost. ``alpha``
    defaults to 2·rank per module (so alpha/r = 2 everywhere, also under ``rank='auto'``).
    """

    SECTION = "plan"

    policy: str = setting(kind="choice", choices=POLICIES, help="how layers are chosen")
    budget: Budget | None = setting(
        None,
        kind="budget",
        help="layers=N | params=N (k/M suffix) | step_time=SECONDS | modules=N; null for policy all",
    )
    target: float | None = setting(
        None, kind="fraction", help="or: cheapest placement reaching this fraction of the all-layer gain"
    )
    roles: str | None = setting(None, kind="roles", help="roles to adapt; null: the card's roles")
    rank: int | str = setting(
        8, kind="rank", help="LoRA rank (or bottleneck width), or auto: per-module ranks from captured@r"
    )
    alpha: float | None = setting(None, kind="pos_float", help="LoRA alpha; null: 2·rank per module")
    dropout: float = setting(0.0, kind="unit", help="LoRA dropout")
    score: str | None = setting(
        None, kind="choice", choices=_scores, help="card score used as the gain; null: the card's default"
    )
    seed: int = setting(0, kind="int", minimum=0, yaml=False, help="seed of the random policy")
    kind: str = setting("lora", kind="choice", choices=ADAPTER_KINDS, help="adapter kind")
    bands: int | None = setting(
        None, kind="int", minimum=1, help="card-stratified: number of depth bands (instead of a budget)"
    )

    def validate(self) -> None:
        if self.kind != "lora" and self.rank == "auto":
            raise self.fail(
                "rank",
                f"'auto' allocates LoRA ranks; kind={self.kind!r} needs an integer bottleneck rank",
            )
        if self.bands is not None:
            if self.policy != "card-stratified":
                raise self.fail("bands", f"used only by policy card-stratified, not {self.policy}")
            if self.target is not None:
                raise self.fail("bands", "fixes the number of layers; give bands or target, not both")
        if self.policy != "all" and self.budget is None and self.target is None and self.bands is None:
            raise self.fail(
                "budget", f"policy {self.policy} needs a budget (e.g. layers=8) or a target fraction"
            )
