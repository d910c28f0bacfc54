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
