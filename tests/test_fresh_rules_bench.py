"""The fresh tasks' comparison of the default's pick with the practitioners' rules (benchmarks/fresh_tasks.py
``rules``): which placement it takes at a rule's size, and how the tasks are tallied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchscripts import benchmark_script

COMMITTED = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality" / "fresh" / "rules.json"
)


@pytest.fixture(scope="module")
def fresh():
    with benchmark_script("fresh_tasks") as module:
        yield module


def _row(name, share, predicted):
    return {"name": name, "params_share": share, "predicted": {"default": predicted}}


def test_the_pick_is_the_best_predicted_within_the_rules_size_ties_to_the_smaller(fresh):
    rows = [
        _row("big", 0.30, 0.99),
        _row("rule", 0.19, 0.90),
        _row("mlp", 0.16, 0.95),
        _row("tie", 0.05, 0.95),
    ]
    assert fresh.pick_within(rows, 0.19)["name"] == "tie"  # 0.95 twice: the fewer parameters
    assert fresh.pick_within(rows, 0.30)["name"] == "big"
    assert fresh.pick_within(rows, 0.05)["name"] == "tie"
    with pytest.raises(ValueError, match="no placement within"):
        fresh.pick_within(rows, 0.01)


def test_a_recommended_placement_is_named_by_what_it_is_not_by_the_size_asked(fresh):
    assert fresh.recommend_name("mlp · last-26 · r=2") == "rec-mlp-last-26-r2"
    assert fresh.recommend_name("q,v · spread-4 · r=4") == "rec-qv-spread-4-r4"
    assert fresh.recommend_name("all-linear · all · r=8") == "rec-all-linear-all-r8"


def test_a_difference_counts_only_beyond_twice_its_paired_error(fresh):
    def cell(pick, diff, se):
        return {"pick": pick, "rule": "r", "difference": diff, "difference_se": se}

    cells = [cell("r", 0.0, 0.01), cell("a", 0.05, 0.02), cell("b", -0.05, 0.02), cell("c", 0.03, 0.02),
             cell("d", 0.05, None)]  # fmt: skip
    assert fresh._tally(cells) == {"same": 1, "ahead": 1, "behind": 1, "within": 2}


def test_over_seeds_a_side_counts_only_where_every_seed_agrees(fresh):
    def cell(task, seed0, others):
        return {"task": task, "pick": "p", "rule": "r", "difference": seed0, "other_seeds": others}

    same = {**cell("e", 0.0, {"1": 0.1}), "pick": "r"}  # the rule's own placement: no side
    cells = [cell("a", 0.1, {"1": 0.05, "2": 0.02}), cell("b", -0.1, {"1": -0.2}),
             cell("c", 0.1, {"1": -0.01}), cell("d", 0.3, {}), same]  # fmt: skip
    out = fresh._tally_seeds(cells)
    assert [x["task"] for x in out["ahead"]] == ["a"] and out["ahead"][0]["seeds"] == 3
    assert out["ahead"][0]["mean_difference"] == pytest.approx((0.1 + 0.05 + 0.02) / 3)
    assert [x["task"] for x in out["behind"]] == ["b"] and [x["task"] for x in out["mixed"]] == ["c"]


def test_the_committed_comparison_tallies_every_task_once_per_rule():
    out = json.loads(COMMITTED.read_text())
    for rule, name in out["rules"].items():
        cells = [t[rule] for t in out["tasks"].values() if rule in t]
        assert sum(out["summary"][rule].values()) == len(cells) > 0
        assert all(c["rule"] == name and c["pick_share"] <= c["rule_share"] * (1 + 1e-9) for c in cells)
        assert all(abs(c["difference"] - (c["pick_measured"] - c["rule_measured"])) < 1e-12 for c in cells)
        for c in cells:  # the planner's own pick, named as the grid names it where the grid holds it
            planner = c["planner"]
            assert planner["params_share"] <= c["rule_share"] * (1 + 1e-6)
            if planner["grid"] is not None:
                short = {"q,v": "qv", "attention": "attn", "mlp": "mlp", "all-linear": "lin"}
                matrices, layers, rank = planner["placement"].split(" · ")
                grid = planner["grid"]
                assert grid.startswith(short[matrices] + "-") and grid.endswith("-r" + rank.split("=")[1])
                assert ("-all-" in grid) == (layers == "all")
                assert planner["comparison"]["pick"] == planner["grid"]


CARDS = COMMITTED.parent / "cards"


def test_the_depth_notes_placement_covers_the_depth_within_the_size_and_trains_as_named(fresh):
    from layercard.card import Card
    from layercard.plan.quality import depth_coverage

    assert fresh.advised_name("mlp · spread-16 · r=1") == "adv-mlp-spread-16-r1"
    card = Card.load(CARDS / "gsm8k_pose" / "card.json")
    plan, account = fresh.advised(card, 0.05)  # the recommendation there leaves depth bands out
    assert account["placement"] != account["recommendation"]
    assert depth_coverage(plan.layers, card.n_layers) == 1.0
    assert account["params_share"] <= 0.05 and plan.predicted["params"] == sum(
        u.rank * (by.d_in + by.d_out) for u in plan.units for by in card.units if by.key == u.key
    )
    # what trains is the named placement: its PEFT config adapts exactly those modules at that rank
    matrices, layers, rank = account["placement"].split(" · ")
    config = plan.peft_config()
    assert config.r == int(rank.split("=")[1]) and len(config.target_modules) == len(plan.units)
    assert {u.role for u in plan.units} == {"gate", "up", "down"} and layers == "spread-16"
    assert fresh.advised(card, 0.25) is None  # the recommendation there covers the depth


def test_the_committed_advice_is_reported_on_warned_tasks_only():
    out = json.loads(COMMITTED.read_text())
    for task, cells in out["tasks"].items():
        for c in cells.values():
            if "advice" not in c:
                continue
            assert task in out["warned"]
            a = c["advice"]
            assert a["params_share"] <= c["rule_share"] * (1 + 1e-6)
            for against in ("rule", "against_recommendation"):
                if against in a:
                    assert a[against]["pick"].startswith("adv-")
