"""The card-draws benchmark's own parts: the cost of a swapped pick, and its committed table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from benchscripts import BENCHMARKS, benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("card_draws") as module:
        yield module


def _pick(matrices: str, layers: str, rank: int, quality: float) -> dict:
    return {"matrices": matrices, "layers": layers, "rank": rank, "quality": quality, "error": 0.04}


def test_a_swapped_pick_costs_what_the_other_card_predicts_and_nothing_over_the_budget(bench):
    def cand(label: str, quality: float, params: float) -> SimpleNamespace:
        return SimpleNamespace(label=label, quality=quality, costs={"params": params})

    mlp, qv, big = "mlp · all · r=2", "q,v · all · r=8", "all-linear · all · r=8"
    searches = {
        "a": SimpleNamespace(
            reference={"params": 100.0}, candidates=[cand(mlp, 0.98, 10), cand(qv, 0.90, 10)]
        ),
        "b": SimpleNamespace(
            reference={"params": 100.0}, candidates=[cand(mlp, 0.95, 10), cand(qv, 0.97, 30)]
        ),
    }
    picks = {"a": _pick("mlp", "all", 2, 0.98), "b": _pick("q,v", "all", 8, 0.97)}
    # a's card loses 0.08 taking b's pick; b's card prices a's pick inside 0.2x: loses 0.02
    assert bench._cross(searches, picks, "params=0.2x") == [0.08, 0.02]
    # at 0.1x, a's pick in b's card costs 10 of 10: fits; b's pick in a's card too
    assert bench._cross(searches, picks, "params=0.1x") == [0.08, 0.02]
    # a pick the other card prices over the budget, or does not price, costs nothing: it does not apply
    searches["a"].candidates[1] = cand(qv, 0.90, 30)
    assert bench._cross(searches, picks, "params=0.2x") == [0.0, 0.02]
    # a target has no cap; a pick the card does not price costs nothing
    searches["b"].candidates = [cand(big, 0.99, 100)]
    assert bench._cross(searches, picks, "target=0.9") == [0.08, 0.0]
    # the same pick on both draws is no disagreement
    assert bench._cross(searches, {"a": picks["a"], "b": picks["a"]}, "params=0.2x") == []


def test_the_committed_table_is_the_committed_data_s():
    path = BENCHMARKS / "results" / "card_draws" / "card_draws.json"
    if not path.is_file():
        pytest.skip("no committed card-draws results")
    with benchmark_script("card_draws") as bench:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert bench.markdown(data) == path.with_suffix(".md").read_text(encoding="utf-8")
    rows = [r for t in data["tasks"] for r in t["rows"]]
    assert data["summary"]["all_agree"] == sum(len(set(r["picks"].values())) == 1 for r in rows)
    for r in rows:
        labels = list(r["picks"].values())
        assert r["distinct"] == len(set(labels)) and r["modal_share"] == labels.count(r["modal"]) / len(
            labels
        )
