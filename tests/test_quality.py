"""The quality model's features and fitting, and the placement search, on cases whose answer is known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from layercard.card import Card, GroupRow, UnitRow
from layercard.config import Budget
from layercard.errors import LayercardError
from layercard.plan import frontier as F
from layercard.plan import quality as Q

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _card(n_layers: int = 8, *, weight=lambda layer, role: 1.0, d: int = 16, d_ff: int = 32) -> Card:
    """A hand-made card: every linear role in every layer; captured@r = 1 − 2^-r of resnorm² (= 1)."""
    units, groups = [], []
    for layer in range(n_layers):
        for g in ("attn_in", "o_in", "mlp_in", "down_in"):
            groups.append(
                GroupRow(
                    key=f"{layer}.{g}",
                    layer=layer,
                    input_group=g,
                    d_in=d_ff if g == "down_in" else d,
                    n=10,
                    sketched=None,
                    eigenvalues=[1.0],
                    energy=1.0,
                    kappa=1.0,
                    effective_rank=1.0,
                    noise_amplification=1.0,
                )  # fmt: skip
            )
        for role in ROLES:
            d_in = d_ff if role == "down" else d
            d_out = d_ff if role in ("gate", "up") else d
            group = {"o": "o_in", "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}.get(role, "attn_in")
            units.append(
                UnitRow(
                    key=f"{layer}.{role}",
                    layer=layer,
                    role=role,
                    name=f"model.layers.{layer}.{role}",
                    d_in=d_in,
                    d_out=d_out,
                    group=f"{layer}.{group}",
                    grad_norm=float(weight(layer, role)),
                    resnorm=1.0,
                    captured={str(r): 1 - 2.0**-r for r in (1, 2, 4, 8, 16, 32, 64)},
                    rate=0.1,
                    rate_linear=0.1,
                    rate_quadratic=0.0,
                    lora_params=8 * (d_in + d_out),
                    grad_eig_energy=[1.0],
                )  # fmt: skip
            )
    return Card(
        provenance={}, config={"delta": 1e-3}, model={"id": "hand", "hash": "h", "n_layers": n_layers},
        task={"name": "t", "data_hash": "d"}, roles=list(ROLES), n_positions=10, n_target_tokens=10,
        loss=1.0, units=units, groups=groups, default_score="gradnorm_energy",
    )  # fmt: skip


def test_rank_share_is_monotone_bounded_and_never_overstates():
    u = _card().units[0]
    shares = [Q.rank_share(u, r) for r in (1, 2, 3, 4, 8, 64, 128)]
    assert shares == sorted(shares) and all(0 <= s <= 1 for s in shares)
    assert Q.rank_share(u, 3) == Q.rank_share(u, 2)  # between stored ranks: the lower one
    assert Q.rank_share(u, 2) == pytest.approx(0.75)


def test_features_of_the_reference_and_of_parts():
    card = _card()
    ref = {u.key: 8 for u in card.units}
    f = Q.features(card, ref)
    assert (f.capacity, f.params, f.coverage) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    half = {u.key: 8 for u in card.units if u.layer < 4}
    h = Q.features(card, half)
    assert (
        h.capacity == pytest.approx(0.5)
        and h.params == pytest.approx(0.5)
        and h.coverage == pytest.approx(0.5)
    )
    low = Q.features(card, {u.key: 2 for u in card.units})
    assert low.params == pytest.approx(0.25)
    assert low.capacity == pytest.approx(0.75 / (1 - 2.0**-8))  # rank 2 captures 3/4, rank 8 nearly all
    with pytest.raises(LayercardError, match="not in the card"):
        Q.features(card, {"99.q": 8})


def test_weights_follow_the_card():
    """Units the card weighs more hold more capacity than as many parameters elsewhere."""
    card = _card(weight=lambda layer, role: 3.0 if role in ("gate", "up", "down") else 1.0)
    mlp = Q.features(card, {u.key: 8 for u in card.units if u.role in ("gate", "up", "down")})
    attn = Q.features(card, {u.key: 8 for u in card.units if u.role in ("q", "k", "v", "o")})
    assert mlp.capacity > 0.8 and attn.capacity < 0.2


def test_fit_recovers_a_known_exponent():
    form = Q.FORMS["capacity"]
    grid = np.linspace(0.02, 1.0, 15)
    xs = [Q.Features(capacity=x, params=x, coverage=1.0, capacities=(1.0, 0.5 + 0.5 * x, x, x)) for x in grid]
    ys = [x**0.3 for x in grid]
    params, err = Q.fit(form, xs, ys)
    assert params[1] == pytest.approx(0.3) and params[0] in (1.0, 2.0) and err < 1e-9
    worse = Q.mean_abs_error(form, (1.0, 0.6), xs, ys)
    assert worse > 0.05
    with pytest.raises(LayercardError, match="one finite measured fraction"):
        Q.fit(form, xs, [*ys[:-1], float("nan")])


def test_decision_regret_of_known_orders():
    costs = [1.0, 2.0, 3.0]
    measured = [0.5, 0.9, 0.7]
    # Ordered as measured, or off by a constant: nothing lost at any budget.
    assert Q.decision_regret(measured, measured, costs) == (0.0, [0.0, 0.0, 0.0])
    assert Q.decision_regret([m - 0.3 for m in measured], measured, costs)[0] == 0.0
    # "More is better" picks the dearest that fits: at the budget 3 it takes 0.7 where 0.9 fits.
    mean, each = Q.decision_regret(costs, measured, costs)
    assert each == pytest.approx([0.0, 0.0, 0.2]) and mean == pytest.approx(0.2 / 3)
    # A tie goes to the cheaper placement, as the planner breaks it.
    assert Q.decision_regret([1.0, 1.0, 1.0], [0.5, 0.9, 0.9], costs)[1] == pytest.approx([0.0, 0.4, 0.4])
    with pytest.raises(LayercardError, match="finite"):
        Q.decision_regret([float("nan"), 1.0, 1.0], measured, costs)
    with pytest.raises(LayercardError, match="equal"):
        Q.decision_regret([1.0], measured, costs)


def _search(card=None):
    card = card or _card()
    form = Q.FORMS["capacity"]
    return F.search(card, predict=lambda f: form.fn(f, (2.0, 0.3)))


def test_frontier_is_non_dominated_and_sorted():
    s = _search()
    for kind in ("params", "modules"):
        front = s.frontier(kind)
        costs = [c.costs[kind] for c in front]
        assert costs == sorted(costs)
        assert [c.quality for c in front] == sorted(c.quality for c in front)
        for c in s.candidates:  # nothing beats a frontier point on both axes
            for p in front:
                assert not (c.costs[kind] <= p.costs[kind] and c.quality > p.quality + 1e-12)


def _saturating_search() -> F.Search:
    """A search whose predicted quality stops growing at a quarter of the reference's parameters, so that
    many placements tie at the top."""
    return F.search(_card(), predict=lambda f: min(f.params, 0.25))


def test_each_step_of_the_frontier_buys_more_predicted_quality():
    """A frontier point costs more than the one before only if it is predicted to be better: a placement
    of equal predicted quality and higher cost is dominated."""
    s = _saturating_search()
    top = max(c.quality for c in s.candidates)
    for kind in ("params", "modules"):
        front = s.frontier(kind)
        assert all(b.quality > a.quality for a, b in zip(front, front[1:], strict=False)), kind
        # it ends at the cheapest placement of the top quality, and nothing dearer follows
        assert front[-1].quality == top
        assert front[-1].costs[kind] == min(c.costs[kind] for c in s.candidates if c.quality == top)


def test_equal_predicted_quality_goes_to_fewer_parameters():
    """The recommendation is the highest predicted quality within the budgets; of placements predicted
    equal (to six decimals), the one of fewest parameters."""
    s = _saturating_search()
    budget = [Budget("params", 10.0, True)]  # every candidate fits
    fitting = s.fitting(budget)
    top = max(round(c.quality, 6) for c in fitting)
    tied = [c for c in fitting if round(c.quality, 6) == top]
    assert len({c.costs["params"] for c in tied}) > 1  # a tie the rule must break
    pick = s.recommend(budget)
    assert pick.quality == pytest.approx(0.25)
    assert pick.costs["params"] == min(c.costs["params"] for c in tied)


def test_spread_layer_sets_take_the_centre_of_each_equal_band():
    """``spread-n`` puts n layers evenly over the depth: the (rounded-down) centre of each of n equal
    bands, as policy uniform does, not the bands' first layers."""
    sets = dict(F.layer_sets(30))
    # 4 bands of 7.5 layers: centres 3.75, 11.25, 18.75, 26.25
    assert sets["spread-4"] == (3, 11, 18, 26)
    # 8 bands of 3.75: centres 1.875, 5.625, 9.375, 13.125, 16.875, 20.625, 24.375, 28.125
    assert sets["spread-8"] == (1, 5, 9, 13, 16, 20, 24, 28)
    assert dict(F.layer_sets(8))["spread-2"] == (2, 6)  # bands 0-3 and 4-7: centres 2 and 6


