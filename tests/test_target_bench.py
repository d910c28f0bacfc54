"""The `--target` benchmark (benchmarks/target.py): its tally, its reuse of runs, and that the committed
table is what the planner picks today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchscripts import benchmark_script

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "placement_v2" / "target"


@pytest.fixture(scope="module")
def target():
    with benchmark_script("target") as module:
        yield module


def _row(depth, f, fraction, predicted, cleared=None):
    return {
        "depth": depth,
        "target": f,
        "fraction": fraction,
        "predicted": predicted,
        "signature": depth,
        "params": 1,
        "cleared": cleared,
    }


def test_tally_counts_reached_targets_shortfall_and_error(target):
    rows = [
        _row("any", 0.9, 0.85, 0.97, cleared=False),  # short by 0.05, off by 0.12
        _row("any", 0.8, 0.85, 0.97, cleared=True),  # reached
        _row("auto", 0.9, 0.95, 0.95, cleared=False),  # reached exactly as predicted
        _row("auto", 0.98, None, 0.99),  # not run: left out
    ]
    res = target.tally({"tasks": {"t": {"rows": rows}}})
    assert res["any"] == {
        "cells": 2,
        "reached": 1,
        "mean_shortfall": pytest.approx(0.025),
        "mae_vs_predicted": pytest.approx(0.12),
        "cleared_reached": [1, 1],
        "within_error_reached": [0, 1],
    }
    assert res["auto"]["cells"] == 1 and res["auto"]["reached"] == 1
    assert res["auto"]["cleared_reached"] == [0, 0] and res["auto"]["within_error_reached"] == [1, 1]
    assert res["auto"]["mean_shortfall"] == 0.0


def test_runs_are_taken_once_per_seed_from_the_first_folder_that_holds_it(target, tmp_path, monkeypatch):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, seeds in zip(folders, ((0,), (0, 1)), strict=True):
        (folder / "t").mkdir(parents=True)
        for s in seeds:
            (folder / "t" / f"abc-s{s}.json").write_text(json.dumps({"seed": s, "from": folder.name}))
    (folders[1] / "t" / "other-s2.json").write_text(json.dumps({"seed": 2, "from": "b"}))
    monkeypatch.setattr(target, "RUN_FOLDERS", tuple(folders))
    runs = target._runs("t", "abc")
    assert [(r["seed"], r["from"]) for r in runs] == [(0, "a"), (1, "b")]
    assert target._runs("t", "missing") == []


def test_committed_table_is_what_the_planner_picks_today(target):
    """Each committed cell's placement is the plan made now from the same card, and ``auto`` restricts the
    pick to placements over all the depth exactly where the card reads the targets as varied."""
    path = COMMITTED / "target.json"
    if not path.is_file():
        pytest.skip(f"{path} is not committed yet")
    from layercard.card.artifact import Card
    from layercard.plan.quality import HIGH_TARGET_ENTROPY, depth_coverage

    out = json.loads(path.read_text())
    assert out["tasks"], "the committed summary holds no task"
    for task, t in out["tasks"].items():
        card = target.with_target_entropy(Card.load(target.P.RESULTS / "cards" / task / "card.json"), task)
        by_key = {(r["target"], r["depth"]): r for r in t["rows"]}
        for (f, depth), r in by_key.items():
            plan = target.plan_at(card, f, depth)
            assert target.P.signature(plan) == r["signature"], (task, f, depth)
            if depth == "auto" and t["target_entropy"] >= HIGH_TARGET_ENTROPY:
                assert depth_coverage(plan.layers, card.n_layers) == 1.0
            elif depth == "auto":
                assert r["signature"] == by_key[(f, "any")]["signature"]


def test_changed_lists_the_cells_where_auto_moved_the_pick(target):
    def row(f, depth, sig, fraction, params):
        return {"target": f, "depth": depth, "signature": sig, "fraction": fraction, "params": params}

    rows = [
        row(0.9, "any", "a", 0.85, 100),
        row(0.9, "auto", "b", 0.90, 125),  # moved, both measured
        row(0.8, "any", "a", 0.85, 100),
        row(0.8, "auto", "a", 0.85, 100),  # the same placement
        row(0.95, "any", "a", 0.85, 100),
        row(0.95, "auto", "c", None, 150),  # moved, not measured
    ]
    moved = target.changed({"tasks": {"t": {"rows": rows}}})
    assert len(moved) == 1 and moved[0]["task"] == "t" and moved[0]["target"] == 0.9
    assert moved[0]["difference"] == pytest.approx(0.05) and moved[0]["params_ratio"] == pytest.approx(1.25)
