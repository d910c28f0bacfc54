"""The budget-margin benchmark on constructed runs, and its committed table reproduced from the committed
cost runs."""

from __future__ import annotations

import json

import pytest
from benchscripts import benchmark_script, same_numbers


@pytest.fixture(scope="module")
def margin():
    with benchmark_script("budget_margin") as module:
        yield module


def _run(measured: float, planned: float, scaled: float) -> dict:
    return {"memory": {"measured": measured, "planned": planned, "scaled": scaled}}


def test_summary_counts_the_warnings_outcomes_and_the_margins(margin):
    rows = [
        _run(109.0, 100.0, 104.0),  # warned, and over by 9%: 4.8% over its price at its own batches
        _run(99.0, 100.0, 103.0),  # warned, not over
        _run(103.0, 100.0, 100.0),  # over, not warned: its batches were no longer than the card's
        _run(95.0, 100.0, 98.0),  # neither
    ]
    s = margin.summary(rows, "memory")
    assert s["runs"] == 4
    assert s["warning"] == {"warned_and_over": 1, "warned_not_over": 1, "over_not_warned": 1, "neither": 1}
    assert s["from_planned"]["mean"] == pytest.approx((0.09 - 0.01 + 0.03 - 0.05) / 4)
    assert s["from_planned"]["mean_abs"] == pytest.approx((0.09 + 0.01 + 0.03 + 0.05) / 4)
    assert s["over_planned_by"] == {"0": 0.5, "0.02": 0.5, "0.05": 0.25, "0.1": 0.0}
    # at their own batches the first run is 4.8% over and the unwarned one 3%: neither past a 5% margin
    assert s["over_scaled_by"] == {"0": 0.5, "0.02": 0.5, "0.05": 0.0, "0.1": 0.0}
    assert margin.summary(rows + [{"name": "no memory recorded"}], "memory") == s


def test_committed_table_is_what_the_committed_runs_give(margin, monkeypatch):
    committed = json.loads((margin.RESULTS / "budget_margin.json").read_text())
    written: dict[str, object] = {}
    monkeypatch.setattr(margin, "write_json", lambda path, data: written.__setitem__(path.name, data))
    monkeypatch.setattr(margin, "write_text", lambda path, text: written.__setitem__(path.name, text))
    margin.main()
    again = written["budget_margin.json"]
    same_numbers(again["summary"], committed["summary"])
    same_numbers(again["runs"], committed["runs"])
    assert written["budget_margin.md"] == (margin.RESULTS / "budget_margin.md").read_text()
    smollm2 = committed["summary"]["cpu · smollm2"]["memory"]
    assert smollm2["runs"] >= 120 and sum(smollm2["warning"].values()) == smollm2["runs"]
