"""LoRA ranks: allocation from captured@r (``rank='auto'``) and the JSON form of the PEFT LoraConfig (§6)."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from layercard.card.artifact import UnitRow
from layercard.errors import LayercardError
from layercard.plan.space import REL_TOL


class RankedModule(Protocol):
    """A module path with its LoRA rank (a :class:`layercard.plan.PlannedUnit`)."""

    @property
    def name(self) -> str: ...

    @property
    def rank(self) -> int: ...


def captured_at(unit: UnitRow, rank: int) -> float:
    """captured@r, or at the largest measured rank ≤ r (a lower bound) when r was not measured."""
    return _at({int(k): float(v) for k, v in unit.captured.items()}, rank)


def _at(table: dict[int, float], rank: int) -> float:
    below = [k for k in table if k <= rank]
    return table[max(below)] if below else 0.0


def auto_ranks(units: Sequence[UnitRow], param_budget: float) -> dict[str, int]:
    """Allocate per-unit ranks from captured@r: start at the smallest rank, then repeatedly double the
    unit with the largest captured gain per added parameter while the doubling fits the budget (of
    equal ones, the first in ``units``)."""
    ranks: dict[str, int] = {}
    tables: list[dict[int, float]] = []
    for u in units:
        table = {int(k): float(v) for k, v in u.captured.items()}
        if not table:
            raise LayercardError(f"rank auto: unit {u.key} has no captured@r values in the card")
        tables.append(table)
        ranks[u.key] = min(table)
    used = sum(ranks[u.key] * (u.d_in + u.d_out) for u in units)
    cap = param_budget * (1 + REL_TOL)
    if used > cap:
        raise LayercardError(
            f"rank auto: {len(units)} modules at rank {min(ranks.values())} need {used} params, "
            f"over the budget of {param_budget:.0f} params"
        )

    def doubling(i: int) -> tuple[float, int] | None:
        """(−gain per added parameter, i) of doubling unit i's rank, or None where it gains nothing."""
        u, table = units[i], tables[i]
        r = ranks[u.key]
        # Ranks beyond min(d_in, d_out) or beyond the measured ranks capture nothing new.
        if 2 * r > min(u.d_in, u.d_out, max(table)):
            return None
        dc = _at(table, 2 * r) - _at(table, r)
        return (-dc / (r * (u.d_in + u.d_out)), i) if dc > 0 else None

    # Only the doubled unit's next step changes, and the parameters used only grow: a doubling that does
    # not fit now never will. A heap then finds each best doubling without rescanning every unit.
    heap = [d for d in (doubling(i) for i in range(len(units))) if d is not None]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        u = units[i]
        added = ranks[u.key] * (u.d_in + u.d_out)
        if used + added > cap:
            continue
        used += added
        ranks[u.key] *= 2
        if (d := doubling(i)) is not None:
            heapq.heappush(heap, d)
    return ranks


def lora_config(
    units: Sequence[RankedModule],
    alpha: float | None,
    dropout: float,
    *,
    module_kinds: Sequence[str | None] = (),
) -> dict[str, Any]:
    """JSON form of the PEFT LoraConfig: explicit full-path targets; patterns only where a rank differs.

    PEFT matches a ``rank_pattern`` key with ``re.match(rf"(.*\\.)?({key})$", name)``: a full module path
    can only hit that module (the optional prefix must end at a dot, and the key is anchored at the
    end), so layer 1's key cannot hit layer 11. check_plan verifies this on the real model.

    ``module_kinds`` (one per unit, as :attr:`layercard.models.UnitSpec.module_kind` says: ``"linear"``
    or ``"conv1d"``) sets ``fan_in_fan_out`` where every planned module is a Conv1D (GPT-2), which stores
    its weight as ``d_in × d_out``; PEFT would otherwise flip it per module with a warning.
    """
    counts = Counter(u.rank for u in units)
    r = max(counts, key=lambda k: (counts[k], k))  # the commonest rank needs no pattern entry
    rank_pattern = {u.name: u.rank for u in units if u.rank != r}
    if alpha is None:  # alpha = 2·rank per module keeps the scale alpha/r = 2 that the card assumed
        lora_alpha: float = 2 * r
        alpha_pattern = {u.name: 2 * u.rank for u in units if u.rank != r}
    else:
        lora_alpha, alpha_pattern = alpha, {}
    if module_kinds and len(module_kinds) != len(units):
        raise LayercardError(f"lora_config: {len(module_kinds)} module kinds for {len(units)} modules")
    config: dict[str, Any] = {
        "r": int(r),
        "lora_alpha": _num(lora_alpha),
        "lora_dropout": float(dropout),
        "target_modules": [u.name for u in units],
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if module_kinds and all(k == "conv1d" for k in module_kinds):
        config["fan_in_fan_out"] = True
    return config


def _num(x: float) -> int | float:
    return int(x) if float(x) == int(x) else float(x)