def test_a_fixed_rules_target_is_sought_above_its_own_rank():
    """A practitioner after a target raises the rank as readily as lowers it: the cheapest placement of a
    rule reaching the target may be above rank 8."""
    s = F.search(_card(), predict=lambda f: Q.FORMS["params"].fn(f, (0.5,)))
    # q,v holds 64 of each layer's 272 reference parameters (every linear module at rank 8): at rank 8 it
    # is predicted at √(64/272) = 0.485, at rank 16 at √(128/272) = 0.686
    at8 = next(c for c in s.candidates if (c.matrices, c.layer_rule, c.rank) == ("q,v", "all", 8))
    assert at8.quality == pytest.approx((64 / 272) ** 0.5)
    rule = s.default_rule_for("peft-default", 0.6, "params")
    assert rule is not None and (rule.matrices, rule.layer_rule, rule.rank) == ("q,v", "all", 16)
    assert rule.quality == pytest.approx((128 / 272) ** 0.5)


def test_relative_budgets_and_the_recommendation():
    s = _search()
    assert s.reference["params"] == pytest.approx(sum(8 * (u.d_in + u.d_out) for u in s.card.units))
    budget = Budget.parse("params=0.25x")
    assert (budget.kind, budget.value, budget.relative) == ("params", 0.25, True)
    rec = s.recommend([budget])
    assert rec.costs["params"] <= 0.25 * s.reference["params"]
    best_quality = max(c.quality for c in s.fitting([budget]))
    assert rec.quality == pytest.approx(best_quality)
    for text in ("params", "params=-1", "params=lots", "latency=1", "params=x", "memory=lots"):
        with pytest.raises(LayercardError):
            Budget.parse(text)
    least = min(c.costs["params"] for c in s.candidates)
    with pytest.raises(LayercardError, match="no placement fits") as e:
        s.recommend([Budget("params", 1.0)])
    assert f"params={least:.4g} ({least / s.reference['params']:.3g}x)" in str(e.value)
    with pytest.raises(LayercardError, match="cost model"):
        s.recommend([Budget("step_time", 0.5, True)])


def test_budgets_each_met_alone_but_not_together_are_said_so():
    s = _search()
    few = F.Candidate("q,v", (3,), "last-1", 32, 0.9, {"params": 100.0, "modules": 1.0}, ())
    small = F.Candidate("mlp", (0, 1, 2, 3), "all", 1, 0.8, {"params": 10.0, "modules": 5.0}, ())
    s = dataclasses.replace(s, candidates=(few, small))
    budgets = [Budget("params", 20.0), Budget("modules", 2.0)]
    with pytest.raises(LayercardError, match="no placement fits; each is met alone by some placement") as e:
        s.recommend(budgets)
    assert "the least" not in str(e.value)
    with pytest.raises(LayercardError, match=r"no placement fits; the least the search priced: params=10"):
        s.recommend([Budget("params", 5.0), Budget("modules", 2.0)])  # one alone is met by none


def test_the_recommendation_stays_within_the_ranks_the_model_was_fitted_on():
    card = _card()
    form = Q.FORMS["params"]
    free = F.search(card, predict=lambda f: form.fn(f, (0.03,)))
    capped = F.search(card, predict=lambda f: form.fn(f, (0.03,)), max_rank=8)
    budget = [Budget("modules", 0.3, True)]  # few modules: only a higher rank adds parameters
    assert free.recommend(budget).rank > 8  # more parameters always predict more quality
    rec = capped.recommend(budget)
    assert rec.rank <= 8
    assert rec.quality == pytest.approx(max(c.quality for c in capped.fitting(budget) if c.rank <= 8))
    assert all(c.rank <= 8 for c in capped.frontier("params"))
    assert capped.cheapest(0.95, "params", budget).rank <= 8
    assert capped.default_rule("peft-default", budget, 32).rank > 8  # a fixed rule is not capped
    assert Q.default_model().max_rank == Q.REFERENCE_RANK


def test_no_prediction_below_the_smallest_share_the_model_was_fitted_on_is_relied_on():
    card = _card()
    form = Q.FORMS["params"]
    free = F.search(card, predict=lambda f: form.fn(f, (0.03,)))
    floor = F.search(card, predict=lambda f: form.fn(f, (0.03,)), min_params_share=0.1)
    ref = floor.reference["params"]
    small = [c for c in free.candidates if c.costs["params"] < 0.1 * ref]
    assert small and all(not floor.supported(c) for c in small)
    # A target the smallest placements are predicted to reach: without the floor one of them is taken.
    target = max(c.quality for c in small)
    assert free.cheapest(target, "params").costs["params"] < 0.1 * ref
    assert floor.cheapest(target, "params").costs["params"] >= 0.1 * ref
    assert all(c.costs["params"] >= 0.1 * ref for c in floor.frontier("params"))
    rule = floor.default_rule_for("peft-default", target, "params")
    assert rule is None or rule.costs["params"] >= 0.1 * ref
    with pytest.raises(LayercardError, match=r"below 0.1x the reference's parameters fit but are not"):
        floor.recommend([Budget("params", 0.05, True)])


def test_two_task_model_is_the_committed_decision():
    import json
    from pathlib import Path

    decision = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality" / "decision.json"
    chosen = json.loads(decision.read_text())["chosen"]
    model = Q.TWO_TASK_MODEL
    assert model.form == chosen["form"] and list(model.params) == chosen["params"]
    assert model.expected_error == pytest.approx(chosen["expected_error"], abs=5e-4)
    assert chosen["min_params_share"] - 1e-3 < model.min_params_share <= chosen["min_params_share"]


def test_ten_task_model_is_the_committed_pooled_fit_and_not_the_default():
    """The ten-task model is the pooled fit pooled_quality.py chose and batch_v2.py rescore scored, with the
    error band and expected error side_model.py measured; the default stayed the two-task model, as the rule
    stated before the tight-budget runs of its picks decided."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    pooled = json.loads((results / "quality" / "pooled.json").read_text())
    side = json.loads((results / "quality" / "side_model.json").read_text())
    rescore = json.loads((results / "placement_v2" / "batch4" / "rescore.json").read_text())
    tight = json.loads((results / "placement_v2" / "tight" / "tight.json").read_text())
    model = Q.TEN_TASK_MODEL
    assert model.form == "side_capacity_coverage"
    chosen = pooled["rule"]["chosen"]
    assert rescore["chosen"] == side["form"] == chosen and rescore["adopted"]
    p = pooled["forms"][chosen]["pooled"]["params"]
    assert model.params == (p["p"], *p["gamma"], *p["beta"])
    assert model.expected_error == pytest.approx(side["held_out_mae"], abs=5e-4)
    assert side["band_check"]["chosen"] == "line"
    assert model.error_band == pytest.approx(tuple(side["band"]), abs=5e-4)
    assert model.min_params_share == Q.TWO_TASK_MODEL.min_params_share  # the same grid of placements
    assert not tight["ten_task"]["stays_default"]
    assert Q.default_model() is Q.TWO_TASK_MODEL and set(Q.BUILT_IN_MODELS) == {model, Q.TWO_TASK_MODEL}


def test_side_form_reads_each_side_and_an_unmeasured_card_as_the_lower():
    form = Q.ALL_FORMS["side_capacity_coverage"]
    params = (2.0, 0.1, 0.5, 0.2, 1.0)
    base = Q.Features(capacity=0.5, params=0.3, coverage=0.5, capacities=(0.9, 0.8, 0.7, 0.5))
    low = 0.5**0.1 * 0.5**0.2
    high = 0.5**0.5 * 0.5**1.0
    assert form.fn(dataclasses.replace(base, varied_targets=False), params) == pytest.approx(low)
    assert form.fn(dataclasses.replace(base, varied_targets=True), params) == pytest.approx(high)
    assert form.fn(base, params) == pytest.approx(low)  # None: the card did not measure its targets
    p1 = (1.0, *params[1:])  # the capacity at weight power 1
    assert form.fn(base, p1) == pytest.approx(0.7**0.1 * 0.5**0.2)


def test_features_carry_the_cards_side_of_the_entropy_threshold():
    card = _card()
    keys = {card.units[0].key: 8}
    assert Q.Basis(card).features(keys).varied_targets is None
    for h, side in ((Q.HIGH_TARGET_ENTROPY, True), (Q.HIGH_TARGET_ENTROPY - 0.01, False)):
        c = dataclasses.replace(card, task={**card.task, "target_entropy": h})
        assert Q.features(c, keys).varied_targets is side


def test_practitioner_rules_fit_the_budget_their_way():
    s = _search()
    budget = [Budget("params", 0.25, True)]
    peft = s.default_rule("peft-default", budget)
    assert (peft.matrices, peft.layer_rule) == ("q,v", "all")
    assert peft.costs["params"] <= 0.25 * s.reference["params"]
    higher = [r for r in F.RANKS if F.RULE_RANK >= r > peft.rank]
    assert all(
        ("q,v", "all", r) not in {(c.matrices, c.layer_rule, c.rank) for c in s.fitting(budget)}
        for r in higher
    )
    lin = s.default_rule("all-linear", budget)
    assert (lin.matrices, lin.layer_rule, lin.rank) == ("all-linear", "all", 2)
    last = s.default_rule("last-n", budget)
    assert last.layer_rule == "last-2" and last.rank == 8
    with pytest.raises(LayercardError, match="unknown rule"):
        s.default_rule("everything", budget)


def test_a_loose_budget_leaves_the_rank_lowering_rules_at_their_own_rank():
    s = _search()
    loose = [Budget("params", 10.0, True)]  # rank 32 on every module fits
    assert any(c.rank == 32 and c.layer_rule == "all" for c in s.fitting(loose))
    for rule in ("peft-default", "all-linear"):
        assert s.default_rule(rule, loose).rank == F.RULE_RANK
        assert s.default_rule(rule, loose, 16).rank == 16  # a plan's own rank is where the rule starts
    # a tight one lowers it: the highest rank of the grid at or under the start that fits
    fitted = s.default_rule("all-linear", [Budget("params", 0.6, True)], 16)
    assert fitted.rank == 4
    with_cap = s.default_rule("all-linear", [Budget("params", 0.6, True)], 2)
    assert with_cap.rank == 2  # never raised above the start to fill a budget


def test_step_time_enters_as_a_cost_when_given():
    card = _card()
    calls = []

    def costs(units, ranks):
        calls.append(len(units))
        return {"step_time": 1.0 + 0.1 * (card.n_layers - min(u.layer for u in units)) + 0.001 * sum(ranks)}

    s = F.search(card, predict=lambda f: f.capacity, costs=costs)
    assert "step_time" in s.reference and calls
    last = next(c for c in s.candidates if c.layer_rule == "last-1" and c.rank == 8 and c.matrices == "q,v")
    full = next(c for c in s.candidates if c.layer_rule == "all" and c.rank == 8 and c.matrices == "q,v")
    assert last.costs["step_time"] < full.costs["step_time"]


def test_a_card_without_the_mlp_searches_what_it_has():
    card = _card()
    attn_only = dataclasses.replace(card, units=[u for u in card.units if u.role in ("q", "k", "v", "o")])
    s = F.search(attn_only, predict=lambda f: f.capacity)
    assert {c.matrices for c in s.candidates} == {"q,v", "attention"}


def test_search_policies_build_plans_and_a_comparison():
    from layercard.config import PlanConfig
    from layercard.plan import Plan, make_plan
    from layercard.plan import recommend as R

    card = _card()
    fitted = Q.QualityModel("capacity", (2.0, 0.3), expected_error=0.04, basis="test")
    orig = Q.DEFAULT_MODEL
    Q.DEFAULT_MODEL = fitted  # the plan's numbers must come from the model it names
    try:
        plan = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x"))
        peft = make_plan(card, PlanConfig(policy="peft-default", budget="params=0.25x"))
        plain = make_plan(card, PlanConfig(policy="peft-default"))
    finally:
        Q.DEFAULT_MODEL = orig
    assert plan.predicted["params"] <= 0.25 * plan.predicted["all_layer_params"]
    assert plan.lora_config["target_modules"] == [u.name for u in plan.units]
    assert {u.rank for u in plan.units} == {plan.config["rank"]}
    assert set(plan.predicted["defaults"]) == {"peft-default", "all-linear", "last-n"}
    front = plan.predicted["frontier"]["params"]
    assert [r["params"] for r in front] == sorted(r["params"] for r in front)
    assert plan.predicted["quality"]["fraction"] >= peft.predicted["quality"]["fraction"]
    text = plan.predicted["recommendation"]
    assert "predicted" in text and "±4 points" in text
    assert plan.predicted["defaults"]["peft-default"]["rank"] == peft.config["rank"]
    assert {u.role for u in peft.units} == {"q", "v"} and len(peft.layers) == card.n_layers
    assert plain.config["rank"] == 8 and plain.config["budget"] is None
    again = Plan.from_dict(plan.to_dict())
    assert again.units == plan.units and again.config["budget"] == "params=0.25x"
    assert R.RULES == ("peft-default", "all-linear", "last-n")


def test_a_plan_prices_the_unmerged_forward_at_its_own_batch():
    from layercard.config import PlanConfig
    from layercard.cost import CostModel
    from layercard.plan import make_plan

    cost = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=6, batch_size=4,
        batch_tokens=300, measured=[], device="cpu", batch_positions=400, step_position_share=0.5,
        forward_base_s=0.2, forward_per_module_s=0.001, forward_position_share=0.25,
    )  # fmt: skip
    card = dataclasses.replace(_card(), cost=cost.to_dict())
    at4 = make_plan(card, PlanConfig(policy="peft-default"))
    at8 = make_plan(card, PlanConfig(policy="peft-default", batch_size=8))
    assert at4.units == at8.units
    modules = len(at4.units)
    assert at4.predicted["forward_s"] == pytest.approx(0.2 + 0.001 * modules)
    # a quarter of the forward grows with the rows: 0.75 + 0.25·2 at twice the card's batch
    assert at8.predicted["forward_s"] == pytest.approx(1.25 * at4.predicted["forward_s"])
    assert at8.predicted["forward_position_share"] == pytest.approx(0.5 / 1.25)
    assert at8.predicted["calibration_batch_positions"] == 800


def test_plans_on_another_model_than_the_fitted_one_say_so():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan.recommend import search_plan

    other = _card()  # a hand-made model
    text = Q.other_model_warning(other.model)
    assert text is not None and text.startswith(Q.OTHER_MODEL)
    assert "fitted and checked on smollm2 alone" in text and "(hand: 8 layers)" in text
    cfg = PlanConfig(policy="recommend", budget="params=0.25x")
    assert text in make_plan(other, cfg).warnings
    # the built-in smollm2, by name or by its weights' hash (the same weights from a folder of their own)
    builtin = dataclasses.replace(other, model={**other.model, "id": "smollm2"})
    copied = dataclasses.replace(
        other, model={**other.model, "id": "/models/smol", "hash": Q.FITTED_ON["hash"]}
    )
    for card in (builtin, copied):
        assert Q.other_model_warning(card.model) is None
        assert not any("fitted and checked" in w for w in make_plan(card, cfg).warnings)
    # a random-weights copy of smollm2's shapes is another model
    shaped = dataclasses.replace(other, model={"id": "runs/random-smollm2", "hash": "x", "family": "llama"})
    assert "(runs/random-smollm2: llama)" in (Q.other_model_warning(shaped.model) or "")
    # a model of the user's own, not fitted on any run, already says what it rests on
    unfitted = Q.QualityModel("params", (0.5,), expected_error=None, basis="test basis")
    warnings = search_plan(other, cfg, model=unfitted).warnings
    assert "quality model: test basis" in warnings and not any("fitted and checked" in w for w in warnings)
    # one the user fitted on their own runs is not the built-in models' and carries no such warning
    own = Q.QualityModel("params", (0.5,), expected_error=0.03, basis="my runs")
    assert not any(w.startswith(Q.OTHER_MODEL) for w in search_plan(other, cfg, model=own).warnings)
    assert text in search_plan(other, cfg, model=Q.TEN_TASK_MODEL).warnings


def test_plans_caution_where_targets_are_varied():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan.recommend import search_plan

    def with_entropy(h):
        card = _card()
        return dataclasses.replace(
            card, task={**card.task, "target_entropy": h, "target_entropy_tokens": 2048}
        )

    low, high = with_entropy(Q.HIGH_TARGET_ENTROPY - 0.01), with_entropy(5.25)
    assert Q.target_entropy_warning(low) is None
    unmeasured = Q.target_entropy_warning(_card())  # a card written before cards measured it
    assert unmeasured is not None and "does not record its task's target entropy" in unmeasured
    assert Q.target_entropy_warning(with_entropy(Q.HIGH_TARGET_ENTROPY)) is not None  # at the threshold
    text = Q.target_entropy_warning(high)
    assert text is not None and "an entropy of 5.25 nats per token" in text
    cfg = PlanConfig(policy="recommend", budget="params=0.25x")
    assert text in make_plan(high, cfg).warnings
    assert not any("entropy" in w for w in make_plan(low, cfg).warnings)
    # the caution's figures belong to the default model; a plan made with another says nothing of them
    other = Q.QualityModel("params", (0.5,), expected_error=0.05, basis="test")
    assert not any("entropy" in w for w in search_plan(high, cfg, model=other).warnings)


def test_varied_targets_plan_names_the_placements_over_all_the_depth():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan import recommend as R

    card = _card(12)
    high = dataclasses.replace(card, task={**card.task, "target_entropy": 5.0, "target_entropy_tokens": 2048})
    assert Q.depth_coverage([0, 11], 12) == pytest.approx(2 / 6)
    assert Q.depth_coverage(range(12), 12) == 1.0 and Q.depth_coverage([1], 3) == pytest.approx(1 / 3)

    # modules=3: nothing over all six bands fits (it needs a unit in each); the note says what would
    plan = make_plan(high, PlanConfig(policy="recommend", budget="modules=3"))
    note = [w for w in plan.warnings if "leaves depth bands out" in w]
    assert len(note) == 1 and "none over all the depth fits modules=3" in note[0]
    search = R.price(high)
    full = [c for c in search.candidates if search.supported(c) and R.covers_depth(search, c)]
    cheapest = min(full, key=lambda c: (c.costs["modules"], c.costs["params"]))
    assert (
        cheapest.costs["modules"] > 3
        and f"{cheapest.label}, needs modules={cheapest.costs['modules']:.4g}" in note[0]
    )

    # a plan over all the depth gets no note; neither does a card whose targets are not varied
    wide = make_plan(high, PlanConfig(policy="recommend", budget="params=0.25x"))
    assert Q.depth_coverage(wide.layers, 12) == 1.0
    assert not any("leaves depth bands out" in w for w in wide.warnings)
    quiet = dataclasses.replace(
        card, task={**card.task, "target_entropy": 1.0, "target_entropy_tokens": 2048}
    )
    assert not any(
        "leaves depth bands out" in w for w in make_plan(quiet, PlanConfig(budget="modules=3")).warnings
    )

    # a shallow plan where placements over all the depth do fit: the best-predicted of them is named
    budgets = [Budget.parse("params=0.25x")]
    shallow = next(c for c in search.fitting(budgets) if not R.covers_depth(search, c))
    text = R.depth_advice(search, shallow, budgets)
    fitting = [c for c in full if search.fits(c, budgets)]
    best = max(fitting, key=lambda c: (round(c.quality, 6), -c.costs["params"]))
    assert text is not None and f"within the budgets is {best.label} (predicted {best.quality:.3f}" in text
    assert R.depth_advice(search, best, budgets) is None


def test_depth_setting_takes_the_recommendation_among_placements_over_all_the_depth(monkeypatch):
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan import recommend as R

    # a model blind to depth and a card whose last layers carry the weight: left free, it picks them
    blind = Q.QualityModel("capacity", (2.0, 1.0), expected_error=0.05, basis="test", error_band=(0.04, 0.13))
    monkeypatch.setattr(Q, "DEFAULT_MODEL", blind)
    card = _card(12, weight=lambda layer, role: 10.0 if layer >= 9 else 0.1)

    def entropy(h):
        return dataclasses.replace(
            card, task={**card.task, "target_entropy": h, "target_entropy_tokens": 2048}
        )

    varied, quiet = entropy(5.0), entropy(1.0)

    def plan(c, **kw):
        return make_plan(c, PlanConfig(policy="recommend", budget="params=0.25x", **kw))

    def plan_free_target(c):
        return make_plan(c, PlanConfig(policy="recommend", target=0.5, depth="any")).units

    def reach_units(c):
        return make_plan(c, PlanConfig(policy="recommend", target=0.5, depth="all")).units

    free, auto, forced = plan(varied, depth="any"), plan(varied), plan(varied, depth="all")
    assert Q.depth_coverage(free.layers, 12) < 1.0
    assert Q.depth_coverage(auto.layers, 12) == 1.0 and auto.units == forced.units
    search = R.price(varied)
    best = R.best_over_depth(search, [Budget.parse("params=0.25x")])
    assert auto.predicted["candidate"]["layers"] == best.layer_rule and auto.config["depth"] == "auto"
    chose = [w for w in auto.warnings if "best-predicted placement over all the depth" in w]
    free_label = F.row_label(free.predicted["candidate"])
    assert len(chose) == 1 and f"not {free_label}" in chose[0] and "--depth any" in chose[0]
    assert any("`--depth all` takes it" in w for w in free.warnings)
    # inside a run the same sentences name the placement's keys of the run config, not the flags
    from layercard.errors import run_section

    with run_section("placements[free]"):
        in_run = plan(varied, depth="any")
    assert any("`placements[free].depth: all` takes it" in w for w in in_run.warnings)
    assert not any("--depth" in w for w in in_run.warnings)
    # targets that are not varied: auto leaves the pick free, all still restricts it
    assert plan(quiet).units == plan(quiet, depth="any").units
    assert Q.depth_coverage(plan(quiet, depth="all").layers, 12) == 1.0
    assert not any("depth" in w for w in plan(quiet).warnings)
    # under a target, all restricts the cheapest placement that reaches it
    reach = make_plan(quiet, PlanConfig(policy="recommend", target=0.5, depth="all"))
    assert Q.depth_coverage(reach.layers, 12) == 1.0
    assert make_plan(quiet, PlanConfig(policy="recommend", target=0.5)).units == plan_free_target(quiet)
    # where the targets are varied, auto restricts it too, and names the cheaper pick it passed over
    aimed = make_plan(varied, PlanConfig(policy="recommend", target=0.5))
    free_aim = make_plan(varied, PlanConfig(policy="recommend", target=0.5, depth="any"))
    assert Q.depth_coverage(aimed.layers, 12) == 1.0 and Q.depth_coverage(free_aim.layers, 12) < 1.0
    assert aimed.units == reach_units(varied) and aimed.predicted["params"] > free_aim.predicted["params"]
    passed = [
        w for w in aimed.warnings if "cheapest placement over all the depth predicted to reach 0.5" in w
    ]
    assert len(passed) == 1 and F.row_label(free_aim.predicted["candidate"]) in passed[0]
    assert "--depth any" in passed[0]
    advice = [w for w in free_aim.warnings if "leaves depth bands out" in w]
    assert len(advice) == 1 and F.row_label(aimed.predicted["candidate"]) in advice[0]
    assert "`--depth all` takes it" in advice[0]
    # nothing over all the depth fits the budget: all fails, auto takes the cheapest of any and says why
    with pytest.raises(LayercardError, match="depth all: among placements over all the depth"):
        make_plan(varied, PlanConfig(policy="recommend", target=0.1, budget="modules=3", depth="all"))
    boxed = make_plan(varied, PlanConfig(policy="recommend", target=0.1, budget="modules=3"))
    assert Q.depth_coverage(boxed.layers, 12) < 1.0
    assert any(
        "no placement over all the depth within modules=3 is predicted to reach 0.1" in w
        for w in boxed.warnings
    )
    # nothing over all the depth fits: all fails naming what would; auto falls back and says so
    with pytest.raises(LayercardError, match="depth all: none over all the depth fits modules=3"):
        make_plan(varied, PlanConfig(policy="recommend", budget="modules=3", depth="all"))
    fallback = make_plan(varied, PlanConfig(policy="recommend", budget="modules=3"))
    assert any("none over all the depth fits modules=3" in w for w in fallback.warnings)
    with pytest.raises(LayercardError, match="depth"):
        PlanConfig(policy="peft-default", budget="params=0.25x", depth="all")
    with pytest.raises(LayercardError, match="depth"):
        PlanConfig(policy="uniform", budget="layers=4", depth="any")


def test_target_gives_the_cheapest_placement_predicted_to_reach_it():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan import recommend as R

    card = _card()
    model = Q.QualityModel("capacity", (2.0, 0.3), expected_error=0.04, basis="test")
    s = R.price(card, model)
    qualities = sorted({round(c.quality, 6) for c in s.candidates})
    target = qualities[len(qualities) // 2]  # some placements reach it, some do not
    orig = Q.DEFAULT_MODEL
    Q.DEFAULT_MODEL = model
    try:
        plan = make_plan(card, PlanConfig(policy="recommend", target=target))
        capped = make_plan(card, PlanConfig(policy="recommend", target=target, budget="modules=0.5x"))
        with pytest.raises(LayercardError, match="no placement within modules=0.01x is predicted to reach"):
            make_plan(card, PlanConfig(policy="recommend", target=0.999, budget="modules=0.01x"))
    finally:
        Q.DEFAULT_MODEL = orig
    # brute force: the least params among every candidate that reaches the target
    reach = [c for c in s.candidates if c.quality >= target]
    assert plan.predicted["params"] == min(c.costs["params"] for c in reach)
    assert plan.predicted["quality"]["fraction"] >= target
    q = plan.predicted["quality"]
    assert plan.config["target"] == target and plan.predicted["target"] == {
        "fraction": target,
        "cost": "params",
        "cleared": q["fraction"] - target > q["expected_error"],
    }
    assert "cheapest placement predicted to reach" in plan.predicted["recommendation"]
    # the budget's kind is what "cheapest" means, and the budget still caps
    cap = 0.5 * s.reference["modules"]
    ok = [c for c in reach if c.costs["modules"] <= cap]
    assert capped.predicted["modules"] == min(c.costs["modules"] for c in ok) <= cap
    # every fixed rule's entry is that rule's cheapest placement reaching the target
    for rule, row in plan.predicted["defaults"].items():
        fam = [c for c in s.family(rule, max(F.RANKS)) if c.quality >= target and s.in_evidence(c)]
        if not fam:
            assert row is None
        else:
            assert row["params"] == min(c.costs["params"] for c in fam)


def test_search_policy_settings_are_checked():
    from layercard.config import PlanConfig

    with pytest.raises(LayercardError, match="plan.budget: policy recommend needs a budget .* or a target"):
        PlanConfig(policy="recommend")
    with pytest.raises(LayercardError, match="not layers; layers=N is for a layer policy such as uniform"):
        PlanConfig(budget="layers=8")  # the default policy is the recommendation
    with pytest.raises(LayercardError, match="takes one absolute budget"):
        PlanConfig(policy="top", budget="params=0.25x")
    with pytest.raises(LayercardError, match="takes one absolute budget"):
        PlanConfig(policy="top", budget="layers=4,params=1000")
    with pytest.raises(LayercardError, match="chooses the matrices"):
        PlanConfig(policy="recommend", budget="params=0.25x", roles="q,v")
    with pytest.raises(LayercardError, match="plan.target: policy peft-default is a fixed rule"):
        PlanConfig(policy="peft-default", target=0.9)
    assert PlanConfig(policy="recommend", target=0.9).budget is None
    with pytest.raises(LayercardError, match="given twice"):
        PlanConfig(policy="recommend", budget="params=0.25x,params=0.5x")
    assert str(PlanConfig(policy="recommend", budget="params=0.25x, step_time=0.6x").budget) == (
        "params=0.25x,step_time=0.6x"
    )


def test_progress_curve_fit_recovers_a_known_curve_and_reads_it_as_a_fraction():
    true = Q.ProgressCurve(loss0=2.0, loss_inf=1.2, tau=6.0, kappa=0.7, steps=36)
    pts = [(t, true.loss(t)) for t in (1, 2, 4, 6, 8, 12, 16, 24, 36)]
    got = Q.fit_progress_curve(pts, 2.0, 36)
    assert got.tau == pytest.approx(6.0, rel=1e-3)
    assert got.kappa == pytest.approx(0.7, rel=1e-3)
    assert got.loss_inf == pytest.approx(1.2, rel=1e-3)
    # The fraction is the drop at α·T over the drop at T; L0 and L∞ cancel.
    for a in (0.1, 0.5, 1.0):
        want = (2.0 - true.loss(a * 36)) / (2.0 - true.loss(36))
        assert got.progress(a) == pytest.approx(want, rel=1e-3)
    assert got.progress(1.0) == pytest.approx(1.0)
    assert got.progress(0.0) == 0.0
    values = [got.progress(a) for a in np.linspace(0, 1, 11)]
    assert values == sorted(values)


def test_a_saturated_curve_gives_every_placement_nearly_the_whole_drop():
    # τ far below the run: the reference's loss stopped falling long before T
    fast = Q.warp_fraction(0.2, 36 / 1.0, 1.0)
    slow = Q.warp_fraction(0.2, 36 / 100.0, 1.0)
    assert fast > 0.99
    assert slow == pytest.approx((1 - np.exp(-0.2 * 0.36)) / (1 - np.exp(-0.36)))
    assert slow < 0.25


def test_fit_warp_finds_the_exponent_that_made_the_fractions():
    curve = Q.ProgressCurve(loss0=2.0, loss_inf=1.0, tau=8.0, kappa=0.6, steps=36)
    xs = [Q.Features(capacity=0.0, params=s, coverage=1.0) for s in (0.02, 0.05, 0.1, 0.3, 0.6)]
    ys = [curve.progress(x.params**0.3) for x in xs]
    gamma, err = Q.fit_warp([curve], [xs], [ys])
    assert gamma == pytest.approx(0.3)
    assert err < 1e-9


@pytest.mark.parametrize(
    "points, match",
    [
        ([(1, 1.5), (2, 1.4)], "3 or more"),
        ([(1, 1.5), (2, float("nan")), (3, 1.3)], "not finite"),
        ([(1, 2.5), (2, 2.4), (3, 2.3)], "below the base loss"),
        ([(1, 1.5), (2, -0.4), (3, 1.3)], "0 or more"),
        ([(1, 1.5), (1, 1.4), (3, 1.3)], "each step measured once"),
    ],
)
def test_progress_curve_refuses_curves_it_cannot_fit(points, match):
    with pytest.raises(LayercardError, match=match):
        Q.fit_progress_curve(points, 2.0, 36)


def _with_lr(card: Card, lr: float | None) -> Card:
    return dataclasses.replace(card, config={**card.config, "lr": lr})


def test_time_constant_is_the_rank_8_reach_over_the_first_step_rate():
    card = _with_lr(_card(), 1e-3)
    n = len(card.units)
    reach = 0.5 * card.n_target_tokens * n * (1 - 2.0**-8)  # captured@8 of resnorm² = 1 in every unit
    assert Q.time_constant(card, 1e-3) == pytest.approx(reach / (n * 0.1))
    # The first step's decrease is linear in the learning rate: twice the lr, half the steps.
    assert Q.time_constant(card, 2e-3) == pytest.approx(Q.time_constant(card, 1e-3) / 2)
    assert Q.time_constant(_with_lr(_card(), None), 1e-3) is None  # no card lr to rescale from
    assert Q.time_constant(dataclasses.replace(card, n_target_tokens=0), 1e-3) is None
    still = [dataclasses.replace(u, rate_linear=0.0) for u in card.units]
    assert Q.time_constant(dataclasses.replace(card, units=still), 1e-3) is None


def test_the_saturation_form_reads_the_planned_run_off_the_card():
    card = _with_lr(_card(), 1e-3)
    tau = Q.time_constant(card, 2e-3)
    half = {u.key: 8 for u in card.units if u.layer % 2 == 0}
    f = Q.features(card, half, steps=36, lr=2e-3)
    assert f.steps_over_tau == pytest.approx(36 / tau)
    assert Q.features(card, half).steps_over_tau is None  # no planned run
    gamma, c, kappa = 0.3, 0.5, 0.8
    want = Q.warp_fraction(f.params**gamma, f.steps_over_tau / c, kappa)
    assert Q.SATURATION.fn(f, (gamma, c, kappa)) == pytest.approx(want)
    # More steps against the same τ: the reference nearer its plateau, the half placement nearer to it.
    longer = Q.features(card, half, steps=360, lr=2e-3)
    assert Q.SATURATION.fn(longer, (gamma, c, kappa)) > Q.SATURATION.fn(f, (gamma, c, kappa))
    with pytest.raises(LayercardError, match="planned steps"):
        Q.SATURATION.fn(Q.features(card, half), (gamma, c, kappa))


def test_fit_saturation_takes_tau_and_kappa_from_the_curves_and_finds_gamma():
    curves = [
        Q.ProgressCurve(loss0=2.0, loss_inf=1.0, tau=8.0, kappa=0.6, steps=36),
        Q.ProgressCurve(loss0=1.0, loss_inf=0.2, tau=2.0, kappa=1.0, steps=36),
    ]
    taus_card = [20.0, 8.0]  # measured τ / τ_card: 0.4 and 0.25, geometric mean 0.316
    c = float(np.sqrt(0.4 * 0.25))
    kappa = 0.8
    xs, ys = [], []
    for tc in taus_card:
        fs = [Q.Features(capacity=0.0, params=s, coverage=1.0, steps_over_tau=36 / tc) for s in (0.02, 0.5)]
        xs.append(fs)
        ys.append([Q.warp_fraction(f.params**0.4, f.steps_over_tau / c, kappa) for f in fs])
    (gamma, c_fit, kappa_fit), err = Q.fit_saturation(curves, taus_card, xs, ys)
    assert c_fit == pytest.approx(c) and kappa_fit == pytest.approx(kappa)
    assert gamma == pytest.approx(0.4) and err < 1e-9
    with pytest.raises(LayercardError, match="not positive"):
        Q.fit_saturation(curves, [20.0, 0.0], xs, ys)
    with pytest.raises(LayercardError, match="one card time constant"):
        Q.fit_saturation(curves, [20.0], xs, ys)


def test_error_band_recovers_a_line_and_never_shrinks_with_depth_left_out():
    us = [0.0, 0.0, 0.5, 0.5, 5 / 6, 5 / 6]
    a, b = Q.fit_error_band(us, [0.04 + 0.12 * u for u in us])
    assert a == pytest.approx(0.04) and b == pytest.approx(0.12)
    # errors that fall as depth is left out: no slope, the mean error for every placement
    a, b = Q.fit_error_band(us, [0.2 - 0.2 * u for u in us])
    assert b == 0.0 and a == pytest.approx(sum(0.2 - 0.2 * u for u in us) / len(us))
    # a line that would start below 0 goes through the origin instead
    a, b = Q.fit_error_band([0.2, 0.8], [0.0, 0.3])
    assert a == 0.0 and b > 0
    for bad in (([0.1], [0.1]), ([0.1, 0.2], [0.1]), ([0.1, float("nan")], [0.1, 0.2]), ([0, 1], [0.1, -1])):
        with pytest.raises(LayercardError, match="error band"):
            Q.fit_error_band(*bad)


def test_model_error_grows_as_coverage_drops_and_falls_back_to_one_error():
    banded = Q.QualityModel("capacity", (2.0, 0.3), expected_error=0.07, basis="t", error_band=(0.04, 0.12))
    full, sixth = (Q.Features(capacity=0.5, params=0.1, coverage=c) for c in (1.0, 1 / 6))
    assert banded.error(full) == pytest.approx(0.04)
    assert banded.error(sixth) == pytest.approx(0.04 + 0.12 * 5 / 6)
    flat = dataclasses.replace(banded, error_band=None)
    assert flat.error(full) == flat.error(sixth) == 0.07
    assert banded.describe()["error_band"] == [0.04, 0.12] and flat.describe()["error_band"] is None


def test_two_task_error_band_is_the_committed_choice():
    import json
    from pathlib import Path

    band = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality" / "band.json"
    chosen = json.loads(band.read_text())["chosen"]
    assert chosen["form"] == "line"
    assert Q.TWO_TASK_MODEL.error_band == pytest.approx(tuple(chosen["params"]), abs=5e-4)


def test_plans_carry_each_placements_own_expected_error():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan import recommend as R

    card = _card()
    model = Q.QualityModel("capacity", (2.0, 0.3), expected_error=0.07, basis="t", error_band=(0.04, 0.12))
    s = R.price(card, model)
    by_cov = {}
    for c in s.candidates:
        f = Q.Basis(card).features(dict(c.units))
        assert c.error == pytest.approx(0.04 + 0.12 * (1 - f.coverage))
        by_cov.setdefault(round(f.coverage, 3), c)
    assert len(by_cov) > 1  # the grid holds placements of different coverage, so errors differ
    orig = Q.DEFAULT_MODEL
    Q.DEFAULT_MODEL = model
    try:
        plan = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x"))
    finally:
        Q.DEFAULT_MODEL = orig
    q, row = plan.predicted["quality"], plan.predicted["candidate"]
    assert q["expected_error"] == pytest.approx(row["error"], abs=1e-4) and q["model_error"] == 0.07
    assert all("error" in r for rows in plan.predicted["frontier"].values() for r in rows)
    assert f"±{100 * row['error']:.0f} points" in plan.predicted["recommendation"]


def test_a_difference_counts_only_beyond_the_larger_expected_error():
    from layercard.plan import recommend as R

    def cand(matrices, quality, error):
        return F.Candidate(matrices, (0,), "all", 2, quality, {"params": 1.0}, (("u", 2),), error)

    rec = cand("mlp", 0.95, 0.04)
    narrow, wide = cand("q,v", 0.88, 0.04), cand("q,v", 0.88, 0.15)
    assert "+7 points" in R.sentence(rec, {"peft-default": narrow})
    text = R.sentence(rec, {"peft-default": wide})
    assert "within the model's error" in text and "±15 points for peft-default" in text
    assert R.beyond_error(rec, narrow) and not R.beyond_error(rec, wide)
    assert not R.beyond_error(rec, cand("q,v", 0.50, None))  # an unknown error calls nothing
    # a plan that is a fixed rule is set against the recommendation within its budgets, not called the best
    rule = cand("q,v", 0.88, 0.04)
    assert "the most of any placement" in R.sentence(rule, {"peft-default": rule}, rule)
    text = R.sentence(rule, {"peft-default": rule}, dataclasses.replace(rec, units=(("w", 2),)))
    assert "the most of any" not in text and "the recommendation within them, mlp · all · r=2" in text
    assert "+7 points" in text
    # no rule fitted: to budgets that none of them fits, or to none given
    none = {"peft-default": None, "last-n": None}
    text = R.sentence(rec, none, budgets=[Budget("modules", 6.0)])
    assert text.endswith("none of the practitioners' defaults (peft-default, last-n) fits modules=6.")
    assert R.sentence(rec, none).endswith("no practitioners' default was fitted to a budget.")


def test_a_fixed_rule_takes_a_rank_of_the_grid():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    for budget in (None, "params=0.5x"):
        with pytest.raises(LayercardError, match="rank 3: policy peft-default takes a rank of 1, 2, 4, 8"):
            make_plan(_card(4), PlanConfig(policy="peft-default", rank=3, budget=budget))
    # last-n places rank 8 under a budget, whatever the rank: an unused one is only said
    plan = make_plan(_card(4), PlanConfig(policy="last-n", rank=3, budget="params=0.5x"))
    assert plan.config["rank"] == 8 and "rank 3: not used; last-n chooses the rank (here 8)" in " ".join(
        plan.warnings
    )


def test_a_rule_lowered_to_fit_says_from_which_rank():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    plan = make_plan(_card(4), PlanConfig(policy="all-linear", rank=16, budget="params=0.6x"))
    assert plan.config["rank"] == 4
    assert "rank 16: lowered to 4, the highest at which all-linear fits the budgets" in plan.warnings
    same = make_plan(_card(4), PlanConfig(policy="all-linear", rank=4, budget="params=0.6x"))
    assert not any(w.startswith("rank ") for w in same.warnings)


def test_a_target_within_the_picks_expected_error_is_said_not_to_be_assured():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    card = _card(12)

    def aim(f):
        plan = make_plan(card, PlanConfig(policy="recommend", target=f, depth="any"))
        q = plan.predicted["quality"]
        return plan, q["fraction"], q["expected_error"]

    low, q_low, e_low = aim(0.1)
    assert q_low - 0.1 > e_low and low.predicted["target"]["cleared"] is True
    assert "not assured" not in low.predicted["recommendation"]
    # a target just under the pick's prediction: reached as predicted, but within its expected error
    near = q_low - e_low / 2
    close, q_close, e_close = aim(near)
    assert q_close >= near and q_close - near <= e_close
    assert close.predicted["target"]["cleared"] is False
    assert (
        f"{100 * near:.0f}% lies within the prediction's expected error" in close.predicted["recommendation"]
    )


def test_a_rank_the_search_does_not_use_is_said():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    card = _card(8)
    said = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x", rank=4)).warnings
    assert any(w.startswith("rank 4: not used; recommend chooses the rank") for w in said)
    quiet = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x")).warnings
    assert not any("not used" in w for w in quiet)  # the default rank is not an ask
    unfitted = make_plan(card, PlanConfig(policy="peft-default", rank=4))  # no budget: the rank is used
    assert unfitted.units[0].rank == 4 and not any("not used" in w for w in unfitted.warnings)


def _varied(card: Card) -> Card:
    """``card`` with targets varied enough for the depth rule."""
    return dataclasses.replace(card, task={**card.task, "target_entropy": 5.0, "target_entropy_tokens": 2048})


def test_a_fixed_rule_off_the_frontier_is_said_to_be_that_rule_not_a_restriction():
    from layercard.cli.app import console, result_console
    from layercard.cli.plan import _print_search_plan
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    card = _varied(_card(12))
    for kw, rule in [
        (dict(policy="peft-default", rank=4), "the peft-default rule at rank 4"),
        (dict(policy="last-n", budget="params=0.1x"), "the last-n rule fitted to its budgets"),
    ]:
        with result_console.capture() as cap, console.capture() as notes:  # the table; its warnings
            _print_search_plan(make_plan(card, PlanConfig(**kw)))
        out = " ".join(cap.get().split())
        assert "warning:" not in out and "warning:" in notes.get()
        assert f"the plan is off this frontier: it is {rule}, not the search's pick" in out, out
        assert "keeps to a restriction" not in out


def test_a_target_the_depth_rule_decided_is_said_to_be_over_all_the_depth(monkeypatch):
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    blind = Q.QualityModel("capacity", (2.0, 1.0), expected_error=0.05, basis="test", error_band=(0.04, 0.13))
    monkeypatch.setattr(Q, "DEFAULT_MODEL", blind)
    card = _varied(_card(12, weight=lambda layer, role: 10.0 if layer >= 9 else 0.1))
    aimed = make_plan(card, PlanConfig(policy="recommend", target=0.5))
    free = make_plan(card, PlanConfig(policy="recommend", target=0.5, depth="any"))
    assert free.predicted["params"] < aimed.predicted["params"]  # a cheaper one leaves depth out
    assert (
        "the cheapest placement over all the depth predicted to reach 50" in aimed.predicted["recommendation"]
    )
    assert "the cheapest placement predicted to reach 50" in free.predicted["recommendation"]


def test_depth_bands_are_near_equal_at_any_layer_count():
    from layercard.plan.policies import _bands

    assert Q.depth_coverage(range(15), 16) == 1.0  # the sixth band is not layer 15 alone
    assert Q.depth_coverage([0], 13) == pytest.approx(1 / 6)  # six bands, not five
    for n in range(1, 70):
        k = min(Q.DEPTH_BANDS, n)
        sizes = [sum(Q.depth_band(x, n) == b for x in range(n)) for b in range(k)]
        assert set(sizes) <= {n // k, -(-n // k)}, (n, sizes)
        assert [[x for x in range(n) if Q.depth_band(x, n) == b] for b in range(k)] == [
            list(b) for b in _bands(n, k)
        ]
    # 30 layers (smollm2): the five-layer bands the quality model was fitted with
    assert all(Q.depth_band(x, 30) == x // 5 for x in range(30))


def test_fixed_rules_outside_the_models_evidence_are_marked_and_no_gain_is_called_over_them():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan
    from layercard.plan import recommend as R

    card = _card(8)
    # q,v on every layer at rank 1 is 0.029x the reference: below the smallest placement fitted on
    small = make_plan(card, PlanConfig(policy="recommend", budget="params=0.05x", depth="any"))
    row = small.predicted["defaults"]["peft-default"]
    assert row["rank"] == 1 and row["params_x"] < Q.DEFAULT_MODEL.min_params_share
    assert row["outside_model_range"] is True and small.predicted["candidate"]["outside_model_range"] is False
    text = small.predicted["recommendation"]
    said = "for peft-default (q,v · all · r=1) at the same budgets: no gain is called over it, its prediction"
    assert f"{said} lying {R.OUTSIDE}" in text
    assert "is below the smallest placement it was fitted on" in text and "points (expected" not in text
    # under a loose budget the rules stay at their own rank, inside the evidence, and are compared
    wide = make_plan(card, PlanConfig(policy="recommend", budget="params=4x", depth="any"))
    rows = wide.predicted["defaults"]
    assert rows["all-linear"]["rank"] == rows["peft-default"]["rank"] == F.RULE_RANK
    assert not any(r["outside_model_range"] for r in rows.values())
    assert "no gain is called" not in wide.predicted["recommendation"]
    # a plan that is a rule at a rank above the evidence starts the rules there: they are marked
    high = make_plan(card, PlanConfig(policy="all-linear", budget="params=4x", rank=32))
    rows = high.predicted["defaults"]
    assert rows["all-linear"]["rank"] == 32 and rows["all-linear"]["outside_model_range"] is True
    assert rows["last-n"]["outside_model_range"] is False

    def cand(matrices, quality, rank):
        return F.Candidate(matrices, (0,), "all", rank, quality, {"params": 1.0}, ((matrices, rank),), 0.04)

    rec, inside, beyond = cand("mlp", 0.95, 8), cand("all-linear", 0.85, 8), cand("q,v", 0.99, 32)
    text = R.sentence(
        rec, {"last-n": inside, "peft-default": beyond}, outside=lambda c: "why" if c is beyond else None
    )
    assert "against 85% for last-n (all-linear · all · r=8) at the same budgets: +10 points" in text
    assert (
        f"peft-default (q,v · all · r=32) is predicted 99%, a prediction {R.OUTSIDE} (why); no gain" in text
    )
    # a plan that is such a rule says so of itself
    rule = make_plan(card, PlanConfig(policy="all-linear", budget="params=4x", rank=32))
    assert (
        f"a prediction {R.OUTSIDE} (rank 32 is above the highest it was fitted on, 8)"
        in (rule.predicted["recommendation"])
    )
    assert "no difference is called" in rule.predicted["recommendation"]


def test_a_card_without_every_linear_role_says_what_1x_is():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    card = _card()
    attn = dataclasses.replace(card, units=[u for u in card.units if u.role in ("q", "k", "v", "o")])
    attn = dataclasses.replace(attn, roles=["q", "k", "v", "o"])
    plan = make_plan(attn, PlanConfig(policy="recommend", budget="params=0.25x"))
    (note,) = [w for w in plan.warnings if w.startswith("reference:")]
    ref = plan.predicted["reference"]["params"]
    assert (
        "only roles q,k,v,o, so 1x" in note and f"q,k,v,o on every layer at rank 8, {ref:,.0f} params" in note
    )
    assert ref == sum(8 * (u.d_in + u.d_out) for u in attn.units)
    full = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x"))
    assert not any(w.startswith("reference:") for w in full.warnings)


def test_a_fixed_rule_is_set_against_the_pick_recommend_makes_under_the_depth_rule(monkeypatch):
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    blind = Q.QualityModel("capacity", (2.0, 1.0), expected_error=0.05, basis="test", error_band=(0.04, 0.13))
    monkeypatch.setattr(Q, "DEFAULT_MODEL", blind)
    card = _varied(_card(12, weight=lambda layer, role: 10.0 if layer >= 9 else 0.1))
    rec = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x"))
    free = make_plan(card, PlanConfig(policy="recommend", budget="params=0.25x", depth="any"))
    picked, passed = F.row_label(rec.predicted["candidate"]), F.row_label(free.predicted["candidate"])
    assert picked != passed
    rule = make_plan(card, PlanConfig(policy="last-n", budget="params=0.25x"))
    text = rule.predicted["recommendation"]
    # the search's pick left free is the rule itself here, which recommend would not take
    assert F.row_label(rule.predicted["candidate"]) == passed and "the most of any" not in text
    assert f"the recommendation within them over all the depth, {picked}, is predicted" in text


def test_percents_take_a_decimal_where_whole_ones_would_read_the_same():
    from layercard.plan import recommend as R

    assert R._percents(0.999, 0.99998) == ["99.9%", "100.0%"]
    assert R._percents(0.95, 0.96) == ["95%", "96%"] and R._percents(1.0, 0.99999) == ["100%", "100%"]
    # less than a point apart: not rounded into a point's gap, nor a value under 1 into 100%
    assert R._percents(0.99614, 0.99447) == ["99.6%", "99.4%"]
    assert R._percents(0.996, 0.90) == ["99.6%", "90.0%"] and R._percents(0.944, 0.9) == ["94%", "90%"]
    assert R._percents(0.9996, 0.5) == ["100%", "50%"] and R._percents(1.004, 0.5) == ["100%", "50%"]
    rec = F.Candidate("mlp", (0,), "all", 8, 0.99998, {"params": 10.0}, (("u", 8),), 0.04)
    text = R.target_sentence(rec, {}, 0.999, "params", {"params": 20.0})
    assert "predicted to reach 99.9% of the reference's loss drop (predicted 100.0%," in text
    assert "; 99.9% lies within the prediction's expected error" in text


def test_a_target_priced_in_a_cost_the_card_did_not_measure_says_how_to_measure_it():
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    with pytest.raises(
        LayercardError,
        match=r"^target 0.95: priced in step_time, .*\(measure the card with `layercard card --calibrate`\)$",
    ):
        make_plan(_card(), PlanConfig(policy="recommend", target=0.95, budget="step_time=1"))


def test_a_called_gain_is_the_difference_of_the_percents_shown():
    from layercard.plan import recommend as R

    def cand(matrices, quality):
        return F.Candidate(matrices, (0,), "all", 2, quality, {"params": 1.0}, (("u", 2),), 0.01)

    text = R.sentence(cand("mlp", 0.9946), {"peft-default": cand("q,v", 0.9496)})
    assert "99% of the reference's loss drop against 95%" in text and "+4 points" in text
    assert R._gap("99.6%", "99.4%") == "+0.2"
