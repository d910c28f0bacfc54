"""The recommendation (docs/design.md §6) as a :class:`Plan`: the best predicted placement within the user's
budgets, compared with the practitioners' fixed rules fitted to the same budgets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from layercard.card.artifact import Card, UnitRow
from layercard.config import Budget, PlanConfig
from layercard.config.budget import unit_suffix
from layercard.errors import LayercardError, card_setting_text, setting_text
from layercard.plan import frontier as F
from layercard.plan import quality as Q
from layercard.plan.artifact import Plan, PlannedUnit
from layercard.plan.predict import calibration_batch, card_summary, dropout_warnings, provenance
from layercard.plan.ranks import lora_config
from layercard.plan.space import amount, at_least

RULES = ("peft-default", "all-linear", "last-n")


def _costs_fn(card: Card, figure: str = "window") -> Any:
    """The measured cost kinds of a placement from the card's calibrated cost model (None without one),
    its peak memory by ``figure`` (:func:`layercard.cost.memory_figure`)."""
    if card.cost is None:
        return None
    from layercard.cost import CostModel

    cm = CostModel.from_dict(card.cost)
    by_figure = (cm.first_step_model() if figure == "first_step" else None) or cm

    def costs(units: Sequence[UnitRow], ranks: Sequence[int]) -> dict[str, float]:
        params = sum(r * (u.d_in + u.d_out) for u, r in zip(units, ranks, strict=True))
        layers = [u.layer for u in units]
        width = sum(u.d_in + u.d_out for u in units)
        out = {"step_time": cm.step_time(layers, len(units), params, width)}
        memory = by_figure.peak_memory(layers, len(units), params, sum(u.d_in for u in units))
        if memory is not None:
            out["memory"] = memory
        forward = cm.forward_time(len(units))
        if forward is not None:
            out["forward_s"] = forward
        return out

    return costs


def price(card: Card, model: Q.QualityModel | None = None, figure: str = "window") -> F.Search:
    """Every candidate of the card, priced with the quality model and the card's cost model (peak memory
    by ``figure``)."""
    model = model or Q.default_model()
    return F.search(
        card,
        predict=model.predict,
        error=model.error,
        costs=_costs_fn(card, figure),
        max_rank=model.max_rank,
        min_params_share=model.min_params_share,
    )


def _error_text(error: float | None) -> str:
    return "unknown" if error is None else f"±{100 * error:.0f} points"


def _gap(a: str, b: str) -> str:
    """The difference of two percents as :func:`_percents` shows them, at their precision, so that the
    sentence's arithmetic is the reader's (99% against 95%: +4, not the +5 of 99.46% and 94.96%)."""
    x, y = float(a.rstrip("%")), float(b.rstrip("%"))
    return f"{x - y:+.1f}" if "." in a else f"{x - y:+.0f}"


def _percents(*fractions: float) -> list[str]:
    """Fractions as whole percents, or all to one decimal where whole ones would mislead: two less than a
    point apart that differ at the decimal (99.6% and 99.4% read as 100% and 99%, a point apart), or one
    under 100% that would read as 100% (as reaching the reference)."""
    whole = [f"{100 * x:.0f}%" for x in fractions]
    tenths = [f"{100 * x:.1f}%" for x in fractions]
    close = any(
        abs(a - b) < 0.01 and ta != tb
        for i, (a, ta) in enumerate(zip(fractions, tenths, strict=True))
        for b, tb in zip(fractions[i + 1 :], tenths[i + 1 :], strict=True)
    )
    # under 100% yet read as 100% where a decimal shows it (99.96% reads 100.0% either way: left whole)
    under = any(
        x < 1 and w == "100%" and t != "100.0%" for x, w, t in zip(fractions, whole, tenths, strict=True)
    )
    return tenths if close or under else whole


# how a prediction outside the quality model's evidence is marked
OUTSIDE = "outside the range the quality model was fitted on"


def _inside(c: F.Candidate) -> str | None:
    return None


def beyond_error(rec: F.Candidate, other: F.Candidate) -> bool:
    """Whether ``rec``'s predicted quality differs from ``other``'s by more than the larger of the two
    placements' expected errors (never, where either error is unknown)."""
    if rec.error is None or other.error is None:
        return False
    return abs(rec.quality - other.quality) > max(rec.error, other.error)


