"""The planning space: candidate layers, their gains, the layer coupling and the costs (docs/design.md §4–§6).

A *layer* is the planning unit: choosing layer ℓ adapts every unit of the chosen roles in ℓ.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from layercard.card import stats
from layercard.card.artifact import Card, UnitRow
from layercard.config.budget import grouped, unit_suffix
from layercard.errors import LayercardError, card_setting_text

# Rank used to cost layer selection when ranks are allocated afterwards ("auto"): the uniform reference.
AUTO_REFERENCE_RANK = 8
# Bottleneck adapters per decoder layer for houlsby/parallel (one per sublayer: attention and MLP).
ADAPTERS_PER_LAYER = 2
REL_TOL = 1e-9  # budgets are compared with a relative tolerance so float step times do not flicker


@dataclasses.dataclass(frozen=True)
class Space:
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
    memory_figure: str = "window"  # which peak a memory budget reads (layercard.cost.memory_figure)

    def gain(self, layers: Sequence[int], *, coupled: bool = True) -> float:
        """Predicted set gain of ``layers`` (§4); ``coupled=False`` treats the layers as independent."""
        s = list(layers)
        if not s:
            return 0.0
        c = self.coupling[np.ix_(s, s)] if coupled else np.eye(len(s))
        return stats.set_gain(self.gains[s], c)

    def additive_gain(self, layers: Sequence[int]) -> float:
        """Sum of the positive single-layer gains."""
        return float(np.clip(self.gains[list(layers)], 0.0, None).sum()) if layers else 0.0

    def redundancy(self, layers: Sequence[int]) -> float:
        """ρ(S) of the layers' coupling."""
        s = list(layers)
        return stats.redundancy(self.coupling[np.ix_(s, s)]) if s else 0.0

    def layer_params(self, layer: int) -> int:
        """Trainable parameters of adapting one layer at ``unit_rank``."""
        if self.kind == "lora":
            return sum(self.unit_rank * (u.d_in + u.d_out) for u in self.units[layer])
        d = self.d_model()
        # Down d→b and up b→d projections with biases, per adapter: what train builds.
        return ADAPTERS_PER_LAYER * (2 * d * self.unit_rank + self.unit_rank + d)

    def d_model(self) -> int:
        """The residual stream's width, which bottleneck adapters read and write: the card's, else what an
        o or down projection writes or another role reads (a down projection reads the MLP's width)."""
        if self.card.model.get("d_model"):
            return int(self.card.model["d_model"])
        for u in (u for rows in self.units.values() for u in rows):
            if u.role in ("o", "down"):
                return int(u.d_out)
        return int(next(u.d_in for rows in self.units.values() for u in rows))

    def modules(self, layers: Sequence[int]) -> int:
        """Adapted modules (LoRA) or adapters (houlsby/parallel) of a layer set."""
        if self.kind == "lora":
            return sum(len(self.units[layer]) for layer in layers)
        return ADAPTERS_PER_LAYER * len(layers)

    def input_width(self, layers: Sequence[int]) -> int | None:
        """Σ d_in over the adapted modules of a layer set (LoRA; None for bottleneck adapters)."""
        if self.kind != "lora":
            return None
        return sum(u.d_in for layer in layers for u in self.units[layer])

    def width(self, layers: Sequence[int]) -> int | None:
        """Σ (d_in + d_out) over the adapted modules of a layer set (LoRA; None for bottleneck adapters)."""
        if self.kind != "lora":
            return None
        return sum(u.d_in + u.d_out for layer in layers for u in self.units[layer])

    def _params(self, layers: Sequence[int], params: int | None) -> int:
        """The adapter parameters a LoRA placement of ``layers`` prices: ``params`` where its ranks are
        not the uniform rank (rank auto), else every module at it; 0 for other kinds."""
        if self.kind != "lora":
            return 0
        return int(params) if params is not None else int(sum(self.layer_params(layer) for layer in layers))

    def step_time(self, layers: Sequence[int], params: int | None = None) -> float | None:
        """Predicted seconds per step (§5), or None without a cost model (``params``: see :meth:`_params`)."""
        if self.cost_model is None:
            return None
        params = self._params(layers, params)
        modules, width = self.modules(layers), self.width(layers)
        return float(self.cost_model.step_time(list(layers), modules, params, width))

    def forward_time(self, layers: Sequence[int]) -> float | None:
        """Predicted seconds of one unmerged no-grad forward (§5), or None where the card did not time it."""
        if self.cost_model is None:
            return None
        return self.cost_model.forward_time(self.modules(layers))

    def memory(self, layers: Sequence[int], params: int | None = None) -> dict[str, Any] | None:
        """Predicted peak training memory and its activation part (MiB, §5), or None if not measured."""
        if self.cost_model is None:
            return None
        params = self._params(layers, params)
        return self.cost_model.memory(list(layers), self.modules(layers), params, self.input_width(layers))

    def cost(self, layers: Sequence[int], kind: str) -> float:
        """Cost of a layer set in a budget kind's unit (step time is non-additive: it depends on min S)."""
        if kind == "layers":
            return float(len(layers))
        if kind == "modules":
            return float(self.modules(layers))
        if kind == "params":
            return float(sum(self.layer_params(layer) for layer in layers))
        if kind == "memory":
            m = self.memory(layers)
            if m is None:  # guarded in make_plan; kept so a misuse never silently costs 0
                raise LayercardError("budget memory: the card's cost model did not measure memory")
            from layercard.cost import peak_of

            return float(peak_of(m, self.memory_figure))  # type: ignore[arg-type]
        t = self.step_time(layers)
        if t is None:  # guarded in make_plan; kept so a misuse never silently costs 0
            raise LayercardError("budget step_time: the card has no cost model")
        return t


