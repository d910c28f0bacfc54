"""The top-module benchmark's placements: the module left out is the one named, and nothing else."""

from __future__ import annotations

import pytest
from benchscripts import BENCHMARKS, benchmark_script

CARD = BENCHMARKS / "results" / "placement_v2" / "cards" / "facts" / "card.json"


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("top_module") as module:
        yield module


def test_each_placement_holds_its_units_and_the_top_module_is_left_out_alone(bench):
    from layercard.card import Card

    card = Card.load(CARD)
    plans = {name: bench.plan_for(card, name) for name in bench.PLACEMENTS}
    keys = {name: {u.key for u in p.units} for name, p in plans.items()}
    assert keys["mlp"] - keys["mlp-without-top"] == {bench.TOP}
    assert keys["mlp-without-top"] <= keys["mlp"] and keys["down"] | keys["gate-up"] == keys["mlp"]
    assert len(keys["reference"]) == 7 * card.n_layers and bench.TOP in keys["down"]
    # the LoRA config follows the units: the module left out is no target, every other one is
    without = plans["mlp-without-top"]
    targets = set(without.lora_config["target_modules"])
    assert targets == {u.name for u in without.units} and len(targets) == len(without.units)
    assert {u.rank for u in without.units} == {2} and without.lora_config["r"] == 2
    # a unit the card does not hold is an error, not a silently full placement
    bench.PLACEMENTS["broken"] = ("mlp", 2, ("99.down",))
    try:
        with pytest.raises(SystemExit, match="holds no unit"):
            bench.plan_for(card, "broken")
    finally:
        del bench.PLACEMENTS["broken"]


def test_the_default_model_prices_the_down_projections_as_the_whole_mlp(bench):
    """What results/top_module/top_module.md reports: the capacity term's weight sits on the down
    projections, so the default model predicts them alone as high as the whole MLP, above gate and up."""
    from layercard.card import Card

    card = Card.load(CARD)
    q = {name: bench.predicted(card, name)[0] for name in ("mlp", "down", "gate-up", "reference")}
    assert q["reference"] == pytest.approx(1.0) and abs(q["down"] - q["mlp"]) < 0.005
    assert q["gate-up"] < q["down"] - 0.05
