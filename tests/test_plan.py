"""Planning (docs/design.md §4–§6): budgets, policies, ranks, the PEFT config and its check, the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard.card import Card, CardConfig, GroupRow, UnitRow, compute_card
from layercard.cli import app
from layercard.config import SEARCH_POLICIES
from layercard.cost import CostModel, peak_of, peak_text
from layercard.errors import LayercardError
from layercard.models import LoadedModel, weights_hash
from layercard.plan import POLICIES, Budget, Plan, PlanConfig, check_model_matches, check_plan, make_plan
from layercard.tasks import load_task

N_LAYERS = 8
# A fixed cost model so budgets do not depend on this machine's timing noise.
COST = CostModel(
    intercept_s=1.0,
    per_layer_backward_s=0.5,
    per_module_s=0.1,
    n_layers=N_LAYERS,
    batch_size=4,
    batch_tokens=192,
    measured=[],
    device="cpu",
    memory_resident_mib=100.0,
    memory_base_mib=110.0,
    memory_per_layer_mib=5.0,
    memory_per_module_mib=2.0,
    memory_per_mparam_mib=16.0,
).to_dict()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine oversubscription makes
    their passes 10-30x slower; restore the setting for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama", layers=N_LAYERS)


@pytest.fixture(scope="session")
def tiny_card(tiny_llama) -> Card:
    """A real card (coupling included) of an 8-layer tiny Llama; gradnorm gains are all positive."""
    loaded = LoadedModel(
        model=tiny_llama,
        tokenizer=tiny_tokenizer(),
        model_id="tiny",
        model_hash=weights_hash(tiny_llama),
        source="memory",
    )
    task = load_task("synthetic:facts", split="train")
    cfg = CardConfig(roles="q,v", examples=8, max_length=48, batch_size=4, coupling=True)
    card = compute_card(loaded, task, cfg, progress=False)
    # The random tiny model's first-step rates are negative (its quadratic term dominates); plan on gradnorm.
    return dataclasses.replace(card, cost=COST, default_score="gradnorm")


def synthetic_card(gains, coupling=None, *, captured=None, d=32, cost=None) -> Card:
    """A hand-made card: one ``q`` unit per layer with the given rate gains and layer coupling."""
    n = len(gains)
    units, groups = [], []
    for i, g in enumerate(gains):
        cap = (
            captured[i] if captured is not None else {str(r): float(g) * (1 - 2.0**-r) for r in (1, 2, 4, 8)}
        )
        units.append(
            UnitRow(
                key=f"{i}.q", layer=i, role="q", name=f"model.layers.{i}.self_attn.q_proj", d_in=d, d_out=d,
                group=f"{i}.attn_in", grad_norm=1.0 + i, resnorm=1.0, captured=cap, rate=float(g),
                rate_linear=float(g), rate_quadratic=0.0, lora_params=8 * 2 * d, grad_eig_energy=[1.0] * d,
            )
        )  # fmt: skip
        groups.append(
            GroupRow(
                key=f"{i}.attn_in", layer=i, input_group="attn_in", d_in=d, n=10, sketched=None,
                eigenvalues=[1.0] * d, energy=1.0, kappa=1.0, effective_rank=float(d),
                noise_amplification=1.0,
            )
        )  # fmt: skip
    cpl = None
    if coupling is not None:
        cpl = {"level": "layer", "layers": list(range(n)), "matrix": np.asarray(coupling).tolist()}
    return Card(
        provenance={}, config={"delta": 1e-3}, model={"id": "synthetic", "hash": "h" * 64, "family": "llama",
        "n_layers": n, "d_model": d}, task={"name": "t", "data_hash": "d" * 64}, roles=["q"], n_positions=10,
        n_target_tokens=10, loss=1.0, units=units, groups=groups, coupling=cpl, cost=cost,
        default_score="rate",  # the gains above are rate gains
    )  # fmt: skip


def _budgets(card: Card) -> list[Budget]:
    per_layer = 8 * sum(u.d_in + u.d_out for u in card.units if u.layer == 0)
    cm = CostModel.from_dict(card.cost)
    return [
        Budget("layers", 3),
        Budget("params", 2.5 * per_layer),
        Budget("modules", 5),
        # Enough for the top half of the model, not for layer 0: bottom-first orders must skip layers.
        Budget("step_time", cm.step_time([N_LAYERS // 2], 2 * (N_LAYERS // 2))),
        # Memory grows with depth as step time does: the same top half fits, layer 0 does not.
        Budget("memory", cm.peak_memory([N_LAYERS // 2], 2 * (N_LAYERS // 2), 4 * per_layer)),  # type: ignore[arg-type]
    ]


def _cost(plan: Plan, card: Card, kind: str) -> float:
    """Recompute a plan's cost independently of the planner."""
    if kind == "layers":
        return len(plan.layers)
    if kind == "modules":
        return len(plan.units)
    dims = {u.name: u.d_in + u.d_out for u in card.units}
    params = sum(p.rank * dims[p.name] for p in plan.units)
    if kind == "params":
        return params
    if kind == "memory":
        return CostModel.from_dict(card.cost).peak_memory(plan.layers, len(plan.units), params)
    return CostModel.from_dict(card.cost).step_time(plan.layers, len(plan.units))


# ---------------------------------------------------------------------------------------------------------
# Budget and config
# ---------------------------------------------------------------------------------------------------------


def test_budget_parse():
    assert Budget.parse("layers=8") == Budget("layers", 8)
    assert Budget.parse("params=2.5M").value == 2.5e6
    assert Budget.parse(" step-time = 1.5 ") == Budget("step_time", 1.5)
    assert Budget.parse("step_time=1.5s") == Budget.parse("step_time=1.5 s") == Budget("step_time", 1.5)
    assert str(Budget.parse("modules=16")) == "modules=16"
    bad_cases = [("layers", "KIND=VALUE"), ("flops=3", "flops"), ("layers=x", "'x'"),
                 ("layers=0", "positive"), ("layers=2.5", "whole"), ("params=-1", "positive"),
                 ("params=0x", "params=0x: must be a positive"),
                 ("step_time=0", "step_time=0 s: must"),
                 ("params=20%", "'20%' is not a number; 20% of the reference is written 0.2x$"),
                 ("params=a%", "'a%' is not a number; write a count, with k/m/g, or a multiple"),
                 ("memory=5TB", "'5TB' is not a number; write MiB, or a number with M/MB")]  # fmt: skip
    for bad, expect in bad_cases:
        with pytest.raises(LayercardError, match=expect) as e:
            Budget.parse(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(LayercardError, match="layers, params, step_time, modules"):
        Budget.parse("flops=3")


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(policy="best"), "policy"),
        (dict(policy="top", budget="layers=2", kind="prefix"), "kind"),
        (dict(policy="top", budget="layers=2", score="magic"), "score"),
        (dict(policy="top", target=1.5), "target"),
        (dict(policy="top", budget="layers=2", rank=0), "rank"),
        (dict(budget="params=0.2x", peak_positions=0.001), "peak_positions"),
        (dict(budget="params=0.2x", step_positions=0.5), "step_positions"),
        (dict(budget="params=0.2x", step_positions=1e300), "step_positions: at most 1e\\+12"),
        (dict(policy="top", budget="layers=2", dropout=1.0), "dropout"),
        (dict(policy="top", budget="layers=2", bands=2), "bands"),
        (dict(policy="top"), "budget"),
        (dict(policy="top", budget="layers=2", kind="houlsby", rank="auto"), "rank"),
        (dict(policy="top", budget="layers=2", roles="q,zz"), "zz"),
        (
            dict(budget="params=0.2x", score="rate"),
            "score: .*recommend scores units by its quality model's own",
        ),
        (
            dict(policy="spectrum", budget="params=0.2x", score="rate"),
            "score: .*spectrum scores units by weight_snr",
        ),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(LayercardError, match=field):
        PlanConfig(**kw)


def test_memory_budgets_read_g_gb_and_gib_alike_as_gibibytes():
    """A memory budget is in MiB, and the help says G and GB are GiB (M and MB MiB), as memory sizes are
    usually meant: 6G, 6GB and 6GiB are all 6 · 1024 = 6144 MiB, not 6000."""
    for text in ("memory=6G", "memory=6GB", "memory=6GiB", "memory=6 gb", "memory=6144"):
        assert Budget.parse(text) == Budget("memory", 6144.0), text
    for text in ("memory=512M", "memory=512MB", "memory=512MiB"):
        assert Budget.parse(text) == Budget("memory", 512.0), text


def test_unknown_policy_lists_valid():
    with pytest.raises(LayercardError) as e:
        PlanConfig("best", budget="layers=2")
    assert all(p in str(e.value) for p in POLICIES)


# ---------------------------------------------------------------------------------------------------------
# Policies and budgets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "all" and p not in SEARCH_POLICIES])
@pytest.mark.parametrize("kind", ["layers", "params", "modules", "step_time", "memory"])
def test_every_policy_respects_every_budget(tiny_card, policy, kind):
    budget = next(b for b in _budgets(tiny_card) if b.kind == kind)
    plan = make_plan(tiny_card, PlanConfig(policy, budget=budget))
    assert plan.layers and plan.units
    assert _cost(plan, tiny_card, kind) <= budget.value * (1 + 1e-9)
    assert plan.predicted["params"] == _cost(plan, tiny_card, "params")
    assert plan.predicted["modules"] == len(plan.units)
    d_in = {u.key: u.d_in for u in tiny_card.units}
    assert plan.predicted["input_width"] == sum(d_in[u.key] for u in plan.units)
    assert plan.predicted["step_time_s"] == pytest.approx(_cost(plan, tiny_card, "step_time"))
    assert plan.predicted["memory"]["peak_mib"] == pytest.approx(_cost(plan, tiny_card, "memory"))
    assert plan.predicted["calibration_batch_size"] == 4
    assert 0 <= plan.predicted["fraction"] <= 1 + 1e-9
    assert plan.lora_config["target_modules"] == [u.name for u in plan.units]
    if kind == "layers":
        assert len(plan.layers) == 3  # every layer has positive gradnorm gain, so all fill the budget


