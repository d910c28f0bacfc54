"""The search over matrices × layers × rank (docs/design.md §6): candidates, costs, the Pareto frontier.

Every candidate is a uniform-rank LoRA placement: a matrix set (q,v | attention | mlp | all-linear), a
layer set (all layers; the last n; n layers spread evenly over depth) and a rank. Each gets its predicted
quality (:mod:`layercard.plan.quality`) and its costs: trainable parameters, adapted modules and, when the
card carries a calibrated cost model, seconds per training step, peak training memory (MiB) and seconds of
an unmerged forward pass. Budgets may be absolute or relative to
the reference placement (every linear unit of every layer at rank 8; on a card without every linear role,
its own units at rank 8): ``params=0.25x`` (:class:`layercard.config.Budget`).

The practitioners' fixed rules are candidates too, each fitted to a budget the way its users fit it:
``peft-default`` (q,v on every layer) and ``all-linear`` lower the rank from 8, ``last-n`` lowers n.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from layercard.card.artifact import Card, UnitRow
from layercard.config import Budget
from layercard.config.budget import unit_suffix
from layercard.errors import LayercardError, card_setting_text
from layercard.plan import quality as Q
from layercard.plan.space import amount, at_least

MATRICES: dict[str, tuple[str, ...]] = {
    "q,v": ("q", "v"),
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
}
RANKS = (1, 2, 4, 8, 16, 32)
# The rank the practitioners' fixed rules are written at before a budget lowers it (the usual LoRA default).
RULE_RANK = 8


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One placement of the search: its description, units with ranks, predicted quality and costs."""

    matrices: str
    layers: tuple[int, ...]
    layer_rule: str  # "all", "last-n", "spread-n"
    rank: int
    quality: float
    costs: dict[str, float]
    units: tuple[tuple[str, int], ...]  # (unit key, rank)
    error: float | None = None  # the quality model's expected absolute error of ``quality``

    @property
    def label(self) -> str:
        return row_label({"matrices": self.matrices, "layers": self.layer_rule, "rank": self.rank})


def row_label(row: dict[str, Any]) -> str:
    """A placement as messages show it (``all-linear · last-8 · r=8``), from a :func:`summary_row`."""
    return f"{row['matrices']} · {row['layers']} · r={row['rank']}"


