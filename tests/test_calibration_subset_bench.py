"""The calibration-subset benchmark's step-time variants on constructed rows, and its committed table
reproduced from the committed cost runs."""

from __future__ import annotations

import json

import pytest
from benchscripts import benchmark_script, same_numbers


@pytest.fixture(scope="module")
def subset():
    with benchmark_script("calibration_subset") as module:
        yield module


def _row(layers: list[int], rank: int, steps: list[float], by_round: list[int]) -> dict:
    return {
        "layers": layers, "rank": rank, "modules": 7 * len(layers), "params": 1000 * rank * len(layers),
        "s_per_step": sum(steps) / len(steps),  # as cards before the fastest-step rule recorded it
        "timings_s_per_step": steps, "timed_steps_by_round": by_round,
        "warmup_s_by_round": [1.0] * len(by_round),
        "forward_s": None,
    }  # fmt: skip


def test_fastest_takes_every_placements_fastest_step(subset):
    rows = [_row([3], 8, [2.0, 1.5], [2]), _row([0, 1, 2, 3], 8, [4.0, 3.0, 3.5], [2, 1])]
    fast = subset._fastest(rows)
    assert [r["s_per_step"] for r in fast] == [1.5, 3.0]
    assert rows[0]["s_per_step"] == pytest.approx(1.75)  # the input rows are left as they were


def test_again_one_step_keeps_only_the_first_step_of_a_later_round(subset):
    # timed twice in the first round (3.0, 2.9), then again with two steps (2.5, 2.0): one step keeps 2.5
    row = _row([0, 1, 2, 3], 8, [3.0, 2.9, 2.5, 2.0], [2, 2])
    out, saved = subset._again_one_step([row], rounds=1)
    assert out[0]["s_per_step"] == pytest.approx(2.5)
    assert saved == pytest.approx(2.0)  # the dropped step's seconds
    # a placement timed once keeps its fastest step and saves nothing
    single, none_saved = subset._again_one_step([_row([3], 8, [1.2, 1.1], [2])], rounds=1)
    assert single[0]["s_per_step"] == pytest.approx(1.1) and none_saved == 0.0


def test_slower_only_reads_against_the_fastest_step(subset):
    # rank 8 on every layer first timed slower than rank 32: both were timed again (the rule before `ninth`)
    r8 = _row([0, 1, 2, 3], 8, [3.0, 3.1, 2.0, 2.1], [2, 2])
    r32 = _row([0, 1, 2, 3], 32, [2.8, 2.9, 2.6, 2.7], [2, 2])
    top = _row([3], 8, [1.0, 1.4], [2])
    out, saved = subset._slower_only([top, r8, r32], rounds=1)
    by = {(tuple(r["layers"]), r["rank"]): r["s_per_step"] for r in out}
    assert by[((3,), 8)] == pytest.approx(1.0)  # the fastest, not the recorded mean 1.2
    assert by[((0, 1, 2, 3), 8)] == pytest.approx(2.0)  # the suspect keeps its second round
    assert by[((0, 1, 2, 3), 32)] == pytest.approx(2.8)  # the other keeps its first round only
    assert saved == pytest.approx(1.0 + 2.6 + 2.7)  # its second round: warm-up and two steps


def test_committed_table_is_what_the_committed_runs_give(subset, monkeypatch):
    committed = json.loads((subset.RESULTS / "calibration_subset.json").read_text())
    written: dict[str, object] = {}
    # the cards and runs are read from the committed folders; what the script writes is kept here instead
    monkeypatch.setattr(subset, "write_json", lambda path, data: written.__setitem__(path.name, data))
    monkeypatch.setattr(subset, "write_text", lambda path, text: written.__setitem__(path.name, text))
    monkeypatch.setattr("sys.argv", ["calibration_subset.py"])
    subset.main()
    again = written["calibration_subset.json"]
    same_numbers(again["runs"], committed["runs"])
    assert written["calibration_subset.md"] == (subset.RESULTS / "calibration_subset.md").read_text()
    cpu = [r for r in again["runs"] if r["device"] == "cpu"]
    assert len(cpu) >= 42
    # where no placement was timed again, the `again` variants equal the fastest-step baseline
    for r in cpu:
        v = r["variants"]
        if not v["again: one timed step"]["saved_s"]:
            assert v["again: one timed step"]["errors"]["step"] == pytest.approx(
                v["fastest step"]["errors"]["step"]
            )


def test_same_numbers_tells_last_bits_from_a_difference():
    same_numbers({"a": [0.1 + 0.2, "x", 3]}, {"a": [0.3, "x", 3]})  # last bits only
    for got in ({"a": [0.3001, "x", 3]}, {"a": [0.3, "y", 3]}, {"a": [0.3, "x"]}, {"b": [0.3, "x", 3]}):
        with pytest.raises(AssertionError):
            same_numbers(got, {"a": [0.3, "x", 3]})
