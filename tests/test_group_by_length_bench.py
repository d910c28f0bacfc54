"""The group_by_length benchmark's summary: per-seed ratios of the grouped run to the ungrouped one."""

from __future__ import annotations

import json

import pytest
from benchscripts import BENCHMARKS, benchmark_script, same_numbers

RUNS = BENCHMARKS / "results" / "group_by_length" / "runs"


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("group_by_length") as module:
        yield module


def _record(seed: int, way: str, positions: float, s: float, predicted: float | None, loss: float) -> dict:
    return {
        "task": "sst2", "seed": seed, "way": way, "positions_per_step": positions, "s_per_step": s,
        "predicted_s_per_step": predicted, "train_wall_s": 20 * s + 5, "test_loss": loss,
        "tokens_seen": 1000 + seed,
    }  # fmt: skip


def test_the_summary_pairs_each_grouped_run_with_the_ungrouped_run_of_its_seed(bench):
    records = [
        _record(0, "off", 800, 2.0, 2.2, 0.50),
        _record(0, "on", 600, 1.5, 1.65, 0.52),
        _record(1, "off", 900, 2.4, 2.0, 0.40),
        _record(1, "on", 450, 1.2, None, 0.41),
        _record(2, "on", 100, 0.1, 0.1, 0.1),  # no ungrouped run of seed 2: left out
    ]
    t = bench.summarize(records, {"sst2": 0.76})["sst2"]
    assert t["seeds"] == [0, 1]
    assert t["on_over_off"]["positions_per_step"] == [0.75, 0.5]
    assert t["on_over_off"]["s_per_step"] == [0.75, 0.5]
    assert t["test_loss_on_minus_off"] == pytest.approx([0.02, 0.01])
    off, on = t["ways"]["off"], t["ways"]["on"]
    assert off["positions_per_step"] == 850 and off["s_per_step"] == pytest.approx(2.2)
    assert off["step_time_errors"] == pytest.approx([2.0 / 2.2 - 1, 2.4 / 2.0 - 1], abs=1e-4)
    # a run without a price keeps the other's error and no mean price
    assert on["predicted_s_per_step"] is None and len(on["step_time_errors"]) == 1
    assert t["on_over_off"]["tokens_seen"] == [1.0, 1.0]
    assert off["tokens_per_train_s"] == pytest.approx((1000 / 45 + 1001 / 53) / 2, abs=0.1)


def test_the_committed_table_follows_from_the_committed_runs(bench):
    committed = BENCHMARKS / "results" / "group_by_length" / "group_by_length.json"
    if not committed.is_file():
        pytest.skip("results/group_by_length/group_by_length.json is not committed")
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*-o*.json"))]
    bases = {
        json.loads(p.read_text())["task"]: json.loads(p.read_text())["test_loss"]
        for p in RUNS.glob("*-base.json")
    }
    same_numbers(bench.summarize(records, bases), json.loads(committed.read_text())["tasks"])
