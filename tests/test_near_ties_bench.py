"""The near-ties benchmark: its pairs are the placements named, and its committed table is its runs'."""

from __future__ import annotations

import json

import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("near_ties") as module:
        yield module


def test_each_pair_is_the_same_matrices_and_rank_on_all_layers_and_on_the_last_ones(bench):
    for task in bench.TASKS:
        card = bench._card(task)
        for wide, narrow in bench.PAIRS:
            a, b = bench._plan(card, wide), bench._plan(card, narrow)
            assert a.layers == list(range(card.n_layers))
            n = int(narrow.budget.split("=")[1])
            assert b.layers == list(range(card.n_layers - n, card.n_layers))  # the last n, not the top-scored
            assert {(u.role, u.rank) for u in a.units} == {(u.role, u.rank) for u in b.units}
            # the default model cannot tell them apart: what the benchmark is about
            assert abs(bench.predicted(card, wide)[0] - bench.predicted(card, narrow)[0]) < 1e-4


def test_the_committed_table_is_rebuilt_from_the_committed_runs(bench):
    committed = json.loads((bench.RESULTS / "near_ties.json").read_text())
    assert bench.summarize() == committed
    assert (bench.RESULTS / "near_ties.md").read_text() == bench._markdown(committed)
    for row in committed["rows"]:
        sides = list(row["sides"].values())
        losses = [sum(s["test_loss"]) / len(s["test_loss"]) for s in sides]
        assert row["loss_difference"] == pytest.approx(losses[1] - losses[0])
