"""The default's error band and the shortfall its caution quotes (benchmarks/side_model.py): the band choice
on constructed errors whose answer is known, and the committed results against the committed runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def side():
    with benchmark_script("side_model") as module:
        yield module


def test_band_check_keeps_the_line_only_where_errors_grow_with_the_depth_left_out(side):
    task = np.repeat(np.array(["a", "b", "c"]), 4)
    u = np.tile(np.array([0.0, 0.25, 0.5, 0.75]), 3)
    growing = side.band_scores(u, 0.02 + 0.2 * u, task)
    assert growing["chosen"] == "line" and growing["mean"]["line"] == pytest.approx(0.0, abs=1e-12)
    flat = side.band_scores(u, np.full(len(u), 0.05), task)
    assert flat["chosen"] == "one"  # a line with no slope is no better than one error
    assert set(flat["tasks"]) == {"a", "b", "c"}


def test_shortfall_reads_placements_under_half_the_depth_only(side):
    import pooled_quality as Q

    rows = Q.Rows(
        caps=np.zeros((4, 4)),
        share=np.full(4, 0.1),
        cov=np.array([1 / 6, 1 / 3, 0.5, 1.0]),
        y=np.array([0.5, 0.7, 0.1, 0.9]),
        side=np.array([1, 1, 1, 1]),
        task=np.array(["t"] * 4),
    )
    out = side.shortfalls(np.array([0.9, 0.8, 0.9, 0.9]), rows)
    assert out == {"t": {"shortfall": pytest.approx(0.25), "placements": 2, "high": True}}
    with pytest.raises(SystemExit, match="non-finite"):
        side.shortfalls(np.array([np.nan, 0.8, 0.9, 0.9]), rows)


def test_committed_results_are_what_the_committed_runs_give(side, tmp_path, monkeypatch):
    committed = json.loads((side.OUT / "side_model.json").read_text())
    committed_md = (side.OUT / "side_model.md").read_text()
    shutil.copy(side.OUT / "pooled.json", tmp_path / "pooled.json")
    monkeypatch.setattr(side, "OUT", tmp_path)
    got = side.score()
    assert got["band"] == pytest.approx(committed["band"])
    assert got["held_out_mae"] == pytest.approx(committed["held_out_mae"])
    assert got["band_check"]["chosen"] == committed["band_check"]["chosen"]
    for what in ("held_out", "confirm"):
        for t, v in got["shortfall"][what].items():
            assert v["shortfall"] == pytest.approx(committed["shortfall"][what][t]["shortfall"])
    assert (tmp_path / "side_model.md").read_text() == committed_md