@pytest.mark.parametrize(
    "policy, kind", [("recommend", "params"), ("recommend", "modules"), ("recommend", "step_time"),
                     ("recommend", "memory"), ("peft-default", "params")],
)  # fmt: skip
def test_search_policies_respect_every_budget(tiny_card, tiny_llama, policy, kind):
    """On a real (q,v) card: absolute budgets, the calibrated step time among them, are met."""
    budget = next(b for b in _budgets(tiny_card) if b.kind == kind)
    plan = make_plan(tiny_card, PlanConfig(policy, budget=budget))
    assert plan.units and _cost(plan, tiny_card, kind) <= budget.value * (1 + 1e-9)
    assert plan.predicted["params"] == _cost(plan, tiny_card, "params")
    d_in = {u.key: u.d_in for u in tiny_card.units}
    assert plan.predicted["input_width"] == sum(d_in[u.key] for u in plan.units)
    assert plan.predicted["step_time_s"] == pytest.approx(_cost(plan, tiny_card, "step_time"))
    assert plan.lora_config["target_modules"] == [u.name for u in plan.units]
    assert check_plan(plan, tiny_llama)["ok"]  # PEFT adapts exactly the planned modules at their ranks


@pytest.mark.parametrize("kind", ["modules", "step_time", "memory"])
def test_a_rule_that_cannot_fit_by_its_own_means_says_so(tiny_card, kind):
    """q,v on every layer can lower its rank, not its module count or its depth."""
    budget = next(b for b in _budgets(tiny_card) if b.kind == kind)
    with pytest.raises(LayercardError, match="policy peft-default: nothing it can place fits"):
        make_plan(tiny_card, PlanConfig("peft-default", budget=budget))


@pytest.mark.parametrize("policy", ["all-linear", "last-n"])
def test_rules_that_need_every_linear_role_say_so(tiny_card, policy):
    with pytest.raises(LayercardError, match="`layercard card --roles all-linear`"):
        make_plan(tiny_card, PlanConfig(policy, budget="params=0.5x"))
    # in a run the card stage reads its roles from the run config, and the message names that key
    from layercard.errors import run_section

    with (
        run_section(f"placements[{policy}]"),
        pytest.raises(LayercardError, match="`card.roles: all-linear`"),
    ):
        make_plan(tiny_card, PlanConfig(policy, budget="params=0.5x"))


def test_non_additive_step_time_budget(tiny_card):
    # Budget 3.8 s: layers 0-2 alone are over it (backward reaches deeper); bottom skips them and takes 3
    # (3.7 s), after which any further layer costs another module (3.9 s) and no longer fits.
    budget = next(b for b in _budgets(tiny_card) if b.kind == "step_time")
    assert budget.value == pytest.approx(3.8)
    assert make_plan(tiny_card, PlanConfig("bottom", budget=budget)).layers == [3]
    assert make_plan(tiny_card, PlanConfig("top", budget=budget)).layers == [4, 5, 6, 7]
    # A policy defined per K whose smallest placement is already too expensive says so.
    tight = Budget("step_time", CostModel.from_dict(COST).step_time([7], 2))
    with pytest.raises(LayercardError, match="policy middle's smallest placement \\[3\\] already costs"):
        make_plan(tiny_card, PlanConfig("middle", budget=tight))
    assert make_plan(tiny_card, PlanConfig("top", budget=tight)).layers == [7]


def test_all_ignores_budget_and_says_so(tiny_card):
    plan = make_plan(tiny_card, PlanConfig("all", budget="layers=2"))
    assert plan.layers == list(range(N_LAYERS))
    assert plan.predicted["fraction"] == pytest.approx(1.0)
    assert any("ignores the budget layers=2" in w for w in plan.warnings)


def test_baselines_on_layers_budget(tiny_card):
    def layers(policy, k=3, **kw):
        return make_plan(tiny_card, PlanConfig(policy, budget=f"layers={k}", **kw)).layers

    assert layers("top") == [5, 6, 7]
    assert layers("bottom") == [0, 1, 2]
    assert layers("middle", 4) == [2, 3, 4, 5]
    g = tiny_card.layer_scores("gradnorm")
    assert layers("gradnorm") == sorted(np.argsort(-g)[:3].tolist())
    # card-additive with a layers budget is the top-K by the chosen score.
    g_rate = tiny_card.layer_scores("capacity")
    assert layers("card-additive", score="capacity") == sorted(np.argsort(-g_rate)[:3].tolist())


def test_random_is_seeded(tiny_card):
    def layers(seed):
        return make_plan(tiny_card, PlanConfig("random", budget="layers=3", seed=seed)).layers

    assert layers(0) == layers(0)
    assert len({tuple(layers(s)) for s in range(5)}) > 1


def test_uniform_spreads_across_depth(tiny_card):
    assert make_plan(tiny_card, PlanConfig("uniform", budget="layers=4")).layers == [1, 3, 5, 7]
    assert make_plan(tiny_card, PlanConfig("uniform", budget="layers=2")).layers == [2, 6]
    card30 = synthetic_card([1.0] * 30)
    # The pilot's even spread: the centres of 4 equal bands of 30 layers.
    assert make_plan(card30, PlanConfig("uniform", budget="layers=4")).layers == [3, 11, 18, 26]