def sentence(
    rec: F.Candidate,
    defaults: dict[str, F.Candidate | None],
    pick: F.Candidate | None = None,
    *,
    over_depth: bool = False,
    outside: Callable[[F.Candidate], str | None] = _inside,
    budgets: Sequence[Budget] = (),
) -> str:
    """One sentence: what the plan is predicted to gain over the best fixed rule within the same budgets.

    A difference is called one only where it exceeds the larger of the two predictions' expected errors,
    and never where either prediction is ``outside`` the quality model's evidence (its reason, else None);
    the rules inside it are compared first. ``pick``: the recommendation within the budgets, which a plan
    that is a fixed rule is set against; ``over_depth``: it was taken among placements over all the depth;
    ``budgets``: those the rules were fitted to (none: no rule was).
    """
    fitted = {k: v for k, v in defaults.items() if v is not None}
    err = _error_text(rec.error)
    rec_out = outside(rec)
    marked = f", a prediction {OUTSIDE} ({rec_out})" if rec_out else ""
    if not fitted:
        return (
            f"{rec.label} is predicted to reach {100 * rec.quality:.0f}% of the reference's loss drop "
            f"(expected error {err}){marked}; "
            + (
                f"none of the practitioners' defaults ({', '.join(defaults)}) fits {_labels(budgets)}."
                if budgets
                else "no practitioners' default was fitted to a budget."
            )
        )
    inside = {k: v for k, v in fitted.items() if outside(v) is None}
    name, best = max((inside or fitted).items(), key=lambda kv: kv[1].quality)
    same = [
        k
        for k, v in fitted.items()
        if (v.matrices, v.layer_rule, v.rank) == (rec.matrices, rec.layer_rule, rec.rank)
    ]
    scope = " over all the depth" if over_depth else ""
    if same:
        other = pick is not None and pick.units != rec.units
        rq, pq = _percents(rec.quality, pick.quality) if other else (f"{100 * rec.quality:.0f}%", "")
        head = (
            f"{rec.label}: this is the {' and the '.join(same)} rule{'s' if len(same) > 1 else ''} fitted to "
            f"these budgets; predicted {rq} of the reference's loss drop (expected error {err}){marked}"
        )
        if pick is None:
            return head + ("; the search has no placement within them inside that range." if rec_out else ".")
        if not other:
            return head + f", the most of any placement{scope} the search priced within them."
        if rec_out:
            gap = "no difference is called"
        elif beyond_error(pick, rec):
            gap = f"{_gap(pq, rq)} points"
        else:
            gap = "within the model's error of each other"
        return (
            f"{head}; the recommendation within them{scope}, {pick.label}, is predicted {pq} ({gap}; "
            f"expected error {_error_text(pick.error)})."
        )
    best_out = outside(best)
    verdict: str | None = None  # the difference, taken from the percents as shown
    if best_out:
        verdict = f"no gain is called over it, its prediction lying {OUTSIDE} ({best_out})"
    elif rec_out:
        verdict = f"no gain is called, the plan's prediction lying {OUTSIDE} ({rec_out})"
    elif not beyond_error(rec, best):
        verdict = "within the model's error of each other, so the difference is not a prediction to rely on"
    rq, bq = _percents(rec.quality, best.quality)
    if verdict is None:
        verdict = f"{_gap(rq, bq)} points"
    text = (
        f"{rec.label}: predicted {rq} of the reference's loss drop against {bq} for {name} ({best.label}) "
        f"at the same budgets: {verdict} (expected error {err}; {_error_text(best.error)} for {name})."
    )
    for k, v in fitted.items():
        if k != name and (why := outside(v)):
            text += (
                f" {k} ({v.label}) is predicted {100 * v.quality:.0f}%, a prediction {OUTSIDE} ({why}); no "
                "gain is called over it."
            )
    return text


def clears_target(rec: F.Candidate, target: float) -> bool:
    """Whether ``rec`` is predicted to reach ``target`` by more than its expected error (never, where the
    error is unknown): how a gain is called one, applied to a target."""
    return rec.error is not None and rec.quality - target > rec.error


