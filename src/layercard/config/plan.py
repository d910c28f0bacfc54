"""Settings of the plan stage (docs/design.md §6): the policy, the budget and the adapter."""

from __future__ import annotations

import dataclasses

from layercard.config.budget import Budgets
from layercard.config.card import SCORES
from layercard.config.schema import Schema, setting

# Beyond any run's step (a million rows of a million tokens); larger figures only overflow the costs.
MAX_POSITIONS = 1e12

# Policies priced and fitted by the search over matrices × layers × rank (the recommendation, the
# practitioners' fixed rules and the weight-SNR selector `spectrum`, each fitted to the budgets); they take
# several budgets, absolute or relative to the reference.
SEARCH_POLICIES: tuple[str, ...] = ("recommend", "peft-default", "all-linear", "last-n", "spectrum")
SEARCH_BUDGET_KINDS: tuple[str, ...] = ("params", "modules", "step_time", "memory")
POLICIES: tuple[str, ...] = (
    *SEARCH_POLICIES,
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
# Which placements the recommendation may take (docs/design.md §6): only those over all the depth, any, or
# the first where the card's targets are varied.
DEPTH_CHOICES: tuple[str, ...] = ("auto", "any", "all")
# Which of the card's peak-memory figures prices placements (docs/design.md §5, "Where a run trains").
MEMORY_FIGURES: tuple[str, ...] = ("auto", "first_step", "window")


@dataclasses.dataclass(frozen=True)
class PlanConfig(Schema):
    """What to plan and under which budget.

    ``target`` asks for the cheapest placement (cost in the first budget's kind, default params) predicted to
    reach that fraction: of the reference's loss drop under policy recommend, of the all-layer gain under
    the layer policies; budgets given with it also cap the costs. ``alpha``
    defaults to 2·rank per module (so alpha/r = 2 everywhere, also under ``rank='auto'``).
    """

    SECTION = "plan"

    policy: str = setting(
        "recommend", kind="choice", choices=POLICIES, help="how matrices, layers and ranks are chosen"
    )
    budget: Budgets | None = setting(
        None,
        kind="budget",
        help="layers=N | params=N (k/M suffix) | step_time=SECONDS | modules=N | memory=MIB "
        "(or 6G: G and GB are GiB, M and MB MiB); relative to the reference (every linear module of every "
        "layer at rank 8): params=0.25x; "
        "several (search policies): params=0.25x,step_time=0.6x; null for policy all",
    )
    target: float | None = setting(
        None,
        kind="fraction",
        help="or: the cheapest placement predicted to reach this fraction (recommend: of the reference's "
        "loss drop, cheapest in the first budget's kind, else in parameters; layer policies: of the "
        "all-layer gain)",
    )
    roles: str | None = setting(None, kind="roles", help="roles to adapt; null: the card's roles")
    rank: int | str = setting(
        8, kind="rank", help="LoRA rank (or bottleneck width), or auto: per-module ranks from captured@r"
    )
    alpha: float | None = setting(None, kind="pos_float", help="LoRA alpha; null: 2·rank per module")
    dropout: float = setting(0.0, kind="unit", help="LoRA dropout")
    score: str | None = setting(
        None,
        kind="choice",
        choices=tuple(SCORES),
        help="card score used as the gain by the layer policies; null: the card default",
    )
    seed: int = setting(0, kind="seed", yaml=False, help="seed of the random policy")
    kind: str = setting("lora", kind="choice", choices=ADAPTER_KINDS, help="adapter kind")
    bands: int | None = setting(
        None, kind="int", minimum=1, help="card-stratified: number of depth bands (instead of a budget)"
    )
    depth: str = setting(
        "auto",
        kind="choice",
        choices=DEPTH_CHOICES,
        help="recommend: take only placements with a unit in every sixth of the depth (all), any placement "
        "(any), or all where the card's targets are varied and one fits the budgets or reaches the target "
        "(auto)",
    )
    batch_size: int | None = setting(
        None,
        kind="int",
        minimum=1,
        help="training micro-batch that step time and memory are priced at; null: the card's calibration "
        "batch (layercard run: train.batch_size)",
    )
    grad_accum: int | None = setting(
        None,
        kind="int",
        minimum=1,
        help="micro-batches per optimizer step that step time is priced at (each pays the step's fixed "
        "part); null: 1 (layercard run: train.grad_accum)",
    )
    step_positions: float | None = setting(
        None,
        kind="pos_float",
        help="padded positions (rows × tokens) an optimizer step computes, that step time is priced at; "
        "null: the card's calibration batch at batch_size rows (layercard run: its training data's mean)",
    )
    peak_positions: float | None = setting(
        None,
        kind="pos_float",
        help="padded positions of the largest micro-batch, that peak memory is priced at; null: the card's "
        "calibration batch at batch_size rows (layercard run: its training data's largest)",
    )
    memory_figure: str = setting(
        "auto",
        kind="choice",
        choices=MEMORY_FIGURES,
        help="peak memory priced for a run in a process that ran no calibration (first_step: a separate "
        "layercard train) or in the one that computed the card (window); auto: on a CPU, first_step "
        "unless this process calibrated the card (layercard run), on CUDA window",
    )

    def validate(self) -> None:
        for name in ("step_positions", "peak_positions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise self.fail(name, f"a step computes at least 1 padded position, got {value:g}")
            if value is not None and value > MAX_POSITIONS:
                raise self.fail(name, f"at most {MAX_POSITIONS:.0e} padded positions a step, got {value:g}")
        if self.policy in SEARCH_POLICIES:
            self._validate_search()
            return
        if self.budget is not None and (len(self.budget) > 1 or any(b.relative for b in self.budget)):
            raise self.fail(
                "budget",
                f"policy {self.policy} takes one absolute budget; several or relative budgets are for the "
                f"search policies ({', '.join(SEARCH_POLICIES)})",
            )
        if self.kind != "lora" and self.rank == "auto":
            raise self.fail(
                "rank",
                f"'auto' allocates LoRA ranks; kind={self.kind!r} needs an integer bottleneck rank",
            )
        if self.depth != "auto":
            raise self.fail(
                "depth", f"chooses among the search's placements: policy recommend, not {self.policy}"
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

    def _validate_search(self) -> None:
        if self.depth != "auto" and self.policy != "recommend":
            raise self.fail(
                "depth", f"chooses among the search's placements: policy recommend, not {self.policy}"
            )
        for b in self.budget or ():
            if b.kind not in SEARCH_BUDGET_KINDS:
                raise self.fail(
                    "budget",
                    f"policy {self.policy} searches under {', '.join(SEARCH_BUDGET_KINDS)} budgets, "
                    f"not {b.kind}"
                    + ("; layers=N is for a layer policy such as uniform" if b.kind == "layers" else ""),
                )
        if self.target is not None and self.policy != "recommend":
            raise self.fail(
                "target", f"policy {self.policy} is a fixed rule; a target is for policy recommend"
            )
        if self.policy == "recommend" and self.budget is None and self.target is None:
            raise self.fail("budget", "policy recommend needs a budget (e.g. params=0.25x) or a target")
        if self.policy in ("last-n", "spectrum") and self.budget is None:
            raise self.fail("budget", f"policy {self.policy} needs a budget, e.g. params=0.25x")
        if self.kind != "lora":
            raise self.fail(
                "kind", f"policy {self.policy} places LoRA; bottleneck adapters use layer policies"
            )
        for name in ("bands", "roles"):
            if getattr(self, name) is not None:
                what = (
                    "adapts the card's roles and chooses the layers"
                    if self.policy == "spectrum"
                    else "chooses the matrices and layers"
                )
                raise self.fail(name, f"policy {self.policy} {what} itself")
        if self.score is not None:
            # the quality model's features are fixed where it was fitted; spectrum ranks by weight_snr
            by = "weight_snr" if self.policy == "spectrum" else "its quality model's own (gradnorm_energy)"
            raise self.fail(
                "score", f"policy {self.policy} scores units by {by}; a score is for the layer policies"
            )