def test_stratified_takes_the_best_of_each_band(tiny_card):
    g = tiny_card.layer_scores("gradnorm")
    plan = make_plan(tiny_card, PlanConfig("card-stratified", budget="layers=4"))
    bands = [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert len(plan.layers) == 4
    for band in bands:
        inside = [x for x in plan.layers if x in band]
        assert inside == [max(band, key=lambda x: g[x])]
    two = make_plan(tiny_card, PlanConfig("card-stratified", bands=2, budget="layers=8"))
    assert len(two.layers) == 2 and two.layers[0] < 4 <= two.layers[1]


def test_stratified_breaks_a_tie_within_a_band_to_the_lower_layer():
    """card-stratified takes the best layer of each band by predicted gain; of equal ones, the lower."""
    card = synthetic_card([0.5, 1.0, 1.0, 1.0, 0.2, 0.2, 0.9, 0.3])
    # bands {0,1} {2,3} {4,5} {6,7}: 1 is best of its band; 2 and 3 tie, as do 4 and 5; 6 is best
    assert make_plan(card, PlanConfig("card-stratified", budget="layers=4")).layers == [1, 2, 4, 6]


def test_layer_family_policies_take_the_most_layers_that_fit_a_parameter_budget():
    """uniform, middle and card-stratified define one set per K; under a parameter budget each takes the
    largest K whose set fits, not the first that does."""
    card = synthetic_card([1.0] * N_LAYERS)  # a layer costs 8 · (32 + 32) = 512 parameters at rank 8
    # 2048 parameters are 4 layers: the band centres, the middle four, the lower of each tied band
    expect = {"uniform": [1, 3, 5, 7], "middle": [2, 3, 4, 5], "card-stratified": [0, 2, 4, 6]}
    for policy, layers in expect.items():
        plan = make_plan(card, PlanConfig(policy, budget="params=2048"))
        assert plan.layers == layers and plan.predicted["params"] == 2048, policy


def _with_widths(card: Card, widths: list[int]) -> Card:
    """``card`` with layer i's unit ``widths[i]`` wide in and out."""
    units = [
        dataclasses.replace(u, d_in=w, d_out=w, lora_params=8 * 2 * w, grad_eig_energy=[1.0] * w)
        for u, w in zip(card.units, widths, strict=True)
    ]
    return dataclasses.replace(card, units=units)


def test_card_greedy_weighs_gain_by_the_parameters_it_costs():
    """Under a parameter budget the card policy adds the layer of most predicted gain per added parameter:
    a wide layer worth more alone loses to two narrow ones worth more together."""
    widths, gains, cap = [256, 16, 16], [1.0, 0.6, 0.6], 4096
    card = _with_widths(synthetic_card(gains), widths)
    plan = make_plan(card, PlanConfig("card", budget=f"params={cap}"))
    # brute force over every layer set that fits (no coupling: a set's gain is the sum of its layers')
    params = [8 * 2 * w for w in widths]  # 4096, 256, 256
    sets = [[i for i in range(3) if m >> i & 1] for m in range(1, 8)]
    best = max((s for s in sets if sum(params[i] for i in s) <= cap), key=lambda s: sum(gains[i] for i in s))
    assert plan.layers == best == [1, 2]
    assert plan.predicted["gain"] == pytest.approx(1.2)


def test_card_avoids_identical_coupled_layers():
    # Layers 0 and 1 have equal gains and identical effects: together they fix what either fixes alone.
    c = np.eye(4)
    c[0, 1] = c[1, 0] = 1.0
    card = synthetic_card([1.0, 1.0, 0.6, 0.3], c)
    plan = make_plan(card, PlanConfig("card", budget="layers=2"))
    assert plan.layers == [0, 2]
    assert plan.predicted["gain"] == pytest.approx(1.6, rel=1e-4)
    additive = make_plan(card, PlanConfig("card-additive", budget="layers=2"))
    assert additive.layers == [0, 1]  # additive gain 2.0 ...
    assert additive.predicted["gain"] == pytest.approx(1.0, rel=1e-4)  # ... but the set gain is 1.0
    assert additive.predicted["redundancy"] == pytest.approx(1.0)
    assert plan.predicted["redundancy"] == pytest.approx(0.0)


def test_no_coupling_is_recorded_and_warned():
    card = synthetic_card([1.0, 0.5, 0.2])
    plan = make_plan(card, PlanConfig("card", budget="layers=2"))
    assert plan.predicted["coupling"] == "absent (independent units assumed)"
    assert any("no coupling matrix" in w for w in plan.warnings)
    assert plan.predicted["gain"] == pytest.approx(plan.predicted["additive_gain"], rel=1e-5)


def test_card_stops_when_nothing_adds_gain():
    plan = make_plan(synthetic_card([1.0, 0.0, -0.5, 0.4]), PlanConfig("card", budget="layers=4"))
    assert plan.layers == [0, 3]
    assert any("stopped at 2 of 4 layers" in w for w in plan.warnings)
    with pytest.raises(LayercardError, match="no layer has a positive predicted gain"):
        make_plan(synthetic_card([-1.0, 0.0]), PlanConfig("card", budget="layers=1"))


def test_card_greedy_uses_gain_per_step_time():
    # Equal gains: under a step-time budget the cheaper (higher) layers win, as backward stops earlier.
    cost = dataclasses.replace(CostModel.from_dict(COST), n_layers=6).to_dict()
    card = synthetic_card([1.0] * 6, cost=cost)
    plan = make_plan(card, PlanConfig("card", budget="step_time=3.0"))
    assert plan.layers == [3, 4, 5]  # 1 + 0.5·3 + 0.1·3 = 2.8 ≤ 3.0; adding layer 2 costs 3.4
    assert plan.predicted["step_time_s"] == pytest.approx(2.8)


def test_plan_prices_step_time_and_memory_at_the_training_batch():
    shares = CostModel.from_dict(
        COST | {"step_position_share": 0.5, "memory_position_share": 1.0, "forward_base_s": 0.2}
    )
    card = synthetic_card([1.0] * N_LAYERS, cost=shares.to_dict())
    at4 = make_plan(card, PlanConfig("card", budget="step_time=6.0"))
    at8 = make_plan(card, PlanConfig("card", budget="step_time=6.0", batch_size=8))
    assert at4.config["batch_size"] is None and at8.config["batch_size"] == 8
    assert (
        make_plan(card, PlanConfig("top", budget="layers=3", batch_size=4)).predicted
        == make_plan(card, PlanConfig("top", budget="layers=3")).predicted
    )  # the card's own batch changes nothing
    # at twice the batch a step costs 1.5 times as much, so fewer layers fit the same seconds
    assert len(at8.layers) < len(at4.layers)
    assert at8.predicted["step_time_s"] <= 6.0 + 1e-9
    same = make_plan(card, PlanConfig("top", budget=f"layers={len(at8.layers)}"))
    assert at8.predicted["step_time_s"] == pytest.approx(1.5 * same.predicted["step_time_s"])
    assert at8.predicted["calibration_batch_positions"] is None  # the fixed COST recorded no positions
    # the unmerged forward, with no measured share, in proportion to the rows
    assert same.predicted["forward_s"] == pytest.approx(0.2)
    assert at8.predicted["forward_s"] == pytest.approx(0.4)
    # memory: all of what training adds grows with the batch (share 1), the resident model does not
    mem4, mem8 = same.predicted["memory"], at8.predicted["memory"]
    assert mem8["peak_mib"] - 100.0 == pytest.approx(2 * (mem4["peak_mib"] - 100.0))
    with pytest.raises(LayercardError, match="batch_size"):
        PlanConfig("top", budget="layers=2", batch_size=0)


@pytest.mark.parametrize("policy", ["card", "card-additive", "uniform", "top", "gradnorm"])
def test_target_reaches_fraction_cheaper_than_all(tiny_card, policy):
    full = make_plan(tiny_card, PlanConfig("all"))
    plan = make_plan(tiny_card, PlanConfig(policy, target=0.7))
    assert plan.predicted["fraction"] >= 0.7 - 1e-9
    assert plan.predicted["params"] < full.predicted["params"]
    # Cheapest within the policy's order: one layer fewer would miss the target (for nested orders).
    if policy in ("top", "gradnorm", "card-additive"):
        smaller = make_plan(tiny_card, PlanConfig(policy, budget=f"layers={len(plan.layers) - 1}"))
        assert smaller.predicted["fraction"] < 0.7


def test_target_with_budget_cap(tiny_card):
    plan = make_plan(tiny_card, PlanConfig("card", target=0.5, budget="modules=16"))
    assert plan.predicted["fraction"] >= 0.5 and len(plan.units) <= 16
    with pytest.raises(LayercardError, match="target 0.99"):
        make_plan(tiny_card, PlanConfig("top", target=0.99, budget="layers=2"))


@pytest.mark.parametrize(
    "budget, expect",
    [("layers=9", "only 8 layers"), ("params=100", "fits no layer"), ("modules=1", "fits no layer"),
     ("step_time=1.0", "fits no layer")],
)  # fmt: skip
def test_impossible_budgets(tiny_card, budget, expect):
    with pytest.raises(LayercardError, match=expect) as e:
        make_plan(tiny_card, PlanConfig("card", budget=budget))
    assert budget.split("=")[0] in str(e.value) and "\n" not in str(e.value)


def test_step_time_budget_needs_cost_model(tiny_card):
    with pytest.raises(LayercardError, match="layercard card"):
        make_plan(dataclasses.replace(tiny_card, cost=None), PlanConfig("top", budget="step_time=9"))


def test_roles_must_be_in_the_card(tiny_card):
    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=2", roles="v"))
    assert [u.role for u in plan.units] == ["v", "v"]
    assert any("approximation" in w for w in plan.warnings)
    with pytest.raises(LayercardError, match="no units for k"):
        make_plan(tiny_card, PlanConfig("top", budget="layers=2", roles="q,k"))


# ---------------------------------------------------------------------------------------------------------
# Ranks and the PEFT config
# ---------------------------------------------------------------------------------------------------------


def test_rank_auto_respects_params_budget(tiny_card, tiny_llama):
    per_layer = 8 * sum(u.d_in + u.d_out for u in tiny_card.units if u.layer == 0)
    budget = 2.5 * per_layer
    plan = make_plan(tiny_card, PlanConfig("card", budget=f"params={budget}", rank="auto"))
    assert plan.predicted["params"] == _cost(plan, tiny_card, "params") <= budget
    ranks = {u.name: u.rank for u in plan.units}
    assert len(set(ranks.values())) > 1  # the budget is spread unevenly by captured@r
    lc = plan.lora_config
    assert lc["rank_pattern"] and set(lc["rank_pattern"]) <= set(lc["target_modules"])
    for name, r in lc["rank_pattern"].items():
        assert name.startswith("model.layers.") and name.endswith("_proj")
        assert r == ranks[name] != lc["r"]
        assert lc["alpha_pattern"][name] == 2 * r  # alpha/r stays 2
    assert all(ranks[n] == lc["r"] for n in ranks if n not in lc["rank_pattern"])
    assert check_plan(plan, tiny_llama)["ok"]
    # its memory is priced at the parameters its ranks hold, not at rank 8 on every module
    from layercard.cost import CostModel

    pr = plan.predicted
    uniform = 8 * sum(u.d_in + u.d_out for u in tiny_card.units if u.layer in plan.layers)
    assert pr["params"] != uniform
    cm = CostModel.from_dict(tiny_card.cost)
    want = cm.memory(plan.layers, pr["modules"], pr["params"], pr["input_width"])["peak_mib"]
    assert pr["memory"]["peak_mib"] == pytest.approx(want)
    # Without a parameter budget, auto spends what uniform rank 8 would on the chosen layers.
    plan2 = make_plan(tiny_card, PlanConfig("top", budget="layers=2", rank="auto"))
    assert plan2.predicted["params"] <= 2 * per_layer


def test_rank_auto_doubles_the_rank_of_most_gain_per_added_parameter():
    """rank auto starts every module at its smallest measured rank and doubles, while it fits, the one
    whose captured gain per added parameter is largest: a narrow module's doublings are cheap."""
    # layer 0: d = 16 (32 parameters per rank), gain 1; layer 1: d = 256 (512 per rank), gain 2;
    # captured@r = gain · (1 − 2^-r) at r = 1, 2, 4, 8. From rank 1 each (544 parameters) within 1056:
    #   0: 1→2 adds 0.25 for 32 (0.0078 each), 1: 1→2 adds 0.5 for 512 (0.00098 each) → 0, now 576
    #   0: 2→4 adds 0.1875 for 64 (0.0029 each), beating 1 again → 0, now 640
    #   0: 4→8 adds 0.0586 for 128; 1's doubling to 1152 no longer fits → 0, now 768
    #   0 is at its highest measured rank and 1 still does not fit: done
    card = _with_widths(synthetic_card([1.0, 2.0]), [16, 256])
    plan = make_plan(card, PlanConfig("all", budget="params=1056", rank="auto"))
    assert {u.layer: u.rank for u in plan.units} == {0: 8, 1: 1}
    assert plan.predicted["params"] == 8 * 32 + 1 * 512


def test_rank_pattern_key_of_layer_1_does_not_hit_layer_11():
    from peft.utils.other import get_pattern_key

    one, eleven = "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"
    assert get_pattern_key([one], eleven) == eleven  # no match: PEFT falls back to the module's own name
    assert get_pattern_key([one], one) == one
    # End to end on a 12-layer model: layer 1's captured@r is flat, so it keeps rank 1 while others grow.
    flat = {str(r): 1.0 for r in (1, 2, 4, 8, 16, 32, 64)}
    grow = {str(r): 1.0 - 2.0**-r for r in (1, 2, 4, 8, 16, 32, 64)}
    caps = [flat if i == 1 else grow for i in range(12)]
    card = synthetic_card([1.0] * 12, captured=caps)
    plan = make_plan(card, PlanConfig("all", rank="auto"))
    ranks = {u.layer: u.rank for u in plan.units}
    assert ranks[1] == 1 and ranks[11] > 1
    assert check_plan(plan, tiny_model("llama", layers=12))["ok"]


def test_check_plan_passes_and_restores_the_model(tiny_card, tiny_llama):
    plan = make_plan(tiny_card, PlanConfig("uniform", budget="layers=3", rank=4, alpha=8))
    ids = torch.arange(3, 19).reshape(1, -1)
    before = tiny_llama(input_ids=ids).logits
    grads = [p.requires_grad for p in tiny_llama.parameters()]
    res = check_plan(plan, tiny_llama)
    assert res["ok"] and res["matched"] == sorted(u.name for u in plan.units)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in tiny_llama.modules())
    assert not hasattr(tiny_llama, "peft_config")
    assert [p.requires_grad for p in tiny_llama.parameters()] == grads
    assert not tiny_llama.training
    assert torch.equal(tiny_llama(input_ids=ids).logits, before)