def target_sentence(
    rec: F.Candidate,
    defaults: dict[str, F.Candidate | None],
    target: float,
    kind: str,
    reference: dict[str, float],
    *,
    over_depth: bool = False,
    outside: Callable[[F.Candidate], str | None] = _inside,
) -> str:
    """One sentence: the cheapest placement predicted to reach ``target`` (``over_depth``: the cheapest over
    all the depth, where the depth rule passed over a cheaper one), against the cheapest fixed rule predicted
    to reach it (one inside the quality model's evidence first; one ``outside`` it is marked)."""
    err = _error_text(rec.error)

    def cost(c: F.Candidate) -> str:
        return f"{amount(c.costs[kind], kind)} ({c.costs[kind] / reference[kind]:.2f}× the reference)"

    aim, got = _percents(target, rec.quality)
    scope = " over all the depth" if over_depth else ""
    head = (
        f"{rec.label}: the cheapest placement{scope} predicted to reach {aim} of the reference's loss "
        f"drop (predicted {got}, expected error {err}) at {cost(rec)}"
    )
    if not clears_target(rec, target):
        head += f"; {aim} lies within the prediction's expected error, so reaching it is not assured"
    fitted = {k: v for k, v in defaults.items() if v is not None}
    if not fitted:
        return head + "; no practitioners' default is predicted to reach it."
    inside = {k: v for k, v in fitted.items() if outside(v) is None}
    name, best = min((inside or fitted).items(), key=lambda kv: (kv[1].costs[kind], -kv[1].quality))
    why = outside(best)
    marked = f", a prediction {OUTSIDE} ({why})" if why else ""
    if (best.matrices, best.layer_rule, best.rank) == (rec.matrices, rec.layer_rule, rec.rank):
        return head + f"; this is also the cheapest {name} placement that reaches it."
    return head + f"; the cheapest fixed rule that does is {name} ({best.label}) at {cost(best)}{marked}."


def covers_depth(search: F.Search, c: F.Candidate) -> bool:
    """Whether ``c`` adapts a unit in every depth band (coverage 1, as the quality model counts it)."""
    return Q.depth_coverage(c.layers, search.card.n_layers) >= 1.0


def best_over_depth(search: F.Search, budgets: Sequence[Budget]) -> F.Candidate | None:
    """The best-predicted placement over all the depth within ``budgets`` (ties to fewer parameters, as the
    recommendation breaks them); None where none fits."""
    return search.best(budgets, where=lambda c: covers_depth(search, c))


def depth_advice(search: F.Search, chosen: F.Candidate, budgets: Sequence[Budget]) -> str | None:
    """Where the caution on varied targets advises placements over all the depth and the plan is not one:
    the best-predicted one within the budgets, or, where none fits, the cheapest in the first budget's kind
    and what it costs. None where the plan covers the depth."""
    if covers_depth(search, chosen):
        return None
    label = f"plan: {chosen.label} leaves depth bands out"
    best = best_over_depth(search, budgets)
    if best is not None:
        return (
            f"{label}; the best-predicted placement over all the depth within the budgets is {best.label} "
            f"(predicted {best.quality:.3f}, expected error {_error_text(best.error)}; "
            f"{setting_text('depth', 'all')} takes it)"
        )
    return f"{label} because {tail}" if (tail := _none_over_depth(search, budgets)) else None


def _none_over_depth(search: F.Search, budgets: Sequence[Budget]) -> str | None:
    """That no placement over all the depth fits the budgets: the budget that none fits on its own, with the
    cheapest one in its kind and that cost, or that none fits them together; None where the search has
    none over all the depth."""
    full = [c for c in search.candidates if search.supported(c) and covers_depth(search, c)]
    if not full:
        return None
    # The budget that rules them out, not merely the first listed (which they may all meet).
    blocking = [b for b in budgets if not any(search.fits(c, [b]) for c in full)]
    if not blocking:
        alone = _labels(budgets)
        return f"placements over all the depth fit each of {alone} alone, but none fits them together"
    kind = blocking[0].kind
    cheapest = min(full, key=lambda c: (c.costs[kind], c.costs["params"]))
    ref = search.reference.get(kind)
    rel = f" ({at_least(cheapest.costs[kind] / ref, 3):.3g}x the reference)" if ref else ""
    return (
        f"none over all the depth fits {blocking[0].label}: the cheapest that covers it, "
        f"{cheapest.label}, needs {_cost_label(kind, cheapest.costs[kind], up=True)}{rel}"
    )


def _labels(budgets: Sequence[Budget]) -> str:
    """Budgets as the plan's header shows them, each with its unit (``memory=1500 MiB``)."""
    return ", ".join(b.label for b in budgets)


