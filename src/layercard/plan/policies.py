"""Placement policies: each picks a layer set S under a budget, or the cheapest reaching a target (§6).

``card`` and ``card-additive`` are greedy on marginal predicted gain per marginal cost (coupled or
not); ``top``/``bottom``/``random``/``gradnorm`` add layers in a fixed order; ``middle``/``uniform``/
``card-stratified`` define one K-layer set per K; ``all`` takes every candidate layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from layercard.config import Budget, PlanConfig
from layercard.errors import LayercardError, setting_name, setting_text
from layercard.plan.space import REL_TOL, Space, amount, budget_text, fits

_ORDERED = ("top", "bottom", "random", "gradnorm")


def select(space: Space, cfg: PlanConfig, goal: float | None) -> tuple[list[int], list[str]]:
    """The layer set of ``cfg.policy`` under the budget (or the cheapest reaching ``goal``), with notes."""
    budget = cfg.budget
    if cfg.policy == "all":
        notes: list[str] = []
        if budget is not None and cfg.rank == "auto" and budget.kind == "params":
            notes.append(
                f"policy all adapts every layer; the {budget_text(budget)} bounds only "
                f"{setting_text('rank', 'auto')}"
            )
        elif budget is not None:
            notes.append(f"policy all ignores the {budget_text(budget)} (recorded only)")
        if cfg.target is not None:
            notes.append(f"policy all ignores the target {cfg.target} (recorded only)")
        return list(space.layers), notes
    cost_kind = budget.kind if budget is not None else "params"
    cap = budget.value if budget is not None else None
    if budget is not None:
        _check_budget_possible(space, budget)
    if cfg.policy in ("card", "card-additive"):
        return _select_card(space, cfg, goal, cost_kind, cap)
    if cfg.policy in _ORDERED:
        chosen = _walk(space, _order(cfg.policy, space, cfg.seed), cost_kind=cost_kind, cap=cap, goal=goal)
        if goal is not None and space.gain(chosen) < goal * (1 - REL_TOL):
            raise LayercardError(
                f"target {cfg.target}: no {cfg.policy} placement {_within(budget)} reaches it"
            )
        return chosen, []
    return _select_family(space, cfg, goal, cost_kind, cap), []


def _select_card(
    space: Space, cfg: PlanConfig, goal: float | None, cost_kind: str, cap: float | None
) -> tuple[list[int], list[str]]:
    notes: list[str] = []
    budget = cfg.budget
    coupled = cfg.policy == "card"
    chosen, no_gain = _greedy(space, coupled=coupled, cost_kind=cost_kind, cap=cap, goal=goal)
    if not chosen:
        raise LayercardError(
            f"policy {cfg.policy}: no layer has a positive predicted gain under score "
            f"{_score_name(space, cfg)!r}; choose another {setting_name('score')}"
        )
    if goal is None and no_gain and budget is not None and budget.kind == "layers" and len(chosen) < cap:
        notes.append(
            f"policy {cfg.policy}: stopped at {len(chosen)} of {int(cap)} layers: "
            "no remaining layer adds predicted gain"
        )
    if goal is not None and space.gain(chosen) < goal * (1 - REL_TOL):
        raise LayercardError(
            f"target {cfg.target}: policy {cfg.policy} reaches only "
            f"{space.gain(chosen) / max(goal / cfg.target, 1e-300):.3f} of the all-layer gain "
            f"{_within(budget)}"
        )
    return chosen, notes


def _select_family(
    space: Space, cfg: PlanConfig, goal: float | None, cost_kind: str, cap: float | None
) -> list[int]:
    """A per-K policy: the bands asked for, the smallest K reaching ``goal``, else the largest K that fits."""
    budget = cfg.budget
    n = len(space.layers)
    fam = _family(cfg.policy, space)
    if cfg.bands is not None:
        if cfg.bands > n:
            raise LayercardError(
                f"bands={cfg.bands}: the card has only {n} layers for roles {','.join(space.roles)}"
            )
        chosen = fam(cfg.bands)
        if budget is not None and not fits(space.cost(chosen, cost_kind), cap):
            cost = amount(space.cost(chosen, cost_kind), cost_kind)
            raise LayercardError(
                f"bands={cfg.bands}: the {cfg.bands} layers cost {cost}, over the {budget_text(budget)}"
            )
        return chosen
    if goal is not None:
        for k in range(1, n + 1):
            s = fam(k)
            if space.gain(s) >= goal * (1 - REL_TOL) and fits(space.cost(s, cost_kind), cap):
                return s
        raise LayercardError(f"target {cfg.target}: no {cfg.policy} placement {_within(budget)} reaches it")
    assert budget is not None and cap is not None
    if budget.kind == "layers":
        return fam(int(cap))
    for k in range(n, 0, -1):  # the largest K whose set fits (costs need not be monotone in K)
        s = fam(k)
        if fits(space.cost(s, cost_kind), cap):
            return s
    first = fam(1)
    raise LayercardError(
        f"{budget_text(budget)}: policy {cfg.policy}'s smallest placement {first} already costs "
        f"{amount(space.cost(first, cost_kind), cost_kind, up=True)}"
    )


def _bands(n: int, k: int) -> list[range]:
    """K contiguous bands of positions 0..n-1 with integer edges ⌊i·n/K⌋ (sizes differ by at most one)."""
    edges = [(i * n) // k for i in range(k + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(k)]


def _order(policy: str, space: Space, seed: int) -> list[int]:
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


def _family(policy: str, space: Space) -> Callable[[int], list[int]]:
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
    space: Space, order: Sequence[int], *, cost_kind: str, cap: float | None, goal: float | None
) -> list[int]:
    """Add layers in ``order``, skipping any that would break the budget, until the goal (if any) is met."""
    chosen: list[int] = []
    for layer in order:
        if goal is not None and space.gain(chosen) >= goal * (1 - REL_TOL):
            break
        trial = [*chosen, layer]
        if fits(space.cost(trial, cost_kind), cap):
            chosen = trial
    return sorted(chosen)


def _greedy(
    space: Space, *, coupled: bool, cost_kind: str, cap: float | None, goal: float | None
) -> tuple[list[int], bool]:
    """Coupling-aware greedy: add the layer with the largest marginal set gain per marginal cost.

    Stops when nothing fits, when no layer adds gain, or (target mode) once the *reported* (coupled)
    gain reaches ``goal``. Returns the set and whether it stopped for lack of gain.
    """
    chosen: list[int] = []
    cur_gain, cur_cost = 0.0, 0.0
    scale = max(space.gain(space.layers, coupled=coupled), 1e-300)
    while True:
        if goal is not None and space.gain(chosen) >= goal * (1 - REL_TOL):
            return sorted(chosen), False
        best: tuple[float, float, int] | None = None
        for layer in space.layers:
            if layer in chosen:
                continue
            trial = [*chosen, layer]
            c = space.cost(trial, cost_kind)
            if not fits(c, cap):
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
                fits(space.cost([*chosen, x], cost_kind), cap) for x in space.layers if x not in chosen
            )
            return sorted(chosen), no_gain
        layer = -best[2]
        chosen.append(layer)
        cur_gain = space.gain(chosen, coupled=coupled)
        cur_cost = space.cost(chosen, cost_kind)


def _check_budget_possible(space: Space, budget: Budget) -> None:
    n = len(space.layers)
    if budget.kind == "layers" and budget.value > n:
        raise LayercardError(
            f"{budget_text(budget)}: the card has only {n} layers with roles {','.join(space.roles)}"
        )
    cheapest = min(space.cost([layer], budget.kind) for layer in space.layers)
    if not fits(cheapest, budget.value):
        raise LayercardError(
            f"{budget_text(budget)}: fits no layer; the cheapest single layer of roles "
            f"{','.join(space.roles)} costs {amount(cheapest, budget.kind, up=True)}"
        )


def _within(budget: Budget | None) -> str:
    return f"within {budget_text(budget)}" if budget is not None else "with no budget"


def _score_name(space: Space, cfg: PlanConfig) -> str:
    return cfg.score or space.card.default_score
