"""The pooled quality fit (benchmarks/pooled_quality.py): its grid search, its held-out scoring, its rule,
and that the committed result is what the committed runs give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchscripts import benchmark_script

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality" / "pooled.json"


@pytest.fixture(scope="module")
def pooled():
    with benchmark_script("pooled_quality") as module:
        yield module


def _features(capacity: float, share: float, coverage: float):
    from layercard.plan.quality import WEIGHT_POWERS, Features

    # the capacity at each weight power: only p = 1 carries the placement's; the others read alike for all
    caps = tuple(capacity if p == 1.0 else 0.5 for p in WEIGHT_POWERS)
    return Features(capacity=caps[-1], params=share, coverage=coverage, capacities=caps)


def _records(truth, form, pooled, tasks):
    """Placements of ``tasks`` (name -> side) labelled exactly by ``form`` at ``truth``."""
    recs = []
    for t, side in tasks.items():
        for i, (x, c) in enumerate([(0.2, 1 / 6), (0.4, 1 / 3), (0.6, 2 / 3), (0.9, 1.0), (0.05, 0.5)]):
            share = 0.03 + 0.1 * i
            recs.append(
                {"task": t, "name": f"p{i}", "f": _features(x, share, c), "fraction": 0.0, "side": side}
            )
    rows = pooled.rows_of(recs)
    ys = pooled.predict(form, truth, rows)
    return [r | {"fraction": float(y)} for r, y in zip(recs, ys, strict=True)]


def test_the_fit_recovers_per_side_parameters_from_labels_made_by_them(pooled):
    form = next(f for f in pooled.FORMS if f.name == "side-gamma-beta")
    truth = {"p": 1.0, "gamma": [0.05, 0.3], "beta": [0.1, 1.5]}
    rows = pooled.rows_of(_records(truth, form, pooled, {"a": False, "b": True, "c": True}))
    params, err = pooled.fit(form, rows)
    assert params == truth and err == pytest.approx(0.0, abs=1e-12)
    # one β for both sides cannot fit labels made with two
    _, err_shared = pooled.fit(next(f for f in pooled.FORMS if f.name == "pool-capcov"), rows)
    assert err_shared > 0.01


def test_the_shared_form_agrees_with_the_planners_grid_search(pooled):
    from layercard.plan.quality import FORMS, fit

    recs = _records({"p": 1.0, "gamma": 0.2, "beta": 0.35}, pooled.FORMS[0], pooled, {"a": False})
    for r, noise in zip(recs, [0.03, -0.02, 0.01, 0.0, -0.04], strict=True):
        r["fraction"] += noise
    ours, err = pooled.fit(pooled.FORMS[0], pooled.rows_of(recs))
    theirs, err2 = fit(FORMS["capacity_coverage"], [r["f"] for r in recs], [r["fraction"] for r in recs])
    assert (ours["p"], ours["gamma"], ours["beta"]) == theirs and err == pytest.approx(err2)


def test_held_out_scores_each_task_with_a_fit_that_never_saw_it(pooled):
    form = next(f for f in pooled.FORMS if f.name == "side-beta")
    truth = {"p": 1.0, "gamma": 0.1, "beta": [0.2, 1.0]}
    recs = _records(truth, form, pooled, {"a": False, "b": False, "c": True, "d": True})
    for r in recs:
        if r["task"] == "d":
            r["fraction"] = 0.5  # a task the others do not predict
    rows = pooled.rows_of(recs)
    out = pooled.held_out(form, rows)
    assert out["a"]["params"] == pooled.fit(form, rows.where(rows.task != "a"))[0]
    assert out["d"]["params"] == truth and out["d"]["fit_mae"] == pytest.approx(0.0, abs=1e-12)
    assert out["d"]["mae"] > 0.1 and out["c"]["mae"] > 0.0


def test_adoption_needs_every_condition(pooled):
    met = pooled.adopted({"mae": 0.05, "regret": 0.01}, choosing_mae=0.07)
    assert all(met.values())
    assert pooled.adopted({"mae": 0.06, "regret": 0.01}, choosing_mae=0.07) == {
        "confirm_mae": False,
        "confirm_regret": True,
        "choosing_mae": True,
    }


def test_committed_result_is_what_the_committed_runs_give(pooled):
    records, _ = pooled.pool_records()
    rows = pooled.rows_of(records)
    committed = json.loads(COMMITTED.read_text())
    assert sorted(set(rows.task)) == sorted(committed["pool"])
    chosen = committed["rule"]["chosen"]
    form = next(f for f in pooled.FORMS if f.name == chosen)
    params, err = pooled.fit(form, rows)
    assert params == committed["forms"][chosen]["pooled"]["params"]
    assert err == pytest.approx(committed["forms"][chosen]["pooled"]["fit_mae"])
    assert np.isfinite(err)