def _cost_label(kind: str, value: float, *, up: bool = False) -> str:
    """A cost in a budget's label form: ``step_time=2.55 s``, ``memory=2,553 MiB``, ``params=81,408``
    (``up``: rounded up as shown, see :func:`amount`)."""
    return f"{kind}={amount(value, kind, unit=False, up=up)}{unit_suffix(kind)}"


def over_depth_only(card: Card, cfg: PlanConfig, model: Q.QualityModel) -> bool:
    """Whether the recommendation is taken among placements over all the depth: asked for (``depth: all``),
    or, by default, under a budget or a target where the card's targets are varied (:func:`_varied`)."""
    if cfg.policy != "recommend" or cfg.depth == "any":
        return False
    if cfg.depth == "all":
        return True
    return _varied(card, model) and (cfg.target is not None or bool(cfg.budget))


def _varied(card: Card, model: Q.QualityModel) -> bool:
    """Whether the card's targets are varied enough for the depth rule (HIGH_TARGET_ENTROPY), under the
    default or a built-in model (the rule was measured on the two-task model's recommendations)."""
    h = card.task.get("target_entropy")
    return (
        h is not None
        and h >= Q.HIGH_TARGET_ENTROPY
        and (model == Q.default_model() or model in Q.BUILT_IN_MODELS)
    )


def _chosen(
    search: F.Search, cfg: PlanConfig, budgets: Sequence[Budget], rank: int, kind: str, over_depth: bool
) -> F.Candidate:
    policy = cfg.policy
    if policy == "recommend":
        where = (lambda c: covers_depth(search, c)) if over_depth else None
        if cfg.target is not None:
            try:
                return search.cheapest(cfg.target, kind, budgets, where=where)
            except LayercardError as e:
                if where is None or cfg.depth == "all":
                    raise LayercardError(
                        f"{e} (depth all: among placements over all the depth)" if where else str(e)
                    ) from None
            # depth auto: none over all the depth is predicted to reach the target; any placement may
            return search.cheapest(cfg.target, kind, budgets)
        best = best_over_depth(search, budgets) if over_depth else None
        if best is not None:
            return best
        if over_depth and cfg.depth == "all":
            tail = _none_over_depth(search, budgets) or "the search has no placement over all the depth"
            raise LayercardError(f"depth all: {tail}")
        return search.recommend(budgets)
    if policy == "spectrum":
        from layercard.plan.spectrum import fit_spectrum

        return fit_spectrum(search, budgets, rank)
    need = "q,v" if policy == "peft-default" else "all-linear"
    if not any(c.matrices == need for c in search.candidates):
        raise LayercardError(
            f"policy {policy} adapts {','.join(F.MATRICES[need])}; the card measured only "
            f"{','.join(search.card.roles)} (measure the card with {card_setting_text('roles', need)})"
        )
    # the rank-lowering rules start from the given rank; last-n takes one only without a budget
    if rank not in F.RANKS and (not budgets or policy != "last-n"):
        grid = ", ".join(map(str, F.RANKS))
        raise LayercardError(f"rank {rank}: policy {policy} takes a rank of {grid}")
    if not budgets:  # the rule as its users write it, unfitted: every layer at the given rank
        return next(c for c in search.candidates if (c.matrices, c.layer_rule, c.rank) == (need, "all", rank))
    chosen = search.default_rule(policy, budgets, rank)
    if chosen is None:
        raise LayercardError(f"policy {policy}: nothing it can place fits {_labels(budgets)}")
    return chosen


def _rank_unused(cfg: PlanConfig, budgets: list[Budget], chosen: F.Candidate) -> list[str]:
    """A line where ``--rank`` was given but the policy chose the rank itself, or a rule lowered it to fit
    (the default is not said)."""
    if cfg.rank == Q.REFERENCE_RANK or chosen.rank == cfg.rank or cfg.policy == "spectrum":
        return []
    if cfg.policy in ("peft-default", "all-linear") and budgets and cfg.rank != "auto":
        return [
            f"rank {cfg.rank}: lowered to {chosen.rank}, the highest at which {cfg.policy} fits the budgets"
        ]
    if cfg.policy == "recommend" or budgets or cfg.target is not None:
        return [
            f"rank {cfg.rank}: not used; {cfg.policy} chooses the rank (here {chosen.rank}) with the "
            "placement"
        ]
    return []