def fits(cost: float, cap: float | None) -> bool:
    """Whether ``cost`` is within ``cap`` (None: no cap), with the budget tolerance."""
    return cap is None or cost <= cap * (1 + REL_TOL) + 1e-12


def fmt(x: float) -> str:
    return f"{x:.4g}"


def amount(x: float, kind: str, *, unit: bool = True, up: bool = False) -> str:
    """A cost as messages show it: ``0.44 s``, ``12,288 params``, ``3 layers``; without ``unit`` (a table
    whose header names it) the number alone. ``up``: rounded up at the precision shown, for a least cost a
    message quotes, which given back as a budget then fits."""
    if kind == "step_time":
        text, name = f"{at_least(x, 3) if up else x:.3g}", "s"
    elif kind == "memory":
        text, name = f"{math.ceil(x - 1e-9) if up else x:,.0f}", "MiB"
    else:
        whole = float(x).is_integer()
        text, name = (f"{int(x):,}" if whole else f"{at_least(x, 4) if up else x:.4g}"), kind
    return f"{text} {name}" if unit else text


def at_least(x: float, digits: int) -> float:
    """``x`` rounded up to ``digits`` significant digits (exact values kept)."""
    if not math.isfinite(x) or x <= 0:
        return x
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / step - 1e-9) * step


def budget_text(budget: Any) -> str:
    """A budget as messages show it, its unit included (``budget step_time=0.44 s``); "no budget" for None."""
    return "no budget" if budget is None else f"budget {budget_label(str(budget))}"


def budget_label(text: str) -> str:
    """Budgets as plan.json records them (``step_time=0.44,memory=600``), each with its unit for display
    (``step_time=0.44 s, memory=600 MiB``)."""
    parts = []
    for part in str(text).split(","):
        unit = "" if part.endswith("x") else unit_suffix(part.split("=")[0])
        parts.append(grouped(part) + unit)
    return ", ".join(parts)


def build_space(
    card: Card,
    roles: tuple[str, ...],
    score: str,
    *,
    kind: str,
    unit_rank: int,
    memory_figure: str = "window",
) -> tuple[Space, list[str]]:
    """The space of ``roles`` in ``card`` scored by ``score``, and notes on approximations it makes; a memory
    budget reads the peak by ``memory_figure``."""
    by_layer = _units_by_layer(card, roles)
    coupling, notes = _coupling(card, roles, by_layer)
    cost_model = None
    if card.cost is not None:
        from layercard.cost import CostModel

        cost_model = CostModel.from_dict(card.cost)
    space = Space(
        card=card,
        roles=roles,
        layers=tuple(sorted(by_layer)),
        units={k: tuple(v) for k, v in by_layer.items()},
        gains=np.asarray(card.layer_scores(score, roles=roles), dtype=np.float64),
        coupling=coupling,
        cost_model=cost_model,
        kind=kind,
        unit_rank=unit_rank,
        memory_figure=memory_figure,
    )
    return space, notes


def _units_by_layer(card: Card, roles: tuple[str, ...]) -> dict[int, list[UnitRow]]:
    covered = card.covered_roles()
    missing = [r for r in roles if r not in covered]
    if missing:
        raise LayercardError(
            f"roles: the card measured {','.join(card.roles)}; it has no units for {','.join(missing)} "
            f"(measure the card with {card_setting_text('roles', ','.join([*card.roles, *missing]))})"
        )
    by_layer: dict[int, list[UnitRow]] = {}
    for u in card.selected_units(roles):
        by_layer.setdefault(u.layer, []).append(u)
    if not by_layer:
        raise LayercardError(f"roles {','.join(roles)}: the card has no units for them")
    return by_layer


def _coupling(
    card: Card, roles: tuple[str, ...], by_layer: dict[int, list[UnitRow]]
) -> tuple[np.ndarray, list[str]]:
    """The L × L layer coupling (identity where the card measured none) and notes on its use."""
    notes: list[str] = []
    coupling = np.eye(card.n_layers)
    if card.coupling is None:
        return coupling, notes
    if card.coupling.get("level", "layer") != "layer":
        raise LayercardError(f"card coupling level {card.coupling.get('level')!r}: the planner reads 'layer'")
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
    return coupling, notes


def at_batch(card: Card, rows: int | None) -> Card:
    """``card`` with its cost model priced at ``rows`` sequences per micro-batch (None, or a card without a
    cost model: unchanged); see ``CostModel.at_batch``."""
    if rows is None or card.cost is None:
        return card
    from layercard.cost import CostModel

    return dataclasses.replace(card, cost=CostModel.from_dict(card.cost).at_batch(rows).to_dict())


def at_positions(card: Card, step: float | None, peak: float | None, micro_batches: int = 1) -> Card:
    """``card`` with its cost model priced at ``step`` padded positions per step of ``micro_batches``
    micro-batches and a largest micro-batch of ``peak`` (None: its own; a card without a cost model:
    unchanged); see ``CostModel.at_positions``."""
    if (step is None and peak is None and micro_batches == 1) or card.cost is None:
        return card
    from layercard.cost import CostModel

    moved = CostModel.from_dict(card.cost).at_positions(step, peak, micro_batches)
    return dataclasses.replace(card, cost=moved.to_dict())


def priced_at(
    card: Card, rows: int | None, step: float | None, peak: float | None, micro_batches: int | None
) -> Card:
    """``card`` with its cost model priced at a plan's batches: ``rows`` sequences per micro-batch, then
    ``step`` and ``peak`` padded positions over ``micro_batches`` micro-batches (see :func:`at_batch` and
    :func:`at_positions`)."""
    return at_positions(at_batch(card, rows), step, peak, micro_batches or 1)