def layer_sets(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """All layers; the last n for every n below n_layers (the ``last-n`` rule steps down one layer at a
    time); n spread evenly over depth for n in 2, 4, 8, 16 below n_layers."""
    out: list[tuple[str, tuple[int, ...]]] = [("all", tuple(range(n_layers)))]
    out += [(f"last-{n}", tuple(range(n_layers - n, n_layers))) for n in range(1, n_layers)]
    for n in (2, 4, 8, 16):  # one layer "spread" is just the middle layer
        if n >= n_layers:
            break
        step = n_layers / n
        out.append((f"spread-{n}", tuple(sorted({int(step * i + step / 2) for i in range(n)}))))
    return out


# Prices one placement: (matrices label, layer rule, layers, units, rank) → a Candidate.
Pricer = Callable[[str, str, Sequence[int], Sequence[UnitRow], int], Candidate]


@dataclasses.dataclass(frozen=True)
class Search:
    """The priced candidates of one card, with the reference's costs for relative budgets.

    ``price`` prices a placement outside the grid (another selector's) exactly as the grid was priced.
    """

    card: Card
    candidates: tuple[Candidate, ...]
    reference: dict[str, float]
    price: Pricer | None = dataclasses.field(default=None, compare=False, repr=False)
    # The highest rank the quality model has evidence for: the recommendation, a target and the frontier
    # consider no candidate above it (a fixed rule still may, at the rank a plan of it starts from).
    max_rank: int | None = None
    # The smallest parameter share it has evidence for: no prediction below it is relied on, a fixed rule's
    # included (a target would otherwise be "reached" by an extrapolation).
    min_params_share: float | None = None
    # The card's roles where it lacks a linear role, so that the reference is those roles at rank 8 rather
    # than every linear module; None where the reference is every linear module.
    reference_roles: tuple[str, ...] | None = None

    def in_evidence(self, c: Candidate) -> bool:
        """Whether ``c`` holds at least the smallest parameter share the quality model was fitted on."""
        floor = self.min_params_share
        return floor is None or c.costs["params"] >= floor * self.reference["params"] * (1 - 1e-9)

    def supported(self, c: Candidate) -> bool:
        """Whether the quality model's prediction of ``c`` is within the ranks and sizes it was fitted on."""
        return self.outside(c) is None

    def outside(self, c: Candidate) -> str | None:
        """Why the quality model's prediction of ``c`` lies outside the ranks and sizes it was fitted on, or
        None where it does not."""
        if self.max_rank is not None and c.rank > self.max_rank:
            return f"rank {c.rank} is above the highest it was fitted on, {self.max_rank}"
        if not self.in_evidence(c):
            share = c.costs["params"] / self.reference["params"]
            return (
                f"{share:.3g}x the reference's parameters is below the smallest placement it was fitted on, "
                f"{self.min_params_share:g}x"
            )
        return None

    def _caps(self, budgets: Sequence[Budget]) -> list[tuple[str, float]]:
        for b in budgets:
            if b.kind not in self.reference:
                raise LayercardError(
                    f"budget {b.label}: the card's cost model does not give {b.kind} (measure the card with "
                    f"{card_setting_text('calibrate')})"
                )
        return [(b.kind, b.cap(self.reference)) for b in budgets]

    def fits(self, c: Candidate, budgets: Sequence[Budget]) -> bool:
        """Whether ``c`` (from the grid or not) meets every budget."""
        return all(c.costs[k] <= cap * (1 + 1e-9) for k, cap in self._caps(budgets))

    def fitting(self, budgets: Sequence[Budget]) -> list[Candidate]:
        caps = self._caps(budgets)
        return [c for c in self.candidates if all(c.costs[k] <= cap * (1 + 1e-9) for k, cap in caps)]

    def recommend(self, budgets: Sequence[Budget]) -> Candidate:
        """The highest predicted quality within every budget; predictions equal to six decimals go to
        fewer parameters (any larger predicted gain is taken: docs/design.md §6)."""
        best = self.best(budgets)
        if best is None:
            raise LayercardError(
                f"budgets {', '.join(b.label for b in budgets)}: no placement fits; "
                + self._why_none(budgets)
            )
        return best

    def _why_none(self, budgets: Sequence[Budget]) -> str:
        """Why no placement fits ``budgets``: the least each budgeted cost reaches, or, where each budget
        alone is met, that they are not met together."""
        supported = [c for c in self.candidates if self.supported(c)]
        if len(budgets) > 1 and all(any(self.fits(c, [b]) for c in supported) for b in budgets):
            return "each is met alone by some placement the search priced, but none meets them together"
        return (
            "the least the search priced: " + self._lowest(budgets) + self._floor_note(self.fitting(budgets))
        )

    def best(
        self, budgets: Sequence[Budget], where: Callable[[Candidate], bool] | None = None
    ) -> Candidate | None:
        """:meth:`recommend`'s pick among the candidates ``where`` keeps; None where none fits."""
        ok = [c for c in self.fitting(budgets) if self.supported(c) and (where is None or where(c))]
        return max(ok, key=lambda c: (round(c.quality, 6), -c.costs["params"]), default=None)

    def _floor_note(self, fitting: Sequence[Candidate]) -> str:
        """Why placements that fit were left out, when the quality model's size floor is the reason."""
        if any(not self.in_evidence(c) for c in fitting):
            return (
                f" (placements below {self.min_params_share:g}x the reference's parameters fit but are not "
                "considered: the quality model was fitted on none that small)"
            )
        return ""

    def _lowest(self, budgets: Sequence[Budget]) -> str:
        """Each budgeted cost's lowest value over the candidates, absolute and relative to the reference, so
        that a budget no placement fits says how far it is from one that does."""
        supported = [c for c in self.candidates if self.supported(c)]
        parts = []
        for kind in dict.fromkeys(b.kind for b in budgets):
            low = min(c.costs[kind] for c in supported)
            ref = self.reference[kind]
            # rounded up as shown: the least quoted, given back as a budget, fits
            rel = f" ({at_least(low / ref, 3):.3g}x)" if ref > 0 else ""
            parts.append(f"{kind}={amount(low, kind, unit=False, up=True)}{unit_suffix(kind)}{rel}")
        return ", ".join(parts)

    def frontier(self, kind: str, within: Sequence[Budget] = ()) -> list[Candidate]:
        """Candidates no other beats on both predicted quality and the cost ``kind`` (cheapest first), among
        those that meet the budgets ``within`` (a plan's budgets on its other costs)."""
        if kind not in self.reference:
            raise LayercardError(f"frontier: cost {kind!r} is not known for this card")
        best: list[Candidate] = []
        pool = self.fitting(within) if within else self.candidates
        supported = [c for c in pool if self.supported(c)]
        for c in sorted(supported, key=lambda c: (c.costs[kind], -c.quality)):
            if not best or c.quality > best[-1].quality + 1e-12:
                best.append(c)
        return best

    def cheapest(
        self,
        target: float,
        kind: str,
        budgets: Sequence[Budget] = (),
        where: Callable[[Candidate], bool] | None = None,
    ) -> Candidate:
        """The lowest-``kind``-cost candidate within the budgets (among those ``where`` keeps) predicted to
        reach ``target`` (ties go to the higher predicted quality)."""
        if kind not in self.reference:
            # the first budget's kind prices a target, so this is the budget path's missing cost
            raise LayercardError(
                f"target {target:g}: priced in {kind}, which the card's cost model does not give "
                f"(measure the card with {card_setting_text('calibrate')})"
            )
        fitting = [c for c in self.fitting(budgets) if where is None or where(c)]
        allowed = [c for c in fitting if self.supported(c)]
        ok = [c for c in allowed if c.quality >= target]
        if not ok:
            best = max((c.quality for c in allowed), default=None)
            within = f" within {', '.join(b.label for b in budgets)}" if budgets else ""
            raise LayercardError(
                f"target {target:g}: no placement{within} is predicted to reach it"
                # rounded down: a best just under the target must not print as reaching it
                + (
                    ""
                    if best is None
                    else f" (the best is predicted at {math.floor(best * 1000) / 1000:.3f})"
                )
                + (self._floor_note(fitting) if not allowed else "")
            )
        return min(ok, key=lambda c: (c.costs[kind], -c.quality))

    def family(self, rule: str, rank: int = RULE_RANK) -> list[Candidate]:
        """The placements a practitioners' rule can produce, in the order its users step down:
        ``peft-default`` and ``all-linear`` from ``rank`` down, ``last-n`` (rank 8) from the most layers."""
        by_key = {(c.matrices, c.layer_rule, c.rank): c for c in self.candidates}
        if rule in ("peft-default", "all-linear"):
            matrices = "q,v" if rule == "peft-default" else "all-linear"
            keys = [(matrices, "all", r) for r in sorted(RANKS, reverse=True) if r <= rank]
        elif rule == "last-n":
            n_layers = self.card.n_layers
            keys = [
                ("all-linear", "all" if n == n_layers else f"last-{n}", RULE_RANK)
                for n in range(n_layers, 0, -1)
            ]
        else:
            raise LayercardError(f"unknown rule {rule!r}; valid: peft-default, all-linear, last-n")
        return [by_key[k] for k in keys if k in by_key]

    def default_rule(self, rule: str, budgets: Sequence[Budget], rank: int = RULE_RANK) -> Candidate | None:
        """A practitioners' rule fitted to the budgets as its users would fit it (the rank lowered from
        ``rank``, or the layers from all), or None if nothing fits."""
        ok = {id(c) for c in self.fitting(budgets)}
        return next((c for c in self.family(rule, rank) if id(c) in ok), None)

    def default_rule_for(
        self, rule: str, target: float, kind: str, budgets: Sequence[Budget] = ()
    ) -> Candidate | None:
        """The cheapest placement of a rule predicted to reach ``target`` within the budgets, or None (at any
        rank of the grid: a practitioner after a target raises the rank as readily as lowers it)."""
        ok = {id(c) for c in self.fitting(budgets)}
        reach = [
            c
            for c in self.family(rule, max(RANKS))
            if id(c) in ok and c.quality >= target and self.in_evidence(c)
        ]
        return min(reach, key=lambda c: (c.costs[kind], -c.quality), default=None)


def search(
    card: Card,
    *,
    predict: Callable[[Q.Features], float],
    error: Callable[[Q.Features], float | None] | None = None,
    costs: Callable[[Sequence[UnitRow], Sequence[int]], dict[str, float]] | None = None,
    ranks: Sequence[int] = RANKS,
    max_rank: int | None = None,
    min_params_share: float | None = None,
) -> Search:
    """Price every candidate of the card: quality from ``predict`` (its expected error from ``error`` where
    given); parameters and modules from the units; the measured kinds (``step_time``, ``memory``,
    ``forward_s``) from ``costs`` where given."""
    by_layer: dict[int, list[UnitRow]] = {}
    for u in card.units:
        by_layer.setdefault(u.layer, []).append(u)
    basis = Q.Basis(card)  # the reference's sums, once for every candidate

    def price(matrices: str, rule: str, layers: Sequence[int], units: Sequence[UnitRow], r: int) -> Candidate:
        ranks_map = {u.key: r for u in units}
        priced = {
            "params": float(sum(r * (u.d_in + u.d_out) for u in units)),
            "modules": float(len(units)),
        }
        if costs is not None:
            priced.update(costs(units, [r] * len(units)))
        f = basis.features(ranks_map)
        err = error(f) if error is not None else None
        return Candidate(matrices, tuple(layers), rule, r, predict(f), priced, tuple(ranks_map.items()), err)

    out: list[Candidate] = []
    reference: dict[str, float] | None = None
    reference_roles: tuple[str, ...] | None = None
    seen: set[frozenset[str]] = set()
    for mname, roles in MATRICES.items():
        # A set takes the units the card has of it (a fused q,k,v module for q,v; up and down where a model
        # has no gate); a set that adapts the same modules as an earlier one is left out.
        picked = frozenset(u.role for u in card.selected_units(roles))
        if not picked or picked in seen:
            continue
        seen.add(picked)
        for rule, layers in layer_sets(card.n_layers):
            units = [u for layer in layers for u in by_layer.get(layer, ()) if u.role in picked]
            if not units:
                continue
            for r in ranks:
                c = price(mname, rule, layers, units, r)
                out.append(c)
                if mname == "all-linear" and rule == "all" and r == Q.REFERENCE_RANK:
                    reference = dict(c.costs)
    if reference is None:
        # A card without every linear role: its own units at rank 8 are the reference.
        units = list(card.units)
        reference_roles = tuple(card.roles)
        reference = {
            "params": float(sum(Q.REFERENCE_RANK * (u.d_in + u.d_out) for u in units)),
            "modules": float(len(units)),
        }
        if costs is not None:
            reference.update(costs(units, [Q.REFERENCE_RANK] * len(units)))
    if not out:
        raise LayercardError("search: the card has no units of any matrix set (q,v, attention, mlp)")
    return Search(card, tuple(out), reference, price, max_rank, min_params_share, reference_roles)


def over_budget(row: dict[str, Any], budgets: Sequence[str], reference: dict[str, float]) -> list[str]:
    """The budgets (as plan.json writes them) that a :func:`summary_row` exceeds."""
    out = []
    for text in budgets:
        b = Budget.parse(text)
        if b.kind in row and row[b.kind] > b.cap(reference) * (1 + 1e-9):
            out.append(text)
    return out


def summary_row(c: Candidate, reference: dict[str, float]) -> dict[str, Any]:
    """A JSON row of a candidate: what, predicted quality, costs absolute and relative to the reference.
    Quality is kept whole: the frontier is ordered, and the recommendation's ties judged (to six decimals),
    on it, and plan.json should let both be checked from the file itself."""
    return {
        "matrices": c.matrices,
        "layers": c.layer_rule,
        "rank": c.rank,
        "quality": c.quality,
        **({} if c.error is None else {"error": round(c.error, 4)}),
        **c.costs,
        **{f"{k}_x": round(v / reference[k], 4) for k, v in c.costs.items() if reference.get(k)},
    }
