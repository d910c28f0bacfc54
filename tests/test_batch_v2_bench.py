"""gsm8k and samsum at batch 4 (benchmarks/batch_v2.py): the placements it trains are the ones placement
benchmark v2 trained at batch 2, and the committed summary is what the committed runs give."""

from __future__ import annotations

import json

import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def batch_v2():
    with benchmark_script("batch_v2") as module:
        yield module


def test_each_placement_has_its_run_at_the_tasks_own_batch(batch_v2):
    import placement_v2 as P  # beside batch_v2, on the fixture's path

    from layercard.card import Card

    for task in batch_v2.TASKS:
        assert P.TASKS[task].batch_size != batch_v2.BATCH  # otherwise there is nothing to compare
        card = Card.load(P.RESULTS / "cards" / task / "card.json")
        plans = batch_v2._plans(card)
        assert list(plans) == ["reference", *batch_v2.CANDIDATES]
        for plan in plans.values():
            assert P._run_path(task, P.signature(plan), 0).is_file()


def test_committed_summary_is_what_the_committed_runs_give(batch_v2):
    path = batch_v2._out() / "batch4.json"
    if not path.is_file():
        pytest.skip("batch4.json is not committed")
    committed = json.loads(path.read_text())
    got = batch_v2.result()
    assert set(got["tasks"]) == set(committed["tasks"])
    for t, v in got["tasks"].items():
        b0 = str(v["usual_batch"])
        assert v["change"] == pytest.approx(committed["tasks"][t]["change"])
        for c, f in v["fractions"][batch_v2.BATCH].items():
            assert f == pytest.approx(committed["tasks"][t]["fractions"][str(batch_v2.BATCH)][c])
        assert committed["tasks"][t]["fractions"][b0]


def test_rebuilt_plans_land_on_each_confirmation_run(batch_v2):
    """Each placement the confirmation check scores, rebuilt from its recorded units, has its batch-2 run's
    signature (checked inside confirm_plans) and its run's trainable parameters, and PEFT reads it."""
    import placement_v2 as P
    import quality_confirm as C

    from layercard.artifacts import read_json
    from layercard.card import Card

    for task in batch_v2.TASKS:
        card = Card.load(P.RESULTS / "cards" / task / "card.json")
        plans = batch_v2.confirm_plans(task, card)
        listed = {p["label"]: p for p in C.placements(task)}
        assert set(plans) < set(listed) and len(plans) == len(listed) - 1  # the reference left out
        for label, plan in plans.items():
            run = read_json(P._run_path(task, listed[label]["signature"], 0))
            assert plan.predicted["params"] == run["params"]
            assert sorted([u.layer, u.role, u.rank] for u in plan.units) == sorted(run["units"])
            cfg = plan.peft_config()
            assert {cfg.rank_pattern.get(u.name, cfg.r) for u in plan.units} == {u.rank for u in plan.units}


def test_rebuilt_refuses_a_unit_outside_the_reference(batch_v2):
    import placement_v2 as P

    from layercard.card import Card

    card = Card.load(P.RESULTS / "cards" / "gsm8k" / "card.json")
    with pytest.raises(SystemExit, match="not in the reference plan"):
        batch_v2.rebuilt(card, [[0, "q", 8], [card.n_layers, "q", 8]], "x")
    plan = batch_v2.rebuilt(card, [[0, "q", 4], [3, "down", 2], [3, "up", 2]], "x")
    assert plan.layers == [0, 3] and plan.lora_config["r"] == 2
    assert plan.lora_config["rank_pattern"] == {plan.units[0].name: 4}
    assert plan.lora_config["alpha_pattern"] == {plan.units[0].name: 8}
    assert plan.lora_config["lora_alpha"] == 4


def test_rescore_refuses_while_a_run_is_missing(batch_v2, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_v2, "_out", lambda: tmp_path)
    assert batch_v2.batch4_placements("gsm8k") is None
    with pytest.raises(SystemExit, match="without a run at batch"):
        batch_v2.rescore()
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_committed_rescore_is_what_the_committed_runs_give(batch_v2, tmp_path, monkeypatch):
    committed_path = batch_v2._out() / "rescore.json"
    if not committed_path.is_file():
        pytest.skip("rescore.json is not committed")
    committed = json.loads(committed_path.read_text())
    runs = batch_v2._out() / "runs"
    (tmp_path / "runs").symlink_to(runs)
    monkeypatch.setattr(batch_v2, "_out", lambda: tmp_path)  # written here, read from the committed runs
    got = batch_v2.rescore()
    assert got["adopted"] == committed["adopted"] and got["conditions"] == committed["conditions"]
    for name, v in got["forms"].items():
        assert v["batch"]["mean"]["mae"] == pytest.approx(committed["forms"][name]["batch"]["mean"]["mae"])
    dflt = committed["default"]["batch"]["mean"]["mae"]
    assert got["default"]["batch"]["mean"]["mae"] == pytest.approx(dflt)
    for t, v in got["tasks"].items():
        assert v["change"] == pytest.approx(committed["tasks"][t]["change"])
    text = (tmp_path / "rescore.md").read_text()
    assert text == (committed_path.parent / "rescore.md").read_text()
