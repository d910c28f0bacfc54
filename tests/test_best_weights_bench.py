"""The best-weights benchmark's summary: which step each adapter is from and which adapters are one file."""

from __future__ import annotations

import json

import pytest
from benchscripts import BENCHMARKS, benchmark_script, same_numbers

RUNS = BENCHMARKS / "results" / "best_weights" / "runs"


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("best_weights") as module:
        yield module


def _record(variant: str, steps: int, best: int | None, digest: str, test_loss: float) -> dict:
    curve = [[5, 2.0], [10, 1.5], [15, 1.8], [20, 1.9]][: steps // 5]
    return {
        "task": "gsm8k", "variant": variant, "steps": steps, "best_step": best,
        "best_val_loss": 1.5 if best else None, "val_curve": curve, "test_loss": test_loss,
        "adapter_sha256": digest, "train_wall_s": 10.0 * steps,
    }  # fmt: skip


def test_the_summary_says_which_step_each_adapter_is_from(bench):
    records = [
        _record("last", 20, None, "a", 1.9),
        _record("keep_best", 20, 10, "b", 1.2),
        _record("early_stopping", 15, 10, "b", 1.2),
    ]
    rows = bench.summarize(records, {"gsm8k": 2.5})["gsm8k"]["variants"]
    assert rows["last"]["adapter_step"] == 20 and rows["last"]["val_loss_of_adapter"] == 1.9
    assert rows["keep_best"]["adapter_step"] == 10 and rows["keep_best"]["val_loss_of_adapter"] == 1.5
    assert rows["keep_best"]["drop_from_base"] == pytest.approx(1.3)
    assert (
        rows["early_stopping"]["same_adapter_as"] == ["keep_best"] and rows["last"]["same_adapter_as"] == []
    )


def test_the_committed_table_follows_from_the_committed_runs(bench):
    committed = BENCHMARKS / "results" / "best_weights" / "best_weights.json"
    if not committed.is_file():
        pytest.skip("results/best_weights/best_weights.json is not committed")
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json")) if "-base" not in p.name]
    bases = {
        json.loads(p.read_text())["task"]: json.loads(p.read_text())["test_loss"]
        for p in RUNS.glob("*-base.json")
    }
    same_numbers(bench.summarize(records, bases), json.loads(committed.read_text())["tasks"])
