"""The recommendation (docs/design.md §6) as a :class:`Plan`: the best predicted placement within the user's
budgets, compared with the practitioners' fixed rules fitted to the same budgets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from layercard.card.artifact import Card, UnitRow
from layercard.errors import LayercardError
from layercard.plan import frontier as F
from layercard.plan import quality as Q
from layercard.plan.artifact import Plan, PlannedUnit
from layercard.plan.predict import card_summary, provenance
from layercard.plan.ranks import lora_config

RULES = ("peft-default", "all-linear", "last-n")


def _step_time_fn(card: Card) -> Any:
    if card.cost is None:
        return None
    from layercard.cost import CostModel

    cm = CostModel.from_dict(card.cost)

    def step_time(units: Sequence[UnitRow], ranks: Sequence[int]) -> float:
        params = sum(r * (u.d_in + u.d_out) for u, r in zip(units, ranks, strict=True))
        return cm.step_time([u.layer for u in units], len(units), params)

    return step_time


def price(card: Card, model: Q.QualityModel | None = None) -> F.Search:
    """Every candidate of the card, priced with the quality model and the card's cost model."""
    model = model or Q.default_model()
    return F.search(card, predict=model.predict, step_time=_step_time_fn(card))


def sentence(rec: F.Candidate, defaults: dict[str, F.Candidate | None], error: float) -> str:
    """One sentence: what the recommendation is predicted to gain over the best fixed rule in budget."""
    fitted = {k: v for k, v in defaults.items() if v is not None}
    if not fitted:
        return (
            f"{rec.label} is predicted to reach {100 * rec.quality:.0f}% of the reference's loss drop "
            f"(±{100 * error:.0f} points); no practitioners' default fits these budgets."
        )
    name, best = max(fitted.items(), key=lambda kv: kv[1].quality)
    diff = 100 * (rec.quality - best.quality)
    if abs(diff) <= 100 * error:
        verdict = "within the model's error of it, so the difference is not a prediction to rely on"
    else:
        verdict = f"{diff:+.0f} points"
    return (
        f"{rec.label}: predicted {100 * rec.quality:.0f}% of the reference's loss drop against "
        f"{100 * best.quality:.0f}% for {name} ({best.label}) at the same budgets: {verdict} "
        f"(expected error ±{100 * error:.0f} points)."
    )


def recommend(
    card: Card,
    budgets: Sequence[F.RelBudget],
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    card_path: str | None = None,
    model: Q.QualityModel | None = None,
) -> Plan:
    """The plan of the best predicted placement within ``budgets`` (all of them), with the frontier."""
    t0 = time.perf_counter()
    if not budgets:
        raise LayercardError("policy recommend: give at least one budget, e.g. params=0.25x")
    model = model or Q.default_model()
    search = price(card, model)
    rec = search.recommend(budgets)
    defaults = {rule: search.default_rule(rule, budgets) for rule in RULES}
    by_key = {u.key: u for u in card.units}
    planned = [
        PlannedUnit(key, by_key[key].layer, by_key[key].role, by_key[key].name, rank)
        for key, rank in rec.units
    ]
    reference = search.reference
    frontier = {
        kind: [F.summary_row(c, reference) for c in search.frontier(kind)]
        for kind in sorted({b.kind for b in budgets} | {"params"})
        if kind in reference
    }
    pred: dict[str, Any] = {
        "quality": {
            "fraction": rec.quality,
            "expected_error": model.expected_error,
            "model": model.describe(),
        },
        "recommendation": sentence(rec, defaults, model.expected_error),
        "candidate": F.summary_row(rec, reference),
        "defaults": {
            k: (F.summary_row(v, reference) if v is not None else None) for k, v in defaults.items()
        },
        "frontier": frontier,
        "reference": reference,
        "budgets": [str(b) for b in budgets],
        "params": int(rec.costs["params"]),
        "all_layer_params": int(reference["params"]),
        "modules": int(rec.costs["modules"]),
        "n_layers": len(rec.layers),
        "step_time_s": rec.costs.get("step_time"),
        "all_layer_step_time_s": reference.get("step_time"),
        "fraction": rec.quality,
    }
    if card.cost is not None:  # the batch the step times refer to, so train can compare like with like
        pred["calibration_batch_size"] = card.cost.get("batch_size")
        pred["calibration_batch_tokens"] = card.cost.get("batch_tokens")
    config = {
        "policy": "recommend",
        "budget": ",".join(str(b) for b in budgets),
        "target": None,
        "roles": list(F.MATRICES[rec.matrices]),
        "rank": rec.rank,
        "alpha": alpha,
        "dropout": dropout,
        "score": model.score,
        "seed": 0,
        "kind": "lora",
        "bands": None,
    }
    return Plan(
        provenance=provenance(card, config, t0),
        card=card_summary(card, card_path),
        config=config,
        kind="lora",
        units=planned,
        layers=sorted({u.layer for u in planned}),
        predicted=pred,
        lora_config=lora_config(planned, alpha, dropout),
        adapter_config=None,
        warnings=[],
    )
