"""Settings of the plan stage (docs/design.md §6): the policy, the budget and the adapter."""

from __future__ import annotations

import dataclasses

from layercard.config.budget import Budget
from layercard.config.card import SCORES
from layercard.config.schema import Schema, setting

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
ADAPTER_KINDS: tuple[str, ...] = ("lora", "houlsby", "parallel")


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
        None, kind="choice", choices=tuple(SCORES), help="card score used as the gain; null: the card default"
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