def _loose_budgets(search: F.Search, budgets: list[Budget]) -> list[str]:
    """A line for each budget every candidate the recommendation considers (those inside the quality
    model's evidence) fits under: it does not shape the choice."""
    out = []
    considered = [c for c in search.candidates if search.supported(c)]
    for b in budgets:
        ref = search.reference.get(b.kind)
        if not ref or not considered:
            continue
        costliest = max(c.costs[b.kind] for c in considered)
        if b.cap(search.reference) >= costliest:
            value = f"{costliest:,.0f}" if costliest >= 1000 else f"{costliest:.4g}"
            value += unit_suffix(b.kind)
            out.append(
                f"budget {b.label}: every placement the search considers fits under it "
                f"(the costliest, {value}, "
                f"is {costliest / ref:.3g}x the reference), so it leaves the choice to predicted quality "
                "alone"
            )
    return out


def search_plan(
    card: Card, cfg: PlanConfig, *, card_path: str | None = None, model: Q.QualityModel | None = None
) -> Plan:
    """The plan of a search policy: the recommendation, or a fixed rule fitted to the budgets, with the
    frontier, the fixed rules' fits and a one-sentence comparison."""
    from layercard.cost import memory_figure

    t0 = time.perf_counter()
    budgets = list(cfg.budget or ())
    model = model or Q.default_model()
    figure = memory_figure(card.cost, cfg.memory_figure)
    search = price(card, model, figure)
    rank = int(cfg.rank) if cfg.rank != "auto" else Q.REFERENCE_RANK
    kind = budgets[0].kind if budgets else "params"  # what "cheapest" means under a target
    over_depth = over_depth_only(card, cfg, model)
    chosen = _chosen(search, cfg, budgets, rank, kind, over_depth)
    if cfg.target is not None:
        defaults = {rule: search.default_rule_for(rule, cfg.target, kind, budgets) for rule in RULES}
    else:
        # a plan that is a rank-lowering rule sets the rules' starting rank; any other starts them at theirs
        start = rank if cfg.policy in ("peft-default", "all-linear") else F.RULE_RANK
        defaults = {rule: search.default_rule(rule, budgets, start) if budgets else None for rule in RULES}
    by_key = {u.key: u for u in card.units}
    planned = [
        PlannedUnit(key, by_key[key].layer, by_key[key].role, by_key[key].name, r) for key, r in chosen.units
    ]
    pred = _predicted(card, search, chosen, defaults, budgets, model)
    if cfg.target is None:
        pick, restricted = _pick(card, cfg, search, chosen, budgets, model, over_depth)
        pred["recommendation"] = sentence(
            chosen, defaults, pick, over_depth=restricted, outside=search.outside, budgets=budgets
        )
    if pred.get("memory"):
        pred["memory_figure"] = figure
    if cfg.target is not None:
        # cleared: predicted above the target by more than the placement's expected error
        pred["target"] = {"fraction": cfg.target, "cost": kind, "cleared": clears_target(chosen, cfg.target)}
        # the depth rule decided the pick where the cheapest of any placement leaves depth out
        by_depth = over_depth and chosen is not search.cheapest(cfg.target, kind, budgets)
        pred["recommendation"] = target_sentence(
            chosen, defaults, cfg.target, kind, search.reference, over_depth=by_depth, outside=search.outside
        )
        if kind not in pred["frontier"]:
            others = [b for b in budgets if b.kind != kind]
            pred["frontier"][kind] = [
                F.summary_row(c, search.reference) for c in search.frontier(kind, within=others)
            ]
    warnings = [] if model.is_fitted else [f"quality model: {model.basis}"]
    # the built-in models' runs were all smollm2's; a model of the user's own says what it rests on
    other = Q.other_model_warning(card.model) if model in Q.BUILT_IN_MODELS else None
    warnings += [other] if other else []
    # the caution's figures were measured with the default model
    varied = Q.target_entropy_warning(card) if model == Q.default_model() else None
    warnings += [varied] if varied else []
    warnings += _reference_note(search)
    warnings += _no_signal(card)
    warnings += _depth_notes(card, cfg, search, chosen, budgets, model, over_depth, kind)
    warnings += dropout_warnings(card, cfg.dropout)
    warnings += _loose_budgets(search, budgets)
    warnings += _rank_unused(cfg, budgets, chosen)
    config = {
        "policy": cfg.policy,
        "budget": str(cfg.budget) if cfg.budget is not None else None,
        "target": cfg.target,
        "roles": _roles(chosen, by_key),
        "rank": chosen.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "score": model.score,
        "seed": cfg.seed,
        "kind": "lora",
        "bands": None,
        "depth": cfg.depth,
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
        kind="lora",
        units=planned,
        layers=sorted({u.layer for u in planned}),
        predicted=pred,
        lora_config=lora_config(
            planned, cfg.alpha, cfg.dropout, module_kinds=[by_key[u.key].module_kind for u in planned]
        ),
        adapter_config=None,
        warnings=warnings,
    )