@pytest.mark.parametrize(
    "defect", ["unmatched_key", "extra_target", "missing_target", "broad_key", "wrong_rank"]
)
def test_check_plan_raises_on_mismatch(tiny_card, tiny_llama, defect):
    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=2"))
    lc = dict(plan.lora_config)
    if defect == "unmatched_key":
        lc["rank_pattern"] = {"model.layers.99.self_attn.q_proj": 4}
        expect = "matches 0"
    elif defect == "extra_target":
        lc["target_modules"] = [*lc["target_modules"], "model.layers.0.self_attn.q_proj"]
        expect = "adapted but not planned: model.layers.0.self_attn.q_proj"
    elif defect == "missing_target":
        lc["target_modules"] = lc["target_modules"][1:]
        expect = "not adapted"
    elif defect == "broad_key":
        lc["rank_pattern"] = {"self_attn.q_proj": 4}
        expect = "matches 2"
    else:
        lc["r"] = 4
        expect = "rank 4"
    bad = dataclasses.replace(plan, lora_config=lc)
    grads = [p.requires_grad for p in tiny_llama.parameters()]
    with pytest.raises(LayercardError, match=expect):
        check_plan(bad, tiny_llama)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in tiny_llama.modules())
    assert [p.requires_grad for p in tiny_llama.parameters()] == grads


def test_plan_json_roundtrip(tiny_card, tmp_path):
    plan = make_plan(tiny_card, PlanConfig("card", budget="params=3000", rank="auto"), card_path="card.json")
    path = plan.save(tmp_path / "plan.json")
    raw = json.loads(path.read_text())
    assert raw["kind"] == "plan" and raw["schema_version"] == 1 and raw["adapter_kind"] == "lora"
    again = Plan.load(path)
    assert again == plan
    a, b = plan.peft_config(), again.peft_config()
    for field in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "bias",
    ):
        assert getattr(a, field) == getattr(b, field)
    assert set(a.target_modules) == {u.name for u in plan.units}
    assert str(a.task_type.value if hasattr(a.task_type, "value") else a.task_type) == "CAUSAL_LM"
    assert plan.card["path"] == "card.json" and plan.card["model_hash"] == tiny_card.model["hash"]
    assert plan.provenance["stage"] == "plan"


def test_a_plan_records_which_card_and_how_it_was_measured(tiny_card, tmp_path):
    """Two cards of one model and task (another seed, dtype or device) hold other numbers: the plan names
    the card by its content hash, as card.json on disk hashes, and by how it was measured."""
    from layercard.artifacts import content_hash

    card_json = tiny_card.save(tmp_path / "card.json")
    card = Card.load(card_json)
    plan = make_plan(card, PlanConfig("card", budget="params=3000", rank="auto"), card_path=str(card_json))
    assert plan.card["content_hash"] == content_hash(card_json)
    assert (plan.card["seed"], plan.card["dtype"], plan.card["device"]) == (
        card.config["seed"],
        "float32",
        "cpu",
    )
    reseeded = dataclasses.replace(card, config={**card.config, "seed": card.config["seed"] + 1})
    other = make_plan(reseeded, PlanConfig("card", budget="params=3000", rank="auto"))
    assert other.card["content_hash"] != plan.card["content_hash"] and other.card["seed"] != plan.card["seed"]
    assert Plan.load(plan.save(tmp_path / "plan.json")).card == plan.card


def test_malformed_plan_file(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"kind": "plan", "schema_version": 1, "units": [{"key": 1}]}))
    with pytest.raises(LayercardError, match="plan.json: provenance: missing") as e:
        Plan.load(p)
    assert "\n" not in str(e.value)
    p.write_text(json.dumps({"kind": "card", "schema_version": 1}))
    with pytest.raises(LayercardError, match="expected a plan"):
        Plan.load(p)


def test_bottleneck_kinds(tiny_card, tiny_llama):
    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=2", kind="houlsby", rank=16))
    assert plan.lora_config is None
    want = {"kind": "houlsby", "bottleneck": 16, "layers": [6, 7], "adapters_per_layer": 2, "d_model": 32}
    assert plan.adapter_config == want
    assert [u.name for u in plan.units] == ["model.layers.6", "model.layers.7"]
    assert plan.predicted["params"] == 2 * 2 * (2 * 32 * 16 + 16 + 32)
    with pytest.raises(LayercardError, match="no LoraConfig"):
        plan.peft_config()
    assert check_plan(plan, tiny_llama)["ok"]
    # a card that does not record the width takes it from what an o or down projection writes, not
    # from the first unit's input (a down projection reads the MLP's wider one)
    blind = dataclasses.replace(tiny_card, model={k: v for k, v in tiny_card.model.items() if k != "d_model"})
    downs = [
        dataclasses.replace(u, role="down", key=f"{u.layer}.down", d_in=86, d_out=32,
                            name=u.name.replace("self_attn.q_proj", "mlp.down_proj"))
        for u in blind.units if u.role == "q"
    ]  # fmt: skip
    down_first = dataclasses.replace(blind, roles=["down", *blind.roles], units=downs + list(blind.units))
    for card in (blind, down_first):
        same = make_plan(card, PlanConfig("top", budget="layers=2", kind="houlsby", rank=16))
        assert same.adapter_config == want and same.predicted["params"] == plan.predicted["params"]


def test_check_model_matches(tiny_card):
    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=1"))
    ok = LoadedModel(
        model=None, tokenizer=None, model_id="tiny", model_hash=tiny_card.model["hash"], source="m"
    )
    check_model_matches(plan, ok)
    other = dataclasses.replace(ok, model_id="other", model_hash="f" * 64)
    with pytest.raises(
        LayercardError, match=r"plan.json is for model tiny \(.*\), but the loaded model is other"
    ):
        check_model_matches(plan, other, where="plan.json")


# ---------------------------------------------------------------------------------------------------------
# Restricted plans
# ---------------------------------------------------------------------------------------------------------


def _without_budget(predicted: dict) -> dict:
    return {k: v for k, v in predicted.items() if k not in ("budget", "budget_used", "target")}


def test_restricted_equals_the_direct_plan(tiny_card, tiny_llama, tmp_path):
    full = make_plan(tiny_card, PlanConfig("all"))
    top = make_plan(tiny_card, PlanConfig("top", budget="layers=3"))
    cut = full.restricted([7, 5, 6], tiny_card, policy="top")
    assert cut.layers == top.layers == [5, 6, 7] and cut.kind == "lora"
    assert cut.units == top.units and cut.lora_config == top.lora_config
    assert cut.predicted == _without_budget(top.predicted)
    assert cut.config == {**top.config, "budget": None}
    assert cut.card == full.card and cut.provenance["stage"] == "plan"
    assert cut.warnings == [w for w in top.warnings if "ignores" not in w]
    assert check_plan(cut, tiny_llama)["ok"]
    assert Plan.load(cut.save(tmp_path / "cut.json")) == cut
    # Restricting to every layer gives the plan back.
    same = full.restricted(full.layers, tiny_card, policy="all")
    assert dataclasses.replace(same, provenance=full.provenance) == full
    single = full.restricted([3], tiny_card, policy="single")
    assert single.config["policy"] == "single" and [u.layer for u in single.units] == [3, 3]
    assert single.predicted["params"] == _cost(single, tiny_card, "params")
    assert single.predicted["step_time_s"] == pytest.approx(_cost(single, tiny_card, "step_time"))


def test_restricted_prices_at_the_plans_own_batches_and_memory_figure(tiny_card):
    at = dict(batch_size=8, grad_accum=2, memory_figure="first_step")
    full = make_plan(tiny_card, PlanConfig("all", **at))
    top = make_plan(tiny_card, PlanConfig("top", budget="layers=3", **at))
    cut = full.restricted([5, 6, 7], tiny_card, policy="top")
    assert cut.predicted == _without_budget(top.predicted)
    # at the card's own batch and figure the same layers are priced otherwise: the case is not idle
    plain = make_plan(tiny_card, PlanConfig("top", budget="layers=3"))
    assert plain.predicted["step_time_s"] != cut.predicted["step_time_s"]


def test_restricted_keeps_ranks_and_rebuilds_patterns(tiny_card, tiny_llama):
    per_layer = 8 * sum(u.d_in + u.d_out for u in tiny_card.units if u.layer == 0)
    plan = make_plan(tiny_card, PlanConfig("card", budget=f"params={2.5 * per_layer}", rank="auto"))
    keep = plan.layers[:-1]
    cut = plan.restricted(keep, tiny_card)
    assert cut.units == [u for u in plan.units if u.layer in keep]
    lc = cut.lora_config
    assert lc["target_modules"] == [u.name for u in cut.units]
    ranks = [u.rank for u in cut.units]
    assert lc["r"] == max(set(ranks), key=lambda r: (ranks.count(r), r))  # the commonest rank
    assert lc["rank_pattern"] == {u.name: u.rank for u in cut.units if u.rank != lc["r"]}
    assert lc["alpha_pattern"] == {n: 2 * r for n, r in lc["rank_pattern"].items()}
    assert lc["lora_alpha"] == 2 * lc["r"]
    assert cut.predicted["params"] == _cost(cut, tiny_card, "params") < plan.predicted["params"]
    assert cut.predicted["modules"] == len(cut.units) and cut.predicted["n_layers"] == len(keep)
    assert cut.predicted["all_layer_params"] == plan.predicted["all_layer_params"]
    assert cut.predicted["captured"] < plan.predicted["captured"]
    assert "budget" not in cut.predicted and cut.config["budget"] is None
    assert cut.config["policy"] == "restricted" and cut.config["rank"] == "auto"
    assert check_plan(cut, tiny_llama)["ok"]


def test_restricted_bottleneck_plan(tiny_card):
    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=3", kind="houlsby", rank=16))
    cut = plan.restricted([6], tiny_card)
    assert cut.lora_config is None and [u.name for u in cut.units] == ["model.layers.6"]
    assert cut.adapter_config == {**plan.adapter_config, "layers": [6]}
    assert cut.predicted["params"] == 2 * (2 * 32 * 16 + 16 + 32)
    assert any("kind houlsby" in w for w in cut.warnings)


