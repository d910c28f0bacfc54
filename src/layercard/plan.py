"""Planning: turn a Layer Card into an adapter placement under a budget (DESIGN §4–§6).

A *layer* is the planning unit: choosing layer ℓ adapts every unit of the chosen roles in ℓ. Each
policy picks a layer set S; the plan then records the predicted set gain (§4), the costs (§5), the
rank of every adapted module and a ready PEFT ``LoraConfig`` whose keys are full module paths.

Predicted gains are in the units of the card's score (e.g. loss decrease of a first Adam step for
``rate``); they rank placements, they are not a promise of the measured gain (DESIGN §3a).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layercard.artifacts import SCHEMA_VERSION, Provenance, read_json, write_json
from layercard.card import stats
from layercard.card.artifact import SCORES, Card, UnitRow
from layercard.errors import LayercardError

if TYPE_CHECKING:
    from peft import LoraConfig

KIND = "plan"
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
# Rank used to cost layer selection when ranks are allocated afterwards ("auto"): the uniform reference.
AUTO_REFERENCE_RANK = 8
# Bottleneck adapters per decoder layer for houlsby/parallel (one per sublayer: attention and MLP).
ADAPTERS_PER_LAYER = 2
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}
_REL_TOL = 1e-9  # budgets are compared with a relative tolerance so float step times do not flicker


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to plan and under which budget. Validated on construction; errors name the field.

    ``target`` asks for the cheapest placement (cost in the budget's kind, default params) whose
    predicted gain reaches that fraction of the all-layer gain; a budget given with it also caps the cost.
    ``alpha`` defaults to 2·rank per module (so alpha/r = 2 everywhere, also under ``rank='auto'``).
    """

    policy: str
    budget: Budget | None = None
    target: float | None = None
    roles: str | None = None
    rank: int | str = 8
    alpha: float | None = None
    dropout: float = 0.0
    score: str | None = None
    seed: int = 0
    kind: str = "lora"
    bands: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise LayercardError(f"plan config: policy={self.policy!r} unknown; valid: {', '.join(POLICIES)}")
        if isinstance(self.budget, str):  # convenience for callers holding CLI text
            object.__setattr__(self, "budget", Budget.parse(self.budget))
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise LayercardError(
                f"plan config: budget={self.budget!r} must be a Budget or text like layers=8"
            )
        if self.target is not None:
            t = self.target
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1):
                raise LayercardError(f"plan config: target={t!r} must be a fraction in (0, 1]")
        if self.roles is not None:
            from layercard.models import parse_roles

            parse_roles(self.roles)
        r = self.rank
        if r != "auto" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise LayercardError(f"plan config: rank={r!r} must be a positive integer or 'auto'")
        if self.alpha is not None:
            a = self.alpha
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
                raise LayercardError(f"plan config: alpha={a!r} must be a positive number")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 <= d < 1):
            raise LayercardError(f"plan config: dropout={d!r} must be in [0, 1)")
        if self.score is not None and self.score not in SCORES:
            raise LayercardError(f"plan config: score={self.score!r} unknown; valid: {', '.join(SCORES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise LayercardError(f"plan config: seed={self.seed!r} must be a non-negative integer")
        if self.kind not in ADAPTER_KINDS:
            raise LayercardError(
                f"plan config: kind={self.kind!r} unknown; valid: {', '.join(ADAPTER_KINDS)}"
            )
        if self.kind != "lora" and self.rank == "auto":
            raise LayercardError(
                f"plan config: rank='auto' allocates LoRA ranks; kind={self.kind!r} needs an integer "
                "bottleneck rank"
            )
        if self.bands is not None:
            if isinstance(self.bands, bool) or not isinstance(self.bands, int) or self.bands < 1:
                raise LayercardError(f"plan config: bands={self.bands!r} must be a positive integer")
            if self.policy != "card-stratified":
                raise LayercardError(
                    f"plan config: bands is used only by policy card-stratified, not {self.policy}"
                )
            if self.target is not None:
                raise LayercardError(
                    "plan config: bands fixes the number of layers; give bands or target, not both"
                )
        if self.policy != "all" and self.budget is None and self.target is None and self.bands is None:
            raise LayercardError(
                f"plan config: policy {self.policy} needs a budget (e.g. layers=8) or a target fraction"
            )


# ---------------------------------------------------------------------------------------------------------
# The plan artifact
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlannedUnit:
    """One adapted module (LoRA) or one adapted layer (houlsby/parallel: ``name`` is the layer path)."""

    key: str
    layer: int
    role: str
    name: str
    rank: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A placement with its predicted gain and cost; ``lora_config`` is the JSON form of a PEFT LoraConfig."""

    provenance: dict[str, Any]
    card: dict[str, Any]
    config: dict[str, Any]
    kind: str
    units: list[PlannedUnit]
    layers: list[int]
    predicted: dict[str, Any]
    lora_config: dict[str, Any] | None
    adapter_config: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # "kind" names the artifact (as in every layercard JSON); the adapter kind goes under "adapter_kind".
        d = dataclasses.asdict(self)
        d["adapter_kind"] = d.pop("kind")
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "kind"}
        kw["kind"] = d["adapter_kind"]
        kw["units"] = [PlannedUnit(**u) for u in d["units"]]
        kw["layers"] = [int(x) for x in d["layers"]]
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        d = read_json(path, kind=KIND)
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LayercardError(
                f"{path}: malformed plan ({type(e).__name__}: {e})".splitlines()[0]
            ) from None

    def peft_config(self) -> LoraConfig:
        """The PEFT ``LoraConfig`` of a LoRA plan."""
        if self.kind != "lora" or self.lora_config is None:
            raise LayercardError(
                f"plan: kind {self.kind!r} has no LoraConfig; train builds it from plan.layers"
            )
        from peft import LoraConfig

        return LoraConfig(**self.lora_config)


# ---------------------------------------------------------------------------------------------------------
# The planning space: per-layer gains, coupling and costs
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Space:
    """What the policies see: candidate layers, their gains, the layer coupling and the cost functions."""

    card: Card
    roles: tuple[str, ...]
    layers: tuple[int, ...]  # candidate layers (those with units of the roles), ascending
    units: dict[int, tuple[UnitRow, ...]]
    gains: np.ndarray  # per layer index 0..L-1, as scored (may be negative)
    coupling: np.ndarray  # L × L cosines; identity where the card has none
    cost_model: Any  # layercard.cost.CostModel | None
    kind: str
    unit_rank: int  # LoRA rank used to cost a selection, or the bottleneck width

    def gain(self, layers: Sequence[int], *, coupled: bool = True) -> float:
        s = list(layers)
        if not s:
            return 0.0
        c = self.coupling[np.ix_(s, s)] if coupled else np.eye(len(s))
        return stats.set_gain(self.gains[s], c)

    def additive_gain(self, layers: Sequence[int]) -> float:
        return float(np.clip(self.gains[list(layers)], 0.0, None).sum()) if layers else 0.0

    def redundancy(self, layers: Sequence[int]) -> float:
        s = list(layers)
        return stats.redundancy(self.coupling[np.ix_(s, s)]) if s else 0.0

    def layer_params(self, layer: int) -> int:
        if self.kind == "lora":
            return sum(self.unit_rank * (u.d_in + u.d_out) for u in self.units[layer])
        d = int(self.card.model.get("d_model") or self.units[layer][0].d_in)
        # Down d→b and up b→d projections with biases, per adapter (an estimate until train builds them).
        return ADAPTERS_PER_LAYER * (2 * d * self.unit_rank + self.unit_rank + d)

    def modules(self, layers: Sequence[int]) -> int:
        if self.kind == "lora":
            return sum(len(self.units[layer]) for layer in layers)
        return ADAPTERS_PER_LAYER * len(layers)

    def step_time(self, layers: Sequence[int]) -> float | None:
        if self.cost_model is None:
            return None
        return float(self.cost_model.step_time(list(layers), self.modules(layers)))

    def cost(self, layers: Sequence[int], kind: str) -> float:
        """Cost of a layer set in a budget kind's unit (step time is non-additive: it depends on min S)."""
        if kind == "layers":
            return float(len(layers))
        if kind == "modules":
            return float(self.modules(layers))
        if kind == "params":
            return float(sum(self.layer_params(layer) for layer in layers))
        t = self.step_time(layers)
        if t is None:  # guarded in make_plan; kept so a misuse never silently costs 0
            raise LayercardError("budget step_time: the card has no cost model")
        return t


def _fits(cost: float, cap: float | None) -> bool:
    return cap is None or cost <= cap * (1 + _REL_TOL) + 1e-12


def _build_space(card: Card, cfg: PlanConfig, roles: tuple[str, ...], score: str) -> tuple[_Space, list[str]]:
    notes: list[str] = []
    have = set(card.roles)
    from layercard.models import FUSED_ROLES

    covered = {c for u in card.units for c in FUSED_ROLES.get(u.role, (u.role,))} | have
    missing = [r for r in roles if r not in covered]
    if missing:
        raise LayercardError(
            f"roles: the card measured {','.join(card.roles)}; it has no units for {','.join(missing)} "
            "(run `layercard card --roles ...` with those roles)"
        )
    by_layer: dict[int, list[UnitRow]] = {}
    for u in card.selected_units(roles):
        by_layer.setdefault(u.layer, []).append(u)
    if not by_layer:
        raise LayercardError(f"roles {','.join(roles)}: the card has no units for them")
    n = card.n_layers
    coupling = np.eye(n)
    if card.coupling is not None:
        if card.coupling.get("level", "layer") != "layer":
            raise LayercardError(
                f"card coupling level {card.coupling.get('level')!r}: the planner reads 'layer'"
            )
        idx = [int(x) for x in card.coupling["layers"]]
        mat = np.asarray(card.coupling["matrix"], dtype=np.float64)
        if mat.shape != (len(idx), len(idx)):
            raise LayercardError(f"card coupling: matrix shape {mat.shape} does not match {len(idx)} layers")
        coupling[np.ix_(idx, idx)] = mat
        absent = sorted(set(by_layer) - set(idx))
        if absent:
            notes.append(
                f"coupling: layers {absent} are not in the card's coupling matrix; treated as independent"
            )
        if tuple(roles) != tuple(card.roles):
            notes.append(
                f"coupling was measured for roles {','.join(card.roles)}; used as an approximation for "
                f"roles {','.join(roles)}"
            )
    cost_model = None
    if card.cost is not None:
        from layercard.cost import CostModel

        cost_model = CostModel.from_dict(card.cost)
    unit_rank = AUTO_REFERENCE_RANK if cfg.rank == "auto" else int(cfg.rank)
    space = _Space(
        card=card,
        roles=roles,
        layers=tuple(sorted(by_layer)),
        units={k: tuple(v) for k, v in by_layer.items()},
        gains=np.asarray(card.layer_scores(score, roles=roles), dtype=np.float64),
        coupling=coupling,
        cost_model=cost_model,
        kind=cfg.kind,
        unit_rank=unit_rank,
    )
    return space, notes


# ---------------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------------


def _bands(n: int, k: int) -> list[range]:
    """K contiguous bands of positions 0..n-1 with integer edges ⌊i·n/K⌋ (sizes differ by at most one)."""
    edges = [(i * n) // k for i in range(k + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(k)]


_ORDERED = ("top", "bottom", "random", "gradnorm")


def _order(policy: str, space: _Space, seed: int) -> list[int]:
    """The priority order of a baseline that adds layers one at a time."""
    cand = list(space.layers)
    if policy == "top":
        return cand[::-1]
    if policy == "bottom":
        return cand
    if policy == "random":
        return [cand[i] for i in np.random.default_rng(seed).permutation(len(cand))]
    if policy == "gradnorm":
        g = space.card.layer_scores("gradnorm", roles=space.roles)
        return sorted(cand, key=lambda layer: (-g[layer], layer))
    raise AssertionError(policy)


def _family(policy: str, space: _Space) -> Callable[[int], list[int]]:
    """The K-layer set of a policy defined for each K (middle, uniform, card-stratified)."""
    cand = list(space.layers)
    n = len(cand)
    if policy == "middle":
        return lambda k: cand[(n - k) // 2 : (n - k) // 2 + k]
    if policy == "uniform":
        # The centre of each of K equal bands: K=4 of 30 layers gives 3, 11, 18, 26.
        return lambda k: [cand[(b.start + b.stop) // 2] for b in _bands(n, k)]
    if policy == "card-stratified":
        g = space.gains
        # The best layer of each band by predicted gain (ties: the lower layer).
        return lambda k: [max((cand[i] for i in b), key=lambda x: (g[x], -x)) for b in _bands(n, k)]
    raise AssertionError(policy)


def _walk(
    space: _Space, order: Sequence[int], *, cost_kind: str, cap: float | None, goal: float | None
) -> list[int]:
    """Add layers in ``order``, skipping any that would break the budget, until the goal (if any) is met."""
    chosen: list[int] = []
    for layer in order:
        if goal is not None and space.gain(chosen) >= goal * (1 - _REL_TOL):
            break
        trial = [*chosen, layer]
        if _fits(space.cost(trial, cost_kind), cap):
            chosen = trial
    return sorted(chosen)


def _greedy(
    space: _Space, *, coupled: bool, cost_kind: str, cap: float | None, goal: float | None
) -> tuple[list[int], bool]:
    """Coupling-aware greedy: add the layer with the largest marginal set gain per marginal cost.

    Stops when nothing fits, when no layer adds gain, or (target mode) once the *reported* (coupled)
    gain reaches ``goal``. Returns the set and whether it stopped for lack of gain.
    """
    chosen: list[int] = []
    cur_gain, cur_cost = 0.0, 0.0
    scale = max(space.gain(space.layers, coupled=coupled), 1e-300)
    while True:
        if goal is not None and space.gain(chosen) >= goal * (1 - _REL_TOL):
            return sorted(chosen), False
        best: tuple[float, float, int] | None = None
        for layer in space.layers:
            if layer in chosen:
                continue
            trial = [*chosen, layer]
            c = space.cost(trial, cost_kind)
            if not _fits(c, cap):
                continue
            dg = space.gain(trial, coupled=coupled) - cur_gain
            if dg <= 1e-12 * scale:
                continue
            dc = c - cur_cost
            # A layer that costs nothing more (step time when min S is unchanged) wins on gain alone.
            ratio = dg / dc if dc > 1e-15 else math.inf
            key = (ratio, dg, -layer)
            if best is None or key > best:
                best = key
        if best is None:
            no_gain = cap is None or any(
                _fits(space.cost([*chosen, x], cost_kind), cap) for x in space.layers if x not in chosen
            )
            return sorted(chosen), no_gain
        layer = -best[2]
        chosen.append(layer)
        cur_gain = space.gain(chosen, coupled=coupled)
        cur_cost = space.cost(chosen, cost_kind)


def _select(space: _Space, cfg: PlanConfig, goal: float | None) -> tuple[list[int], list[str]]:
    """The layer set of ``cfg.policy`` under the budget (or the cheapest reaching ``goal``)."""
    notes: list[str] = []
    budget = cfg.budget
    n = len(space.layers)
    if cfg.policy == "all":
        if budget is not None:
            notes.append(f"policy all ignores the budget {budget} (recorded only)")
        if cfg.target is not None:
            notes.append(f"policy all ignores the target {cfg.target} (recorded only)")
        return list(space.layers), notes
    cost_kind = budget.kind if budget is not None else "params"
    cap = budget.value if budget is not None else None
    if budget is not None:
        _check_budget_possible(space, budget)
    if cfg.policy in ("card", "card-additive"):
        coupled = cfg.policy == "card"
        chosen, no_gain = _greedy(space, coupled=coupled, cost_kind=cost_kind, cap=cap, goal=goal)
        if not chosen:
            raise LayercardError(
                f"policy {cfg.policy}: no layer has a positive predicted gain under score "
                f"{_score_name(space, cfg)!r}; choose another --score"
            )
        if goal is None and no_gain and budget is not None and budget.kind == "layers" and len(chosen) < cap:
            notes.append(
                f"policy {cfg.policy}: stopped at {len(chosen)} of {int(cap)} layers: "
                "no remaining layer adds predicted gain"
            )
        if goal is not None and space.gain(chosen) < goal * (1 - _REL_TOL):
            raise LayercardError(
                f"target {cfg.target}: policy {cfg.policy} reaches only "
                f"{space.gain(chosen) / max(goal / cfg.target, 1e-300):.3f} of the all-layer gain "
                f"within budget {budget}"
            )
        return chosen, notes
    if cfg.policy in _ORDERED:
        chosen = _walk(space, _order(cfg.policy, space, cfg.seed), cost_kind=cost_kind, cap=cap, goal=goal)
        if goal is not None and space.gain(chosen) < goal * (1 - _REL_TOL):
            raise LayercardError(
                f"target {cfg.target}: no {cfg.policy} placement within budget {budget} reaches it"
            )
        return chosen, notes
    fam = _family(cfg.policy, space)
    if cfg.bands is not None:
        if cfg.bands > n:
            raise LayercardError(
                f"bands={cfg.bands}: the card has only {n} layers for roles {','.join(space.roles)}"
            )
        chosen = fam(cfg.bands)
        if budget is not None and not _fits(space.cost(chosen, cost_kind), cap):
            raise LayercardError(
                f"bands={cfg.bands}: the {cfg.bands} layers cost {_fmt(space.cost(chosen, cost_kind))} "
                f"{cost_kind}, over the budget {budget}"
            )
        return chosen, notes
    if goal is not None:
        for k in range(1, n + 1):
            s = fam(k)
            if space.gain(s) >= goal * (1 - _REL_TOL) and _fits(space.cost(s, cost_kind), cap):
                return s, notes
        raise LayercardError(
            f"target {cfg.target}: no {cfg.policy} placement within budget {budget} reaches it"
        )
    assert budget is not None and cap is not None
    if budget.kind == "layers":
        return fam(int(cap)), notes
    for k in range(n, 0, -1):  # the largest K whose set fits (costs need not be monotone in K)
        s = fam(k)
        if _fits(space.cost(s, cost_kind), cap):
            return s, notes
    first = fam(1)
    raise LayercardError(
        f"budget {budget}: policy {cfg.policy}'s smallest placement {first} already costs "
        f"{_fmt(space.cost(first, cost_kind))} {cost_kind}"
    )


def _check_budget_possible(space: _Space, budget: Budget) -> None:
    n = len(space.layers)
    if budget.kind == "layers" and budget.value > n:
        raise LayercardError(
            f"budget {budget}: the card has only {n} layers with roles {','.join(space.roles)}"
        )
    cheapest = min(space.cost([layer], budget.kind) for layer in space.layers)
    if not _fits(cheapest, budget.value):
        raise LayercardError(
            f"budget {budget}: fits no layer; the cheapest single layer of roles {','.join(space.roles)} "
            f"costs {_fmt(cheapest)} {budget.kind}"
        )


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _score_name(space: _Space, cfg: PlanConfig) -> str:
    return cfg.score or space.card.default_score


# ---------------------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------------------


def _captured_at(unit: UnitRow, rank: int) -> float:
    """captured@r, or at the largest measured rank ≤ r (a lower bound) when r was not measured."""
    table = {int(k): float(v) for k, v in unit.captured.items()}
    if not table:
        return 0.0
    below = [k for k in table if k <= rank]
    return table[max(below)] if below else 0.0


def _auto_ranks(units: Sequence[UnitRow], param_budget: float) -> dict[str, int]:
    """Allocate per-unit ranks from captured@r: start at the smallest rank, then repeatedly double the
    unit with the largest captured gain per added parameter while the doubling fits the budget."""
    ranks: dict[str, int] = {}
    measured: dict[str, list[int]] = {}
    for u in units:
        ks = sorted(int(k) for k in u.captured)
        if not ks:
            raise LayercardError(f"rank auto: unit {u.key} has no captured@r values in the card")
        measured[u.key] = ks
        ranks[u.key] = ks[0]
    used = sum(ranks[u.key] * (u.d_in + u.d_out) for u in units)
    if used > param_budget * (1 + _REL_TOL):
        raise LayercardError(
            f"rank auto: {len(units)} modules at rank {min(ranks.values())} need {used} params, "
            f"over the budget {param_budget:.0f}"
        )
    while True:
        best: tuple[float, int, str] | None = None
        for i, u in enumerate(units):
            r = ranks[u.key]
            nxt = 2 * r
            # Ranks beyond min(d_in, d_out) or beyond the measured ranks capture nothing new.
            if nxt > min(u.d_in, u.d_out, measured[u.key][-1]):
                continue
            added = r * (u.d_in + u.d_out)
            if used + added > param_budget * (1 + _REL_TOL):
                continue
            dc = _captured_at(u, nxt) - _captured_at(u, r)
            if dc <= 0:
                continue
            key = (dc / added, -i, u.key)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            return ranks
        u = next(x for x in units if x.key == best[2])
        used += ranks[u.key] * (u.d_in + u.d_out)
        ranks[u.key] *= 2


def _lora_config(units: Sequence[PlannedUnit], alpha: float | None, dropout: float) -> dict[str, Any]:
    """JSON form of the PEFT LoraConfig: explicit full-path targets; patterns only where a rank differs.

    PEFT matches a ``rank_pattern`` key with ``re.match(rf"(.*\\.)?({key})$", name)``: a full module path
    can only hit that module (the optional prefix must end at a dot, and the key is anchored at the
    end), so layer 1's key cannot hit layer 11. check_plan verifies this on the real model.
    """
    counts = Counter(u.rank for u in units)
    r = max(counts, key=lambda k: (counts[k], k))  # the commonest rank needs no pattern entry
    rank_pattern = {u.name: u.rank for u in units if u.rank != r}
    if alpha is None:  # alpha = 2·rank per module keeps the scale alpha/r = 2 that the card assumed
        lora_alpha: float = 2 * r
        alpha_pattern = {u.name: 2 * u.rank for u in units if u.rank != r}
    else:
        lora_alpha, alpha_pattern = alpha, {}
    return {
        "r": int(r),
        "lora_alpha": _num(lora_alpha),
        "lora_dropout": float(dropout),
        "target_modules": [u.name for u in units],
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def _num(x: float) -> int | float:
    return int(x) if float(x) == int(x) else float(x)


# ---------------------------------------------------------------------------------------------------------
# make_plan
# ---------------------------------------------------------------------------------------------------------


def make_plan(card: Card, cfg: PlanConfig, *, card_path: str | None = None) -> Plan:
    """Choose layers (and ranks) for ``cfg.policy`` under the budget; see the module docstring."""
    from layercard.models import parse_roles

    t0 = time.perf_counter()
    roles = parse_roles(cfg.roles) if cfg.roles is not None else tuple(card.roles)
    score = cfg.score or card.default_score
    if score not in SCORES:
        raise LayercardError(f"card default_score {score!r} unknown; valid: {', '.join(SCORES)}")
    if (cfg.budget is not None and cfg.budget.kind == "step_time") and card.cost is None:
        raise LayercardError(
            "budget step_time: the card has no cost model; run `layercard card` with --calibrate "
            "to time short LoRA runs"
        )
    space, notes = _build_space(card, cfg, roles, score)
    warn: list[str] = []
    if card.coupling is None and cfg.policy == "card":
        warn.append(
            "policy card: the card has no coupling matrix, so set gains assume independent layers "
            "(run `layercard card --coupling`)"
        )
    warn += notes
    all_gain = space.gain(space.layers)
    if cfg.target is not None and all_gain <= 0:
        raise LayercardError(
            f"target {cfg.target}: every layer's predicted gain under score {score!r} is ≤ 0; "
            "choose another --score"
        )
    goal = cfg.target * all_gain if cfg.target is not None else None
    layers, sel_notes = _select(space, cfg, goal)
    warn += sel_notes
    if cfg.kind != "lora":
        warn.append(
            f"kind {cfg.kind}: predicted gain and step time come from LoRA measurements (a proxy); "
            "params are an estimate for two bottleneck adapters per layer"
        )

    # Ranks and planned units.
    if cfg.kind == "lora":
        chosen_units = [u for layer in layers for u in space.units[layer]]
        if cfg.rank == "auto":
            if cfg.budget is not None and cfg.budget.kind == "params":
                pb = cfg.budget.value
            else:  # no parameter budget: spend what uniform rank 8 would on the chosen modules
                pb = float(sum(AUTO_REFERENCE_RANK * (u.d_in + u.d_out) for u in chosen_units))
            ranks = _auto_ranks(chosen_units, pb)
        else:
            ranks = {u.key: int(cfg.rank) for u in chosen_units}
        planned = [PlannedUnit(u.key, u.layer, u.role, u.name, ranks[u.key]) for u in chosen_units]
        lora = _lora_config(planned, cfg.alpha, cfg.dropout)
        adapter = None
        params = sum(p.rank * (u.d_in + u.d_out) for p, u in zip(planned, chosen_units, strict=True))
        captured = float(sum(_captured_at(u, ranks[u.key]) for u in chosen_units))
    else:
        planned = [
            PlannedUnit(
                f"{layer}.{cfg.kind}", layer, cfg.kind, _layer_path(space.units[layer][0]), int(cfg.rank)
            )
            for layer in layers
        ]
        lora = None
        adapter = {
            "kind": cfg.kind,
            "bottleneck": int(cfg.rank),
            "layers": list(layers),
            "adapters_per_layer": ADAPTERS_PER_LAYER,
            "d_model": int(card.model.get("d_model") or 0),
        }
        params = int(space.cost(layers, "params"))
        captured = None

    gain = space.gain(layers)
    predicted: dict[str, Any] = {
        "score": score,
        "score_basis": card.default_score_basis
        if score == card.default_score
        else "not the card's default score; no measured correlation recorded",
        "gain": gain,
        "all_layer_gain": all_gain,
        "fraction": gain / all_gain if all_gain > 0 else None,
        "additive_gain": space.additive_gain(layers),
        "redundancy": space.redundancy(layers),
        "coupling": _coupling_note(card),
        "step_time_s": space.step_time(layers),
        "all_layer_step_time_s": space.step_time(space.layers),
        "params": int(params),
        "all_layer_params": int(space.cost(space.layers, "params")),
        "modules": space.modules(layers),
        "n_layers": len(layers),
        "captured": captured,
    }
    if card.cost is not None:  # the batch the step times refer to, so train can compare like with like
        predicted["calibration_batch_size"] = card.cost.get("batch_size")
        predicted["calibration_batch_tokens"] = card.cost.get("batch_tokens")
    if cfg.budget is not None:
        predicted["budget"] = str(cfg.budget)
        used = params if cfg.budget.kind == "params" else space.cost(layers, cfg.budget.kind)
        predicted["budget_used"] = used
    if cfg.target is not None:
        predicted["target"] = cfg.target
    if gain > predicted["additive_gain"] * (1 + 1e-6) + 1e-300:
        # Set gain above the sum of single-layer gains means C_SS is near-singular with gains that do not fit
        # it (cosines near 1, unequal gains): the §4 model is outside its range, so say so.
        warn.append(
            "predicted set gain exceeds the additive gain: the coupling matrix is near-singular for these "
            "layers; treat the set gain with caution"
        )
    if all_gain <= 0:
        warn.append(f"every layer's predicted gain under score {score!r} is ≤ 0; the fraction is undefined")
    # Every policy but `all` must respect its budget; a violation here is a planner bug, never silenced.
    if cfg.budget is not None and cfg.policy != "all":
        used = predicted["budget_used"]
        if not _fits(float(used), cfg.budget.value):
            raise LayercardError(f"plan: policy {cfg.policy} exceeded budget {cfg.budget} ({_fmt(used)})")

    config = {
        "policy": cfg.policy,
        "budget": str(cfg.budget) if cfg.budget is not None else None,
        "target": cfg.target,
        "roles": list(roles),
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "score": score,
        "seed": cfg.seed,
        "kind": cfg.kind,
        "bands": cfg.bands,
    }
    card_info = {
        "path": card_path,
        "model_id": card.model["id"],
        "model_hash": card.model["hash"],
        "task": card.task["name"],
        "data_hash": card.task["data_hash"],
        "roles": list(card.roles),
        "n_layers": card.n_layers,
    }
    prov = Provenance.make(
        stage="plan",
        model_id=card.model["id"],
        model_hash=card.model["hash"],
        task=card.task["name"],
        data_hash=card.task["data_hash"],
        config=config,
        seed=cfg.seed,
        wall_time_s=time.perf_counter() - t0,
    )
    return Plan(
        provenance=prov.to_dict(),
        card=card_info,
        config=config,
        kind=cfg.kind,
        units=planned,
        layers=sorted(int(x) for x in layers),
        predicted=predicted,
        lora_config=lora,
        adapter_config=adapter,
        warnings=warn,
    )


def _layer_path(unit: UnitRow) -> str:
    """``model.layers.3`` from ``model.layers.3.self_attn.q_proj``."""
    marker = f".{unit.layer}."
    i = unit.name.find(marker)
    if i < 0:
        raise LayercardError(f"unit {unit.key}: cannot find layer {unit.layer} in module path {unit.name!r}")
    return unit.name[: i + len(marker) - 1]


def _coupling_note(card: Card) -> str:
    if card.coupling is None:
        return "absent (independent units assumed)"
    c = card.coupling
    return f"layer-level, {c.get('direction', '?')} directions, {c.get('examples', '?')} examples"


# ---------------------------------------------------------------------------------------------------------
# Checks against a model
# ---------------------------------------------------------------------------------------------------------


def check_model_matches(plan: Plan, loaded: Any, *, where: str = "plan") -> None:
    """Refuse a model other than the one the plan's card measured (compared by weight hash)."""
    want, got = plan.card.get("model_hash"), getattr(loaded, "model_hash", None)
    if want != got:
        raise LayercardError(
            f"{where}: made for model {plan.card.get('model_id')} (hash {str(want)[:12]}), "
            f"loaded {getattr(loaded, 'model_id', '?')} (hash {str(got)[:12]})"
        )


def _pattern_hits(key: str, names: Sequence[str]) -> list[str]:
    # PEFT 0.21's own rule (peft.utils.other.get_pattern_key and the unmatched-pattern warning).
    return [n for n in names if re.match(rf"(.*\.)?({key})$", n)]


def check_plan(plan: Plan, model: Any) -> dict[str, Any]:
    """Apply the plan's LoraConfig with PEFT and verify exactly the planned modules get the planned ranks.

    The model is restored afterwards (LoRA unloaded, ``requires_grad`` as before). Any mismatch raises.
    """
    from torch import nn

    from layercard.models import decoder_layers, get_module

    if hasattr(model, "peft_config"):
        raise LayercardError("plan check: the model already carries PEFT adapters; pass the base model")
    if plan.kind != "lora":
        n = len(decoder_layers(model))
        bad = [layer for layer in plan.layers if not 0 <= layer < n]
        if bad:
            raise LayercardError(f"plan check: layers {bad} do not exist; the model has layers 0..{n - 1}")
        names = [u.name for u in plan.units]
        for name in names:
            get_module(model, name)
        return {"matched": names, "ok": True}

    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    for u in plan.units:  # a clear error before PEFT's own
        mod = get_module(model, u.name)
        if not isinstance(mod, nn.Module):
            raise LayercardError(f"plan check: {u.name} is not a module")
    cfg = plan.peft_config()
    requires = [p.requires_grad for p in model.parameters()]
    peft_model = None
    try:
        with warnings.catch_warnings():
            # PEFT warns on unmatched pattern keys; we check them below and raise instead.
            warnings.simplefilter("ignore")
            try:
                peft_model = get_peft_model(model, cfg)
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LayercardError(f"plan check: PEFT refused the plan's LoraConfig ({msg})") from None
        inner = peft_model.base_model.model  # PEFT's module names (current_key) are relative to this
        wrapped = sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer))
        planned = sorted(u.name for u in plan.units)
        if wrapped != planned:
            extra = sorted(set(wrapped) - set(planned))
            missing = sorted(set(planned) - set(wrapped))
            raise LayercardError(
                f"plan check: PEFT adapted {len(wrapped)} modules, the plan lists {len(planned)}; "
                f"unplanned {extra[:3]}{'…' if len(extra) > 3 else ''}, "
                f"not adapted {missing[:3]}{'…' if len(missing) > 3 else ''}"
            )
        lc = plan.lora_config or {}
        for attr in ("rank_pattern", "alpha_pattern"):
            for key in lc.get(attr) or {}:
                hits = _pattern_hits(key, wrapped)
                if hits != [key]:
                    raise LayercardError(
                        f"plan check: {attr} key {key!r} matches {len(hits)} adapted modules "
                        f"{hits[:3]}; it must match exactly itself"
                    )
        for u in plan.units:
            mod = inner.get_submodule(u.name)
            got = int(mod.lora_A["default"].out_features)
            if got != u.rank:
                raise LayercardError(f"plan check: {u.name} got LoRA rank {got}, the plan says {u.rank}")
            alpha = float((lc.get("alpha_pattern") or {}).get(u.name, lc.get("lora_alpha")))
            want_scale = alpha / u.rank
            if not math.isclose(float(mod.scaling["default"]), want_scale, rel_tol=1e-6):
                raise LayercardError(
                    f"plan check: {u.name} got LoRA scale {mod.scaling['default']}, "
                    f"the plan implies {want_scale}"
                )
        return {"matched": wrapped, "ok": True}
    finally:
        if peft_model is not None:
            peft_model.unload()
        else:  # a failed injection may have left LoRA layers behind
            _strip_lora(model)
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


def _strip_lora(model: Any) -> None:
    """Replace any LoRA wrapper left in ``model`` by its base layer."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())