def _pick(
    card: Card,
    cfg: PlanConfig,
    search: F.Search,
    chosen: F.Candidate,
    budgets: Sequence[Budget],
    model: Q.QualityModel,
    over_depth: bool,
) -> tuple[F.Candidate | None, bool]:
    """The placement policy recommend takes within the budgets under the plan's depth setting (a
    recommendation's own), and whether the depth rule passed over a better-predicted one to take it; None
    without budgets or where no placement the quality model can vouch for fits them."""
    if not budgets:
        return None, False
    best = search.best(budgets)
    if cfg.policy == "recommend":
        pick: F.Candidate | None = chosen
    else:
        over_depth = over_depth_only(card, dataclasses.replace(cfg, policy="recommend"), model)
        pick = (best_over_depth(search, budgets) if over_depth else None) or best
    return pick, over_depth and pick is not None and pick is not best


def _no_signal(card: Card) -> list[str]:
    """That the card measured no gradient anywhere, so that the capacity share a prediction reads is 0/0
    (stored as 0): the placements are then told apart by parameters and depth alone."""
    if Q.Basis(card).ref_caps[Q.WEIGHT_POWERS.index(2.0)] > 0:  # the capacity the forms read
        return []
    return [
        "card: no unit has a gradient on this task (every score is 0), so the capacity share of the "
        "reference is undefined for every placement and the predictions rest on parameters and depth "
        "alone; check the model and the task's targets"
    ]


def _reference_note(search: F.Search) -> list[str]:
    """What 1x is on a card without every linear role: the reference is then the card's own roles."""
    if search.reference_roles is None:
        return []
    roles = ",".join(search.reference_roles)
    return [
        f"reference: the card measured only roles {roles}, so 1x (what relative budgets and predicted "
        f"fractions are taken of) is {roles} on every layer at rank {Q.REFERENCE_RANK}, "
        f"{search.reference['params']:,.0f} params, not every linear module; "
        f"{card_setting_text('roles', 'all-linear')} measures them all"
    ]


def _depth_notes(
    card: Card,
    cfg: PlanConfig,
    search: F.Search,
    chosen: F.Candidate,
    budgets: Sequence[Budget],
    model: Q.QualityModel,
    over_depth: bool,
    kind: str,
) -> list[str]:
    """What a plan says of depth where the card's targets are varied: which placement the restriction to
    all the depth chose over which, that nothing over it fits, or (``depth: any``) what it would take."""
    asked = cfg.policy == "recommend" and (cfg.target is not None or budgets) and cfg.depth != "all"
    if not (asked and _varied(card, model)):
        return []
    if cfg.target is not None:
        return _target_depth_notes(search, cfg.target, kind, chosen, budgets)
    if cfg.depth == "any":
        return [note] if (note := depth_advice(search, chosen, budgets)) else []
    unrestricted = search.recommend(budgets)
    if covers_depth(search, chosen) and over_depth and unrestricted is not chosen:
        return [
            "plan: on a task with varied targets the recommendation is the best-predicted placement over "
            f"all the depth, {chosen.label} (predicted {chosen.quality:.3f}), not {unrestricted.label} "
            f"(predicted {unrestricted.quality:.3f}), which leaves depth bands out; "
            f"{setting_text('depth', 'any')} takes it"
        ]
    if not covers_depth(search, chosen) and (tail := _none_over_depth(search, budgets)):
        return [f"plan: {chosen.label} leaves depth bands out because {tail}"]
    return []