def test_restricted_refuses_bad_input(tiny_card):
    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=2"))
    with pytest.raises(LayercardError, match=r"layers \[0\] are not in the plan's layers \[6, 7\]"):
        plan.restricted([0, 7], tiny_card)
    with pytest.raises(LayercardError, match="no layers"):
        plan.restricted([], tiny_card)
    other = dataclasses.replace(tiny_card, model={**tiny_card.model, "id": "other", "hash": "f" * 64})
    with pytest.raises(LayercardError, match="card is of model other"):
        plan.restricted([7], other)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card_file(tiny_card, tmp_path_factory):
    return tiny_card.save(tmp_path_factory.mktemp("card") / "card.json")


def test_cli_plan_writes_plan(card_file, tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--card", str(card_file), "--policy", "card", "--budget", "layers=3", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["layers"] == Plan.load(out).layers and len(summary["layers"]) == 3
    r = CliRunner().invoke(app, [*args, "--rank", "auto"])  # the rich summary
    assert r.exit_code == 0, r.output
    assert "predicted gain" in r.output and "wrote" in r.output


@pytest.mark.parametrize(
    "extra, expect",
    [(["--policy", "best"], "policy: must be one of"), (["--policy", "top", "--kind", "ia3"], "got 'ia3'"),
     (["--policy", "top", "--score", "magic"], "got 'magic'"),
     (["--policy", "top", "--budget", "x=1"], "x=1"), (["--policy", "top", "--rank", "big"], "--rank")],
)  # fmt: skip
def test_cli_plan_errors_write_nothing(card_file, tmp_path, extra, expect):
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(
        app, ["plan", "--card", str(card_file), "--budget", "layers=2", "--out", str(out), *extra]
    )
    assert r.exit_code != 0
    assert expect in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_cli_plan_refuses_to_write_over_its_card(card_file, tmp_path, monkeypatch):
    copy = tmp_path / "card.json"
    copy.write_bytes(card_file.read_bytes())
    monkeypatch.chdir(tmp_path)
    for card, out in (("card.json", "card.json"), (str(tmp_path), str(copy)), (str(copy), "./card.json")):
        r = CliRunner().invoke(app, ["plan", "--card", card, "--budget", "params=0.25x", "--out", out])
        assert r.exit_code == 2 and "which the plan would overwrite" in r.output, r.output
    assert copy.read_bytes() == card_file.read_bytes()


def test_cli_check_model(tiny_card, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    from layercard.models import load_model

    folder_hash = load_model(str(folder)).model_hash
    out = tmp_path / "plan.json"
    # A card of other weights is refused, and no plan is written.
    wrong = tiny_card.save(tmp_path / "wrong.json")
    base = [
        "plan",
        "--policy",
        "top",
        "--budget",
        "layers=2",
        "--out",
        str(out),
        "--check-model",
        str(folder),
    ]
    r = CliRunner().invoke(app, [*base, "--card", str(wrong)])
    assert r.exit_code != 0 and "wrong.json is for model tiny" in r.output, r.output
    assert not out.exists()
    right = dataclasses.replace(tiny_card, model={**tiny_card.model, "hash": folder_hash})
    r = CliRunner().invoke(app, [*base, "--card", str(right.save(tmp_path / "right.json")), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["check"]["ok"] and out.exists()


@pytest.mark.smollm2
def test_check_plan_on_smollm2(smollm2):
    """Real module paths of a 30-layer model: layer 1's and 21's keys must not touch layer 11 (or 1x)."""
    flat = {str(r): 1.0 for r in (1, 2, 4, 8, 16, 32, 64)}
    grow = {str(r): 1.0 - 2.0**-r for r in (1, 2, 4, 8, 16, 32, 64)}
    card = synthetic_card([1.0] * 30, captured=[flat if i in (1, 21) else grow for i in range(30)], d=576)
    plan = make_plan(card, PlanConfig("all", rank="auto"))
    ranks = {u.layer: u.rank for u in plan.units}
    assert ranks[1] == ranks[21] == 1 and all(ranks[i] > 1 for i in range(10, 20))
    assert check_plan(plan, smollm2.model)["ok"]
    with pytest.raises(LayercardError, match="plan is for model synthetic"):
        check_model_matches(plan, smollm2)


def test_cli_search_plan_prints_the_frontier_and_draws_it(card_file, tmp_path):
    out = tmp_path / "plan.json"
    args = [
        "plan",
        "--card",
        str(card_file),
        "--policy",
        "recommend",
        "--budget",
        "params=0.5x",
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Frontier" in r.output and "◀ plan" in r.output and "predicted" in r.output
    png = tmp_path / "plan_frontier.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    plan = Plan.load(out)
    assert plan.config["policy"] == "recommend" and plan.predicted["frontier"]["params"]
    r = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "p2.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["figure"].endswith("p2_frontier.png")


def test_frontier_rows_fit_an_80_column_terminal_whole(card_file, tmp_path):
    """Each frontier row stays on one line, none of its cells cut, on the narrowest usual terminal."""
    args = ["plan", "--card", str(card_file), "--budget", "params=0.5x", "--out", str(tmp_path / "p.json")]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("│")]
    assert rows and all(len(line) <= 80 and "…" not in line for line in rows), r.output
    assert all(re.search(r"│ \d\.\d{3} ± \d\.\d{3} │", line) for line in rows), r.output
    assert any(line.rstrip().endswith("◀ plan │") for line in rows), r.output


def test_names_near_the_right_end_of_an_axis_are_placed_left_of_their_point():
    from layercard.plan.figures import _position

    xs = [1e5, 1e6, 1e7]
    assert _position(1e5, xs, True) == 0.0 and _position(1e7, xs, True) == 1.0
    assert _position(1e6, xs, True) == pytest.approx(0.5)
    assert _position(1e6, xs, False) == pytest.approx((1e6 - 1e5) / (1e7 - 1e5))  # near the left, linear
    assert _position(5.0, [5.0, 5.0], True) == 0.5  # one value: no side to prefer
    assert _position(1.0, [0.0, 10.0], True) == 0.5  # a non-positive cost has no log position
    assert _position(1.0, [0.0, 10.0], False) == pytest.approx(0.1)


def test_an_axis_is_log_only_where_its_costs_span_a_decade(card_file, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layercard.plan import Plan
    from layercard.plan.figures import _wide, plot_frontier

    assert _wide([1e5, 2e6]) and not _wide([1080.0, 1620.0]) and not _wide([]) and not _wide([0.0, 50.0])
    out = tmp_path / "p.json"
    args = ["plan", "--card", str(card_file), "--budget", "params=0.5x,memory=2x", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    seen: dict[str, str] = {}
    real = plt.Figure.savefig

    ticks: dict[str, list] = {}

    def keep_scales(fig, *a, **k):  # the axes' scales as drawn, before the figure is closed
        seen.update({ax.get_xlabel(): ax.get_xscale() for ax in fig.axes if ax.get_xlabel()})
        fig.canvas.draw()
        for ax in fig.axes:
            shown = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
            ticks[ax.get_xlabel()] = [t for t in shown if ax.bbox.x0 - 5 <= t.get_window_extent().x0]
        return real(fig, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep_scales)
        plot_frontier(plan, tmp_path / "f.png")
        for kind, rows in plan.predicted["frontier"].items():
            label = next(k for k in seen if k.startswith(("trainable", "peak")[kind == "memory"]))
            assert seen[label] == ("log" if _wide([row[kind] for row in rows]) else "linear"), (kind, seen)
        assert sorted(seen.values()) == ["linear", "log"]  # parameters span decades, memory does not
        # a log axis's ticks are numbers, not the source of the formulas matplotlib writes them as
        log_ticks = [t.get_text() for label, s in seen.items() if s == "log" for t in ticks[label]]
        assert log_ticks and not any("$" in t or "mathdefault" in t for t in log_ticks), log_ticks
        # a 70B model's peaks (six-figure MiB): the labels do not run into each other
        big = {**plan.predicted["frontier"]}
        big["memory"] = [{**r, "memory": r["memory"] * 600} for r in big["memory"]]
        budgets = [b for b in plan.predicted["budgets"] if not b.startswith("memory")]
        scaled = dataclasses.replace(plan, predicted={**plan.predicted, "frontier": big, "budgets": budgets})
        plot_frontier(scaled, tmp_path / "g.png")
        label = next(k for k in ticks if k.startswith("peak"))
        boxes = sorted((t.get_window_extent() for t in ticks[label]), key=lambda b: b.x0)
        assert len(boxes) >= 2 and all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes)), ticks[label]


def test_frontier_table_keeps_the_cheapest_of_equal_looking_rows_and_the_plan():
    from layercard.cli.plan import shown_frontier

    def row(q, layers, rank=2):
        return {"matrices": "mlp", "layers": layers, "rank": rank, "quality": q}

    rows = [row(0.9001, "last-2"), row(0.9003, "last-3"), row(0.95, "last-4"), row(0.9502, "last-5"),
            row(0.9504, "last-6"), row(0.96, "all")]  # fmt: skip
    shown, step = shown_frontier(rows, row(0.9504, "last-6"))
    assert [r["layers"] for r in shown] == ["last-2", "last-4", "last-6", "all"] and step == 0.001
    assert shown_frontier(rows, row(0.9, "elsewhere"))[0] == [rows[0], rows[2], rows[5]]


def test_a_long_frontier_table_keeps_rows_spaced_in_quality():
    """A hundred-layer frontier (a last-n row per n) keeps a screenful of rows spread over its range of
    predicted quality, its first and last, and the plan's own row."""
    from layercard.cli.plan import FRONTIER_ROWS, shown_frontier

    rows = [{"matrices": "mlp", "layers": f"last-{n}", "rank": 2, "quality": 0.3 + 0.6 * n / 125} for n in
            range(1, 126)]  # fmt: skip
    chosen = rows[40]
    shown, step = shown_frontier(rows, chosen)
    assert len(shown) <= FRONTIER_ROWS + 1 and len(shown) >= FRONTIER_ROWS - 2
    assert shown[0] is rows[0] and shown[-1] is rows[-1] and chosen in shown
    qs = [r["quality"] for r in shown if r is not chosen]
    assert all(b - a >= step - 1e-3 for a, b in zip(qs, qs[1:-1], strict=False))
    assert step == pytest.approx(0.6 * 124 / 125 / (FRONTIER_ROWS - 1), abs=1e-3)


def test_cli_plan_recommends_when_no_policy_is_named(card_file, tmp_path):
    out = tmp_path / "plan.json"
    base = ["plan", "--card", str(card_file), "--out", str(out)]
    r = CliRunner().invoke(app, [*base, "--budget", "params=0.5x", "--json"])
    assert r.exit_code == 0, r.output
    assert Plan.load(out).config["policy"] == "recommend"
    out.unlink()
    r = CliRunner().invoke(app, base)  # the recommendation needs a budget or a target
    assert r.exit_code != 0 and "policy recommend needs a budget" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    (tmp_path / "plan_frontier.png").unlink()
    (tmp_path / "plan_frontier.png").mkdir()  # the figure cannot be written: neither is the plan
    r = CliRunner().invoke(app, [*base, "--budget", "params=0.5x"])
    assert r.exit_code != 0 and not out.exists() and "the frontier figure" in r.output, r.output


def test_cli_target_and_memory_budget(card_file, tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []  # the figure's horizontal lines: the target's, and no other
    draw = matplotlib.axes.Axes.axhline

    def axhline(self, y=0, *args, **kwargs):
        lines.append((y, kwargs.get("label")))
        return draw(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    bars = []  # error bars without a marker: the plan's own expected error
    bar = matplotlib.axes.Axes.errorbar

    def errorbar(self, x, y, *args, **kwargs):
        if kwargs.get("fmt") == "none":
            bars.append((y[0], kwargs.get("yerr")[0]))
        return bar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    out = tmp_path / "plan.json"
    base = ["plan", "--card", str(card_file), "--policy", "recommend", "--out", str(out)]
    r = CliRunner().invoke(app, [*base, "--target", "0.5", "--budget", "memory=1.2x"])
    assert r.exit_code == 0, r.output
    # one panel per budgeted cost (memory, and params always), each with the target drawn across it
    assert lines and set(lines) == {(0.5, "target 0.5")} and (tmp_path / "plan_frontier.png").is_file()
    plan = Plan.load(out)
    assert plan.config["target"] == 0.5 and plan.predicted["quality"]["fraction"] >= 0.5
    chosen = plan.predicted["candidate"]
    assert len(bars) == 2 and set(bars) == {(chosen["quality"], chosen["error"])}
    assert "target 0.5" in r.output and "cheapest placement predicted to reach" in r.output
    assert plan.predicted["memory"]["peak_mib"] <= 1.2 * plan.predicted["reference"]["memory"] * (1 + 1e-9)
    assert "memory" in plan.predicted["frontier"]  # cheapest in the budget's kind
    said = " ".join(r.output.split())
    # off the params frontier, as the cheapest in memory: said so, not put down to a restriction
    assert "off this frontier: it is the cheapest in memory predicted to reach 0.5" in said
    assert "keeps to a restriction" not in said
    out.unlink()
    r = CliRunner().invoke(app, [*base, "--target", "1.5"])
    assert r.exit_code != 0 and "target" in r.output and not out.exists()


def test_amount_writes_costs_as_messages_show_them():
    from layercard.plan.space import amount

    assert amount(12288, "params") == "12,288 params"
    assert amount(1536.4, "memory") == "1,536 MiB"
    assert amount(0.4412, "step_time") == "0.441 s"
    assert amount(3, "layers") == "3 layers"


def test_frontier_table_cells_are_whole_numbers_not_scientific():
    from layercard.plan.space import amount

    assert amount(81408.0, "params", unit=False) == "81,408"
    assert amount(1648.3, "memory", unit=False) == "1,648"
    assert amount(1.2346, "step_time", unit=False) == "1.23"


def test_frontier_rows_beyond_a_budget_are_marked_and_the_plan_is_always_shown(card_file, tmp_path):
    from layercard.plan.frontier import over_budget

    reference = {"params": 1000.0, "modules": 10.0}
    assert over_budget({"params": 300.0, "modules": 4.0}, ["params=0.25x", "modules=5"], reference) == [
        "params=0.25x"
    ]
    assert over_budget({"params": 250.0, "modules": 5.0}, ["params=0.25x", "modules=5"], reference) == []
    out = tmp_path / "p.json"
    args = ["plan", "--card", str(card_file), "--budget", "params=0.5x,modules=0.25x", "--out", str(out)]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    p = Plan.load(out).predicted
    rows = [line for line in r.output.splitlines() if line.startswith("│")]
    # each printed row is marked "over" exactly where plan.json's frontier row exceeds a budget
    beyond = {
        (row["matrices"], row["layers"], str(row["rank"])): bool(
            over_budget(row, p["budgets"], p["reference"])
        )
        for rows_of_kind in p["frontier"].values()
        for row in rows_of_kind
    }
    for line in rows:
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[-1] != "◀ plan":
            assert (cells[-1] == "over") == beyond[tuple(cells[:3])], line
    assert any(line.rstrip().endswith("over │") for line in rows), r.output
    assert sum(line.rstrip().endswith("◀ plan │") for line in rows) == len(p["frontier"]), r.output


def test_each_costs_frontier_keeps_to_the_budgets_on_the_other_costs(card_file):
    from layercard.card import Card
    from layercard.plan.frontier import over_budget
    from layercard.plan.recommend import price

    card = Card.load(card_file)
    both = make_plan(card, PlanConfig(policy="recommend", budget="params=0.5x,modules=0.25x")).predicted
    for kind, rows in both["frontier"].items():
        others = [b for b in both["budgets"] if not b.startswith(f"{kind}=")]
        assert rows and not any(over_budget(r, others, both["reference"]) for r in rows), kind
        assert any(r["matrices"] == both["candidate"]["matrices"] and r[kind] == both["candidate"][kind]
                   for r in rows), kind  # fmt: skip
    # one budget: the frontier of its own cost is the unconstrained one; a budget narrows another cost's
    alone = make_plan(card, PlanConfig(policy="recommend", budget="modules=0.25x")).predicted
    search = price(card)
    assert len(alone["frontier"]["modules"]) == len(search.frontier("modules"))
    assert len(alone["frontier"]["params"]) < len(search.frontier("params"))


@pytest.mark.parametrize("policy", ["uniform", "recommend"])
def test_a_plan_whose_dropout_the_card_did_not_calibrate_says_so(tiny_card, policy):
    budget = "params=0.5x" if policy == "recommend" else "layers=4"
    # the card calibrated without dropout; cards from before it was recorded read the same
    assert tiny_card.cost["dropout"] == 0.0
    old = dataclasses.replace(tiny_card, cost={k: v for k, v in tiny_card.cost.items() if k != "dropout"})
    same = make_plan(old, PlanConfig(policy, budget=budget, dropout=0.0))
    assert not any("calibrate-dropout" in w for w in same.warnings)
    other = make_plan(old, PlanConfig(policy, budget=budget, dropout=0.05))
    [warning] = [w for w in other.warnings if "calibrate-dropout" in w]
    assert "trained with LoRA dropout 0, this plan's is 0.05" in warning
    assert other.lora_config["lora_dropout"] == 0.05
    # a card calibrated at the plan's dropout prices it without the caveat
    calibrated = dataclasses.replace(tiny_card, cost={**tiny_card.cost, "dropout": 0.05})
    matched = make_plan(calibrated, PlanConfig(policy, budget=budget, dropout=0.05))
    assert not any("calibrate-dropout" in w for w in matched.warnings)
    # a restricted plan keeps the caveat where it applies
    kept = other.restricted(other.layers[:1], tiny_card)
    assert any("calibrate-dropout" in w for w in kept.warnings)


def test_plans_price_step_time_by_the_adapted_modules_width(tiny_card):
    from layercard.plan.recommend import _costs_fn
    from layercard.plan.space import build_space

    # q (32 → 32) and v (32 → 16) of the tiny model: a mean width of 56 per module
    card = dataclasses.replace(tiny_card, cost={**tiny_card.cost, "step_module_width": 56.0})
    cm = CostModel.from_dict(card.cost)
    space, _ = build_space(card, ("q", "v"), "gradnorm", kind="lora", unit_rank=4)
    layers = [5, 6, 7]
    units = [u for layer in layers for u in space.units[layer]]
    width = sum(u.d_in + u.d_out for u in units)
    params = sum(4 * (u.d_in + u.d_out) for u in units)
    assert space.step_time(layers) == pytest.approx(cm.step_time(layers, len(units), params, width))
    # the search prices a placement the same way; the narrower role alone is the cheaper one per module
    costs = _costs_fn(card)
    v_only = [u for u in units if u.role == "v"]
    q_only = [u for u in units if u.role == "q"]
    assert costs(v_only, [4] * 3)["step_time"] == pytest.approx(
        cm.step_time(
            layers, 3, sum(4 * (u.d_in + u.d_out) for u in v_only), sum(u.d_in + u.d_out for u in v_only)
        )
    )
    assert costs(v_only, [4] * 3)["step_time"] < costs(q_only, [4] * 3)["step_time"]


# ---------------------------------------------------------------------------------------------------------
# Which memory figure prices a plan
# ---------------------------------------------------------------------------------------------------------


def _two_figures(card: Card) -> Card:
    """``card`` whose cost model also kept first-step memory terms, lower than the window's in every term."""
    first = {"memory_base_mib": 105.0, "memory_per_layer_mib": 3.0, "memory_per_module_mib": 1.0,
             "memory_per_mparam_mib": 16.0, "memory_position_share": None}  # fmt: skip
    return dataclasses.replace(
        card, cost=COST | {"memory_kind": "process_peak_rss", "memory_first_step": first}
    )


@pytest.mark.parametrize("policy", ["top", "recommend"])
def test_a_memory_budget_reads_the_figure_of_the_process_that_will_train(tiny_card, policy, monkeypatch):
    import layercard.cost as cost_module

    card = _two_figures(tiny_card)
    cm = CostModel.from_dict(card.cost)
    half = list(range(N_LAYERS // 2, N_LAYERS))
    params = 8 * sum(u.d_in + u.d_out for u in card.units if u.layer in half)
    width = sum(u.d_in for u in card.units if u.layer in half)
    window = cm.peak_memory(half, 2 * len(half), params, width)
    first = cm.first_step_model().peak_memory(half, 2 * len(half), params, width)
    assert first < window
    budget = Budget("memory", (first + window) / 2)  # the top half fits by the first steps' figure only
    plans = {
        f: make_plan(card, PlanConfig(policy, budget=budget, memory_figure=f))
        for f in ("first_step", "window")
    }
    for figure, plan in plans.items():
        assert plan.config["memory_figure"] == plan.predicted["memory_figure"] == figure
        assert peak_of(plan.predicted["memory"], figure) <= budget.value * (1 + 1e-9)
    # priced for a process of its own, the plan may go deeper or wider than priced for the card's process
    assert plans["first_step"].predicted["params"] > plans["window"].predicted["params"]
    assert peak_of(plans["first_step"].predicted["memory"], "window") > budget.value
    # auto: the figure a training run in this process would take
    monkeypatch.setattr(cost_module, "_calibrated_here", False)
    assert make_plan(card, PlanConfig(policy, budget=budget)).config["memory_figure"] == "first_step"
    monkeypatch.setattr(cost_module, "_calibrated_here", True)
    assert make_plan(card, PlanConfig(policy, budget=budget)).config["memory_figure"] == "window"
    # a card that kept one figure prices by it whatever is asked
    assert (
        make_plan(tiny_card, PlanConfig(policy, budget=budget, memory_figure="first_step")).config[
            "memory_figure"
        ]
        == "window"
    )


def test_memory_figure_is_checked_and_peak_of_reads_each():
    with pytest.raises(LayercardError, match="memory_figure"):
        PlanConfig("recommend", budget="params=0.5x", memory_figure="resident")
    memory = {"peak_mib": 10.0, "first_step": {"peak_mib": 8.0}}
    assert peak_of(memory, "window") == 10.0 and peak_of(memory, "first_step") == 8.0
    assert peak_of({"peak_mib": 10.0}, "first_step") == 10.0 and peak_of(None, "window") is None
    assert peak_text({"peak_mib": 1234.4}, "window") == "1,234 MiB"
    assert peak_text(memory, "first_step").startswith("8 MiB (the first steps' figure")
    # what the peak measures is said where the card recorded it
    said = peak_text({"peak_mib": 1234.4, "kind": "process_peak_rss"}, "window")
    assert said == "1,234 MiB (process's resident peak)"
    assert peak_text({**memory, "kind": "cuda_max_memory_allocated"}, "first_step").startswith(
        "8 MiB (CUDA allocator's peak; the first steps' figure"
    )
    assert CostModel.from_dict(COST | {"memory_kind": "process_peak_rss"}).memory([0], 2)["kind"] == (
        "process_peak_rss"
    )


def test_the_frontier_figure_names_the_first_steps_memory_figure(tiny_card, tmp_path, monkeypatch):
    import matplotlib.axes

    from layercard.plan.figures import plot_frontier

    labels: list[str] = []
    set_xlabel = matplotlib.axes.Axes.set_xlabel
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set_xlabel",
        lambda self, text, *a, **k: labels.append(text) or set_xlabel(self, text),
    )
    card = _two_figures(tiny_card)
    for figure in ("first_step", "window"):
        plan = make_plan(card, PlanConfig("recommend", budget="memory=0.8x", memory_figure=figure))
        plot_frontier(plan, tmp_path / f"{figure}.png")
    memory = [x for x in labels if x.startswith("peak training memory")]
    assert memory == ["peak training memory (MiB), the first steps' figure: a training process of its own",
                      "peak training memory (MiB)"]  # fmt: skip


def test_a_memory_budget_priced_at_a_runs_largest_micro_batch_takes_less(tiny_card, tmp_path):
    from layercard.cost import peak_of

    # a calibration batch of 192 positions, half of whose added memory grows with them
    cost = COST | {"batch_positions": 192, "memory_position_share": 0.5, "step_position_share": 0.5}
    card_file = dataclasses.replace(tiny_card, cost=cost).save(tmp_path / "card.json")

    said: list[str] = []

    def plan(*extra: str) -> Plan:
        out = tmp_path / f"p{len(list(tmp_path.iterdir()))}.json"
        args = ["plan", "--card", str(card_file), "--memory-figure", "window", *extra, "--out", str(out)]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        said.append(r.output)
        return Plan.load(out)

    ref = plan("--budget", "params=1x")  # the reference itself, priced at the card's batch
    cap = peak_of(ref.predicted["memory"], "window")
    at_card = plan("--budget", f"memory={cap:.3f}")
    assert at_card.predicted["params"] == ref.predicted["params"]
    longer = 1.5 * cost["batch_positions"]
    at_run = plan("--budget", f"memory={cap:.3f}", "--peak-positions", str(longer))
    assert at_run.config["peak_positions"] == longer
    assert at_run.predicted["calibration_memory_positions"] == pytest.approx(longer)
    assert at_run.predicted["params"] < ref.predicted["params"]  # the reference no longer fits
    assert peak_of(at_run.predicted["memory"], "window") <= cap
    # step time is priced at the card's batch still
    assert at_run.predicted["calibration_batch_positions"] == cost["batch_positions"]
    from layercard.plan.predict import positions_text

    assert positions_text(at_run.config) == "288 in the largest micro-batch"
    assert positions_text(at_card.config) == ""
    # a memory budget checked at the card's batch says so, and how to read a run's positions
    hint = "not at the run's own batches; `layercard train --dry-run`"
    assert [hint in " ".join(o.split()) for o in said] == [False, True, False]
    assert positions_text({"step_positions": 252.7, "peak_positions": 264.0}) == (
        "253 padded positions per step and 264 in the largest micro-batch"
    )


def test_a_budget_every_placement_fits_says_it_does_not_constrain(tiny_card):
    loose = make_plan(tiny_card, PlanConfig("recommend", budget="params=1e9"))
    (line,) = [w for w in loose.warnings if w.startswith("budget params=")]
    assert "every placement the search considers fits under it" in line and "x the reference)" in line
    tight = make_plan(tiny_card, PlanConfig("recommend", budget="params=0.5x"))
    assert not any("every placement the search considers" in w for w in tight.warnings)
    # a budget with a unit is said with it, and so is the costliest placement's cost
    loose = make_plan(tiny_card, PlanConfig("recommend", budget="memory=1e6"))
    (line,) = [w for w in loose.warnings if w.startswith("budget memory=")]
    # (a large whole number is grouped for reading)
    assert line.startswith("budget memory=1,000,000 MiB: every")
    assert re.search(r"costliest, [\d,.]+ MiB,", line)
    with pytest.raises(LayercardError, match=r"^budgets step_time=1e-09 s: no placement fits; .* s \("):
        make_plan(tiny_card, PlanConfig("recommend", budget="step_time=1e-9"))


@pytest.mark.parametrize("kind", ["params", "step_time", "memory"])
def test_the_least_an_unfittable_budget_is_told_fits_when_given_back(tiny_card, kind):
    # rounded to nearest, the least quoted could be under the least priced, and be refused in turn
    for budget in (f"{kind}=1e-9", f"{kind}=1e-9x"):
        with pytest.raises(LayercardError, match="the least the search priced: ") as e:
            make_plan(tiny_card, PlanConfig("recommend", budget=budget))
        least = re.search(rf"priced: {kind}=([\d,.]+)(?: s| MiB)? \(([\d.e+-]+)x\)", str(e.value))
        assert least, str(e.value)
        for given in (least[1].replace(",", ""), least[2] + "x"):
            assert make_plan(tiny_card, PlanConfig("recommend", budget=f"{kind}={given}")).layers


def test_a_card_without_any_gradient_says_its_predictions_rest_on_size_and_depth(tiny_card):
    cfg = PlanConfig("recommend", budget="params=0.5x")
    assert not any("no unit has a gradient" in w for w in make_plan(tiny_card, cfg).warnings)
    silent = dataclasses.replace(
        tiny_card, units=[dataclasses.replace(u, grad_norm=0.0) for u in tiny_card.units]
    )
    (line,) = [w for w in make_plan(silent, cfg).warnings if "no unit has a gradient" in w]
    assert "capacity share of the reference is undefined" in line


def test_a_rank_past_the_modules_width_is_said(tiny_card):
    width = min(min(u.d_in, u.d_out) for u in tiny_card.units)
    assert not any(
        w.startswith("rank: ") for w in make_plan(tiny_card, PlanConfig("all", rank=width)).warnings
    )
    (line,) = [
        w for w in make_plan(tiny_card, PlanConfig("all", rank=width * 4)).warnings if w.startswith("rank: ")
    ]
    assert f"at rank {width * 4}" in line and "adds parameters but no capacity" in line


def test_the_frontier_plan_json_keeps_is_non_dominated_by_its_own_numbers():
    # a real card near saturation, where neighbours along the frontier differ by under 1e-4
    repo = Path(__file__).resolve().parents[1]
    card = Card.load(repo / "benchmarks/results/cost/seventeenth-fresh/e2e_nlg/card/card.json")
    plan = make_plan(card, PlanConfig("recommend", budget="params=0.25x"))
    rows = plan.predicted["frontier"]["params"]
    assert len(rows) > 2
    for a in rows:
        for b in rows:
            assert not (
                b["params"] <= a["params"]
                and b["quality"] >= a["quality"]
                and (b["params"], b["quality"]) != (a["params"], a["quality"])
            ), (a, b)


def test_rounding_up_keeps_exact_values_and_the_digits_shown():
    from layercard.plan.space import amount, at_least

    assert at_least(1 / 30, 3) == pytest.approx(0.0334) and at_least(0.0333, 3) == pytest.approx(0.0333)
    assert amount(1.5149, "step_time", up=True) == "1.52 s" and amount(1.5149, "step_time") == "1.51 s"
    assert (
        amount(2553.2, "memory", up=True) == "2,554 MiB" and amount(2553.0, "memory", up=True) == "2,553 MiB"
    )


def test_a_budget_is_loose_when_every_placement_the_recommendation_considers_fits(tiny_card):
    from layercard.plan import quality as Q
    from layercard.plan.recommend import price

    search = price(tiny_card, Q.default_model(), "auto")
    considered = max(c.costs["params"] for c in search.candidates if search.supported(c))
    assert max(c.costs["params"] for c in search.candidates) > considered  # rank 32 lies outside
    plan = make_plan(tiny_card, PlanConfig("recommend", budget=f"params={considered:.0f}"))
    (line,) = [w for w in plan.warnings if "every placement the search considers fits" in w]
    assert f"the costliest, {considered:,.0f}," in line


def test_a_plan_of_several_micro_batches_a_step_prices_each(tiny_card):
    one = make_plan(tiny_card, PlanConfig("all", rank=4))
    four = make_plan(tiny_card, PlanConfig("all", rank=4, grad_accum=4))
    assert four.predicted["step_time_s"] == pytest.approx(4 * one.predicted["step_time_s"])
    assert four.config["grad_accum"] == 4 and four.predicted["step_micro_batches"] == 4
    assert four.predicted["memory"]["peak_mib"] == pytest.approx(one.predicted["memory"]["peak_mib"])


@pytest.mark.parametrize(
    "budget, said",
    [
        (
            "memory=150",
            "fits memory=150 MiB: the cheapest that covers it, q,v · all · r=1, needs memory=183 MiB (",
        ),
        (
            "step_time=3",
            "fits step_time=3 s: the cheapest that covers it, q,v · all · r=1, needs step_time=6.6 s (",
        ),
        (  # the budget that rules them out, not the first listed
            "params=1x,step_time=3",
            "fits step_time=3 s: the cheapest that covers it, q,v · all · r=1, needs step_time=6.6 s (",
        ),
    ],
)
def test_depth_notes_give_budgets_and_costs_with_their_units(tiny_card, budget, said):
    varied = dataclasses.replace(
        tiny_card, task={**tiny_card.task, "target_entropy": 5.0, "target_entropy_tokens": 2048}
    )
    (note,) = [w for w in make_plan(varied, PlanConfig(budget=budget)).warnings if "leaves depth" in w]
    assert said in note


def test_budgets_refuse_digit_separators_and_take_a_list():
    from layercard.config.budget import Budgets

    for text in ("params=1_000k", "memory=6_144", "step_time=1_0"):
        with pytest.raises(LayercardError, match="has an underscore") as e:
            Budget.parse(text)
        assert "\n" not in str(e.value)
    # YAML writes a list where the command line writes commas
    both = PlanConfig(budget=["params=0.25x", "step_time=0.6x"]).budget
    assert both == Budgets.parse("params=0.25x,step_time=0.6x") and str(both) == "params=0.25x,step_time=0.6x"
    with pytest.raises(LayercardError, match="budget: budget 3: each entry of a budget list must be") as e:
        PlanConfig(budget=["params=0.25x", 3])
    assert "\n" not in str(e.value)
    from layercard.pipeline.config import parse_config

    run = parse_config(
        {
            "task": "synthetic:facts",
            "placements": [
                {"name": "a", "policy": "recommend", "budget": ["params=0.25x", "step_time=0.6x"]}
            ],
        }
    )
    assert str(run.placements[0].plan.budget) == "params=0.25x,step_time=0.6x"


def _edit(*path):
    """A change that sets ``d[path[0]]...[path[-2]] = path[-1]`` of a plan.json dict."""

    def change(d):
        *keys, last, value = path
        for k in keys:
            d = d[k]
        d[last] = value(d) if callable(value) else value

    return change


def _pattern(attr, value, key=None):
    """A change that sets ``lora_config[attr][key]`` (default: the first module of its rank pattern)."""

    def change(d):
        lora = d["lora_config"]
        lora[attr][key or next(iter(lora["rank_pattern"]))] = value

    return change


def _unit_rank(patterned):
    """A change that doubles the rank of the first unit with (or without) a rank_pattern entry."""

    def change(d):
        pattern = d["lora_config"]["rank_pattern"]
        next(u for u in d["units"] if (u["name"] in pattern) == patterned)["rank"] *= 2

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_edit("lora_config", "r", 2.5), "lora_config.r: must be an integer >= 1, got 2.5"),
        (_pattern("rank_pattern", 2.5),
         r"lora_config.rank_pattern\.model\..*: must be an integer >= 1, got 2\.5"),
        (_pattern("rank_pattern", 0), r"lora_config.rank_pattern\..*: must be an integer >= 1, got 0"),
        (_pattern("alpha_pattern", "x"),
         r"lora_config.alpha_pattern\..*: must be a finite number > 0, got 'x'"),
        (_pattern("rank_pattern", 4, "q_proj"),
         "lora_config.rank_pattern: keys must be modules of the plan's units, got 'q_proj'"),
        (_pattern("alpha_pattern", 4, "model.layers.99.x"),
         "lora_config.alpha_pattern: keys must be modules of the plan's units"),
        (_unit_rank(True), r"units\[\d+\].rank: must be lora_config's rank of .* \(its rank_pattern\), got"),
        (_unit_rank(False), r"units\[\d+\].rank: must be lora_config's rank of .* \(its r\), got"),
        (_edit("lora_config", "target_modules", "all-linear"), "lora_config.target_modules: must be a list"),
        (_edit("lora_config", "target_modules", lambda lc: [1] * len(lc["target_modules"])),
         r"lora_config.target_modules\[0\]: must be text"),
        (lambda d: d.update(units=[], layers=[]), "units: must list at least one planned unit"),
        (_edit("config", "alpha", "x"), "config.alpha: must be a finite number > 0, got 'x'"),
        (_edit("config", "dropout", 2.0), "config.dropout: must be a probability below 1, got 2.0"),
        (_edit("config", "rank", 0), "config.rank: must be an integer >= 1 or 'auto', got 0"),
        (_edit("config", "roles", "q,v"), "config.roles: must be a list"),
        (_edit("config", "score", "magic"), "config.score: must be one of"),
        (_edit("config", "seed", -1), "config.seed: must be an integer >= 0, got -1"),
    ],
)  # fmt: skip
def test_an_inconsistent_plan_json_is_refused_on_load_naming_the_field(tiny_card, tmp_path, change, message):
    plan = make_plan(tiny_card, PlanConfig("card", budget="params=3000", rank="auto"))
    d = plan.to_dict()
    assert d["lora_config"]["rank_pattern"] and d["lora_config"]["alpha_pattern"]  # ranks differ
    change(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(LayercardError, match=f"^{re.escape(str(path))}: {message}") as e:
        Plan.load(path)
    assert "\n" not in str(e.value)
    # the plan as written loads, and so does one whose settings were made by restricting it
    assert Plan.load(plan.save(tmp_path / "ok.json")) == plan
    again = plan.restricted(plan.layers[:1], tiny_card)
    assert Plan.load(again.save(tmp_path / "restricted.json")) == again


def test_the_frontier_figures_cost_ticks_are_labelled_by_their_own_values(tiny_card, tmp_path, monkeypatch):
    """A memory axis spanning a few MiB has ticks between whole numbers: each label reads its tick's value."""
    import matplotlib.pyplot as plt

    from layercard.plan.figures import plot_frontier

    checked: list[str] = []
    real = plt.Figure.savefig

    def read_ticks(fig, *a, **k):
        fig.canvas.draw()
        for ax in fig.axes:
            if not ax.get_xlabel().startswith("peak training memory") or ax.get_xscale() != "linear":
                continue
            for loc, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True):
                text = label.get_text().replace(",", "").replace("\u2212", "-")
                lo, hi = ax.get_xlim()
                if text and lo <= loc <= hi:
                    shown = len(text.split(".")[1]) if "." in text else 0
                    assert abs(float(text) - loc) <= 0.5 * 10**-shown + 1e-9, (loc, text)
                    checked.append(text)
        return real(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", read_ticks)
    # memory terms that span a few MiB over the placements
    narrow = COST | {"memory_per_layer_mib": 0.3, "memory_per_module_mib": 0.05, "memory_per_mparam_mib": 1.0}
    plan = make_plan(
        dataclasses.replace(tiny_card, cost=narrow), PlanConfig("recommend", budget="memory=0.99x")
    )
    plot_frontier(plan, tmp_path / "f.png")
    assert checked and len(set(checked)) == len(checked), checked  # no two ticks share a label


def test_drawing_a_figure_leaves_the_callers_matplotlib_as_it_was(tiny_card, tmp_path):
    """A notebook's backend is not switched, and no figure is left open in pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt

    from layercard.plan.figures import plot_frontier

    before = matplotlib.get_backend()
    plt.switch_backend("pdf")  # a backend of the caller's that is not Agg
    try:
        plot_frontier(make_plan(tiny_card, PlanConfig("recommend", budget="params=0.5x")), tmp_path / "f.png")
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == []
        assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    finally:
        plt.switch_backend(before)


def test_a_plan_check_that_peft_refuses_midway_leaves_the_model_as_it_was(tiny_card, tiny_llama, monkeypatch):
    from peft.tuners.lora import LoraModel

    plan = make_plan(tiny_card, PlanConfig("top", budget="layers=2"))
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    wrap, calls = LoraModel._create_and_replace, {"n": 0}

    def refuse_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("no")
        return wrap(self, *a, **k)

    monkeypatch.setattr(LoraModel, "_create_and_replace", refuse_second)
    with pytest.raises(LayercardError, match="PEFT refused the plan's LoraConfig"):
        check_plan(plan, tiny_llama)
    assert not any(type(m).__module__.startswith("peft.") for m in tiny_llama.modules())
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags
