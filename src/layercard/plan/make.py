"""make_plan: a Layer Card and a :class:`PlanConfig` to a :class:`Plan`.

Each policy picks a layer set S; the plan then records the predicted set gain (§4), the costs (§5), the
rank of every adapted module and a ready PEFT ``LoraConfig`` whose keys are full module paths.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from layercard.card.artifact import SCORES, Card, UnitRow
from layercard.config import SEARCH_POLICIES, PlanConfig
from layercard.errors import LayercardError, card_setting_text, expect, setting_name
from layercard.plan.artifact import Plan, PlannedUnit
from layercard.plan.policies import select
from layercard.plan.predict import card_summary, caveats, predicted, provenance, unit_rank
from layercard.plan.ranks import auto_ranks, captured_at, lora_config
from layercard.plan.recommend import search_plan
from layercard.plan.space import (
    ADAPTERS_PER_LAYER,
    AUTO_REFERENCE_RANK,
    Space,
    amount,
    budget_text,
    build_space,
    fits,
    priced_at,
)


@dataclasses.dataclass(frozen=True)
class _Placement:
    """The adapted units of a layer set with their configs, parameter count and captured gain."""

    units: list[PlannedUnit]
    lora_config: dict[str, Any] | None
    adapter_config: dict[str, Any] | None
    params: int
    captured: float | None


def make_plan(card: Card | str | os.PathLike[str], cfg: PlanConfig, *, card_path: str | None = None) -> Plan:
    """Choose layers (and ranks) for ``cfg.policy`` under the budget; see the module docstring.

    ``card``: a :class:`Card` or the path of a card.json; ``cfg``: the plan's settings, e.g.
    ``PlanConfig(budget="params=0.2x")``; ``card_path``: what the plan records as its card's file.
    """
    if isinstance(card, (str, os.PathLike)):
        card_path = card_path or str(card)
        card = Card.load(card)
    expect("make_plan", "card", card, Card, wanted="a Card or a card.json path")
    expect("make_plan", "cfg", cfg, PlanConfig, "such as PlanConfig(budget='params=0.2x')")
    card = priced_at(card, cfg.batch_size, cfg.step_positions, cfg.peak_positions, cfg.grad_accum)
    if cfg.policy in SEARCH_POLICIES:  # matrices × layers × rank, with the quality model
        return search_plan(card, cfg, card_path=card_path)
    from layercard.cost import memory_figure

    t0 = time.perf_counter()
    roles, score = _roles_and_score(card, cfg)
    figure = memory_figure(card.cost, cfg.memory_figure)
    space, notes = build_space(
        card, roles, score, kind=cfg.kind, unit_rank=unit_rank(cfg.rank), memory_figure=figure
    )
    warn: list[str] = []
    if card.coupling is None and cfg.policy == "card":
        warn.append(
            "policy card: the card has no coupling matrix, so set gains assume independent layers "
            f"(measure the card with {card_setting_text('coupling')})"
        )
    warn += notes
    layers, sel_notes = select(space, cfg, _goal(space, cfg, score))
    warn += sel_notes
    placement = _place(space, cfg, layers)
    pred = predicted(space, layers, score, placement.params, placement.captured)
    if cfg.budget is not None:
        pred["budget"] = str(cfg.budget)
        used = placement.params if cfg.budget.kind == "params" else space.cost(layers, cfg.budget.kind)
        pred["budget_used"] = used
    if cfg.target is not None:
        pred["target"] = cfg.target
    warn += caveats(card, cfg.kind, cfg.dropout, pred, score)
    warn += _past_width(card, placement.units) if cfg.kind == "lora" else []
    # Every policy but `all` must respect its budget; a violation here is a planner bug, never silenced.
    if cfg.budget is not None and cfg.policy != "all":
        used = pred["budget_used"]
        if not fits(float(used), cfg.budget.value):
            raise LayercardError(
                f"plan: policy {cfg.policy} exceeded the {budget_text(cfg.budget)} "
                f"({amount(float(used), cfg.budget.kind)})"
            )
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
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "step_positions": cfg.step_positions,
        "peak_positions": cfg.peak_positions,
        "memory_figure": figure,
    }
    return Plan(
        provenance=provenance(card, config, t0),
        card=card_summary(card, card_path),
        config=config,
        kind=cfg.kind,
        units=placement.units,
        layers=sorted(int(x) for x in layers),
        predicted=pred,
        lora_config=placement.lora_config,
        adapter_config=placement.adapter_config,
        warnings=warn,
    )


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def _roles_and_score(card: Card, cfg: PlanConfig) -> tuple[tuple[str, ...], str]:
    """The roles and score to plan on; refuses a step-time budget the card cannot cost."""
    from layercard.models import explicit_roles, parse_roles

    if cfg.roles is None:
        roles = tuple(card.roles)
    else:
        # a role set takes the roles the card measured; a role named one by one must be there (checked
        # when the units are gathered)
        covered = card.covered_roles()
        explicit = explicit_roles(cfg.roles)
        roles = tuple(r for r in parse_roles(cfg.roles) if r in covered or r in explicit)
        if not roles:  # e.g. 'mlp' on an MoE model, whose experts are no units
            raise LayercardError(
                f"roles {cfg.roles!r}: the card measured {','.join(card.roles)}, none of "
                f"{','.join(parse_roles(cfg.roles))}"
            )
    score = cfg.score or card.default_score
    if score not in SCORES:
        raise LayercardError(f"card default_score {score!r} unknown; valid: {', '.join(SCORES)}")
    kind = cfg.budget.kind if cfg.budget is not None else None
    if kind in ("step_time", "memory") and card.cost is None:
        raise LayercardError(
            f"budget {kind}: the card has no cost model; measure the card with "
            f"{card_setting_text('calibrate')} to time short LoRA runs"
        )
    if kind == "memory" and card.cost.get("memory_base_mib") is None:  # type: ignore[union-attr]
        raise LayercardError(
            "budget memory: the card's cost model did not measure peak memory (an older card, or a system "
            f"without a per-run peak); measure the card with {card_setting_text('calibrate')} again"
        )
    return roles, score


def _goal(space: Space, cfg: PlanConfig, score: str) -> float | None:
    """The predicted gain a target fraction asks for (None without a target)."""
    if cfg.target is None:
        return None
    all_gain = space.gain(space.layers)
    if all_gain <= 0:
        raise LayercardError(
            f"target {cfg.target}: every layer's predicted gain under score {score!r} is ≤ 0; "
            f"choose another {setting_name('score')}"
        )
    return cfg.target * all_gain


def _place(space: Space, cfg: PlanConfig, layers: list[int]) -> _Placement:
    """Ranks and planned units of the chosen layers, with the PEFT LoraConfig or the adapter config."""
    if cfg.kind == "lora":
        chosen: list[UnitRow] = [u for layer in layers for u in space.units[layer]]
        if cfg.rank == "auto":
            if cfg.budget is not None and cfg.budget.kind == "params":
                pb = cfg.budget.value
            else:  # no parameter budget: spend what uniform rank 8 would on the chosen modules
                pb = float(sum(AUTO_REFERENCE_RANK * (u.d_in + u.d_out) for u in chosen))
            ranks = auto_ranks(chosen, pb)
        else:
            ranks = {u.key: int(cfg.rank) for u in chosen}
        planned = [PlannedUnit(u.key, u.layer, u.role, u.name, ranks[u.key]) for u in chosen]
        return _Placement(
            units=planned,
            lora_config=lora_config(
                planned, cfg.alpha, cfg.dropout, module_kinds=[u.module_kind for u in chosen]
            ),
            adapter_config=None,
            params=sum(p.rank * (u.d_in + u.d_out) for p, u in zip(planned, chosen, strict=True)),
            captured=float(sum(captured_at(u, ranks[u.key]) for u in chosen)),
        )
    planned = [
        PlannedUnit(f"{layer}.{cfg.kind}", layer, cfg.kind, _layer_path(space.units[layer][0]), int(cfg.rank))
        for layer in layers
    ]
    adapter = {
        "kind": cfg.kind,
        "bottleneck": int(cfg.rank),
        "layers": list(layers),
        "adapters_per_layer": ADAPTERS_PER_LAYER,
        "d_model": space.d_model(),
    }
    return _Placement(planned, None, adapter, int(space.cost(layers, "params")), None)


def _layer_path(unit: UnitRow) -> str:
    """``model.layers.3`` from ``model.layers.3.self_attn.q_proj``."""
    marker = f".{unit.layer}."
    i = unit.name.find(marker)
    if i < 0:
        raise LayercardError(f"unit {unit.key}: cannot find layer {unit.layer} in module path {unit.name!r}")
    return unit.name[: i + len(marker) - 1]


def _past_width(card: Card, units: Sequence[PlannedUnit]) -> list[str]:
    """A line where planned ranks exceed their modules' width: parameters that add no capacity."""
    rows = {u.key: u for u in card.units}
    wide = [u for u in units if u.key in rows and u.rank > min(rows[u.key].d_in, rows[u.key].d_out)]
    if not wide:
        return []
    row = rows[wide[0].key]
    return [
        f"rank: {len(wide)} of {len(units)} planned modules have a rank above their width ({wide[0].key} at "
        f"rank {wide[0].rank}, {row.d_in}→{row.d_out}); a LoRA of rank r > min(d_in, d_out) adds parameters "
        "but no capacity"
    ]
