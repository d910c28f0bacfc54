"""The tight-budget benchmark's pure parts: the comparison against the best rule and the seed noise."""

from __future__ import annotations

import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def tight():
    with benchmark_script("tight_budget") as module:
        yield module


def _row(candidate: str, loss: float, spread: float, s: float, mib: float, fractions=(), sig=None) -> dict:
    return {
        "candidate": candidate,
        "fits": True,
        "signature": sig or candidate,
        "test_loss": loss,
        "test_loss_range": spread,
        "s_per_step": s,
        "peak_memory_mib": mib,
        "fraction_by_seed": list(fractions),
    }


def test_against_best_rule_takes_the_lowest_loss_rule_and_the_larger_range(tight):
    rows = [
        _row("recommend", 1.0, 0.02, 1.2, 1100.0),
        _row("previous-default", 0.5, 0.0, 1.0, 1000.0),  # not a rule: never the one compared with
        _row("peft-default", 1.1, 0.05, 1.0, 1000.0),
        _row("last-n", 1.3, 0.01, 0.5, 800.0),
    ]
    d, rule, noise, time_ratio, memory_ratio = tight._against_best_rule(rows)
    assert rule == "peft-default"
    assert d == pytest.approx(-0.1)
    assert noise == pytest.approx(0.05)
    assert time_ratio == pytest.approx(1.2)
    assert memory_ratio == pytest.approx(1.1)
    assert tight._against_best_rule(rows[:2]) is None  # no rule fits
    assert tight._against_best_rule(rows[2:]) is None  # no recommendation


def test_seed_noise_is_each_run_against_the_mean_of_the_others(tight):
    shared = _row("recommend", 1.0, 0.0, 1.0, 1.0, fractions=(0.9, 1.0, 1.1), sig="a")
    out = {
        "budgets": {
            "params=0.1x": {"t": {"rows": [shared, _row("last-n", 1, 0, 1, 1, fractions=(0.5, 0.5, 0.8))]}},
            # The same placement under another budget counts once; a placement at one seed not at all.
            "params=0.2x": {"t": {"rows": [shared, _row("peft-default", 1, 0, 1, 1, fractions=(0.7,))]}},
        }
    }
    noise = tight._seed_noise(out)
    # a: |0.9 − 1.05|, |1.0 − 1.0|, |1.1 − 0.95| → 0.15, 0, 0.15; last-n: 0.15, 0.15, 0.3
    assert noise["t"]["placements"] == 2
    assert noise["t"]["one_run_vs_other_seeds_mean"] == pytest.approx(
        (0.15 + 0 + 0.15 + 0.15 + 0.15 + 0.3) / 6
    )


def _placed(candidate: str, loss: float, spread: float, sig: str) -> dict:
    return {**_row(candidate, loss, spread, 1.0, 1.0, sig=sig), "placement": sig, "seeds": [0, 1, 2]}


def test_ten_task_check_applies_the_stated_decision_rule(tight):
    def out(cells):
        return {"budgets": {b: {t: {"rows": rows} for t, rows in by.items()} for b, by in cells.items()}}

    same = [_placed("recommend", 1.0, 0.01, "a"), _placed("ten-task", 1.0, 0.01, "a")]
    ahead = [
        _placed("recommend", 1.0, 0.02, "a"),
        _placed("ten-task", 0.9, 0.01, "b"),
        _placed("last-n", 0.95, 0.0, "c"),
    ]
    behind = [_placed("recommend", 1.0, 0.02, "a"), _placed("ten-task", 1.05, 0.03, "b")]
    close = [_placed("recommend", 1.0, 0.02, "a"), _placed("ten-task", 1.01, 0.03, "b")]
    check = tight.ten_task_check(out({"params=0.1x": {"t": ahead, "u": same}}))
    assert check["differ"] == 1 and check["stays_default"]
    c = {x["task"]: x for x in check["cells"]}
    assert c["u"]["same"] and c["t"]["against_two_task"] == pytest.approx(-0.1)
    assert c["t"]["best_rule"] == "last-n" and c["t"]["against_best_rule"] == pytest.approx(-0.05)
    # behind the two-task pick by more than the larger range anywhere: it reverts, whatever the mean
    check = tight.ten_task_check(out({"params=0.1x": {"t": ahead, "u": behind}}))
    assert check["behind_beyond_range"] == ["u params=0.1x"] and not check["stays_default"]
    # within the range everywhere but behind on average: it reverts too
    check = tight.ten_task_check(out({"params=0.1x": {"u": close}}))
    assert check["behind_beyond_range"] == [] and not check["stays_default"]
    assert tight.ten_task_check(out({"params=0.1x": {"u": same[:1]}})) is None  # no ten-task run yet


def test_committed_ten_task_cells_are_what_the_ten_task_model_picks_today(tight):
    """Each committed ``ten-task`` ledger cell is the ten-task model's plan from the committed card, and at
    least one differs from the two-task model's ``recommend`` (otherwise there was nothing to test)."""
    import json

    from layercard.card import Card

    P = tight.P
    differ = 0
    for ledger_path in sorted((tight.OUT / "cells").glob("*.json")):
        ledger = json.loads(ledger_path.read_text())
        card = Card.load(P.RESULTS / "cards" / ledger_path.stem / "card.json")
        for key, cell in ledger.items():
            budget, candidate = key.split("|")
            if candidate != "ten-task":
                continue
            plan, _ = tight._plan(card, "ten-task", budget)
            assert P.signature(plan) == cell["signature"], key
            differ += cell["signature"] != ledger[f"{budget}|recommend"]["signature"]
    assert differ > 0


def test_summary_states_the_runs_machine_and_keeps_its_date_while_it_only_adds(tight):
    run = {"threads": 2, "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2}}
    assert tight.machine_key(run) == ("x86_64", 2, 2)
    out = {
        "date": "today",
        "steps": 36,
        "measured_on": [{"processor": "x86_64", "cpus": 2, "torch_threads": 2, "runs": 3}],
    }
    assert tight.keep_date(out, {"date": "then", "steps": 36})["date"] == "then"
    assert tight.keep_date(out, {"date": "then", "steps": 12})["date"] == "today"
    assert "2 CPUs · 2 torch threads" in tight._machines_text(out)