def _target_depth_notes(
    search: F.Search, target: float, kind: str, chosen: F.Candidate, budgets: Sequence[Budget]
) -> list[str]:
    """:func:`_depth_notes` under a target: the cheapest placement over all the depth predicted to reach it
    against the cheapest of any, whichever the plan took."""

    def cost(c: F.Candidate) -> str:
        return amount(c.costs[kind], kind)

    free = search.cheapest(target, kind, budgets)
    try:
        full = search.cheapest(target, kind, budgets, where=lambda c: covers_depth(search, c))
    except LayercardError:
        full = None
    if full is None:  # then the plan, the cheapest of any placement, leaves depth out too
        within = f" within {_labels(budgets)}" if budgets else ""
        return [
            f"plan: {chosen.label} leaves depth bands out because no placement over all the depth{within} "
            f"is predicted to reach {target:g}"
        ]
    if full is free:
        return []
    if chosen is full:
        return [
            "plan: on a task with varied targets the plan is the cheapest placement over all the depth "
            f"predicted to reach {target:g}, {full.label} ({cost(full)}, predicted {full.quality:.3f}), not "
            f"{free.label} ({cost(free)}, predicted {free.quality:.3f}), which leaves depth bands out; "
            f"{setting_text('depth', 'any')} takes it"
        ]
    return [
        f"plan: {chosen.label} leaves depth bands out; the cheapest placement over all the depth predicted "
        f"to reach {target:g} is {full.label} ({cost(full)}, predicted {full.quality:.3f}; "
        f"{setting_text('depth', 'all')} takes it)"
    ]


def _roles(chosen: F.Candidate, by_key: dict[str, UnitRow]) -> list[str]:
    """The roles a candidate's units adapt, in the canonical order (a model without a gate has none)."""
    from layercard.models import CANONICAL_ROLES, FUSED_ROLES

    have = {r for key, _ in chosen.units for r in FUSED_ROLES.get(by_key[key].role, (by_key[key].role,))}
    return [r for r in CANONICAL_ROLES if r in have]


def _predicted(
    card: Card,
    search: F.Search,
    chosen: F.Candidate,
    defaults: dict[str, F.Candidate | None],
    budgets: Sequence[Budget],
    model: Q.QualityModel,
) -> dict[str, Any]:
    reference = search.reference
    units = _chosen_units(card, chosen)
    frontier = {
        # each cost's frontier among the placements that meet the budgets on the other costs
        kind: [
            F.summary_row(c, reference)
            for c in search.frontier(kind, within=[b for b in budgets if b.kind != kind])
        ]
        for kind in sorted({b.kind for b in budgets} | {"params"})
        if kind in reference
    }
    pred: dict[str, Any] = {
        "quality": {
            "fraction": chosen.quality,
            # this placement's, from the model's error band where it has one
            "expected_error": chosen.error,
            "model_error": model.expected_error,
            "model": model.describe(),
        },
        "recommendation": None,  # the caller's sentence
        "candidate": _row(search, chosen),
        "defaults": {k: (_row(search, v) if v is not None else None) for k, v in defaults.items()},
        "frontier": frontier,
        "reference": reference,
        "budgets": [str(b) for b in budgets],
        "params": int(chosen.costs["params"]),
        "all_layer_params": int(reference["params"]),
        "modules": int(chosen.costs["modules"]),
        "input_width": sum(u.d_in for u, _ in units),
        "n_layers": len(chosen.layers),
        "step_time_s": chosen.costs.get("step_time"),
        "all_layer_step_time_s": reference.get("step_time"),
        "fraction": chosen.quality,
        "score": model.score,
    }
    if card.cost is not None:
        pred |= calibration_batch(card.cost, card.provenance.get("machine"))
        pred["memory"] = _memory(card, units)
        pred["forward_s"] = chosen.costs.get("forward_s")
    return pred


def _row(search: F.Search, c: F.Candidate) -> dict[str, Any]:
    """A candidate's summary row, with whether its prediction lies outside the quality model's evidence."""
    return {**F.summary_row(c, search.reference), "outside_model_range": search.outside(c) is not None}


def _chosen_units(card: Card, chosen: F.Candidate) -> list[tuple[UnitRow, int]]:
    """The card's unit rows of the chosen placement, each with its rank."""
    by_key = {u.key: u for u in card.units}
    return [(by_key[key], r) for key, r in chosen.units]


def _memory(card: Card, units: Sequence[tuple[UnitRow, int]]) -> dict[str, Any] | None:
    """A placement's predicted peak memory and its activation part (see CostModel.memory), from its unit
    rows with their ranks."""
    from layercard.cost import CostModel

    params = sum(r * (u.d_in + u.d_out) for u, r in units)
    width = sum(u.d_in for u, _ in units)
    return CostModel.from_dict(card.cost).memory([u.layer for u, _ in units], len(units), params, width)  # type: ignore[arg-type]
