"""The large-data benchmark's own parts: the records it writes, a stopped command, its table."""

from __future__ import annotations

import json

import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("large_data") as module:
        yield module


def test_records_are_facts_under_ids_of_their_own(bench, tmp_path):
    path = bench._records(tmp_path / "r.jsonl", 1200, "train")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1200 and len({r["id"] for r in rows}) == 1200
    from layercard.tasks import load_task

    facts = load_task("synthetic:facts:train").examples
    assert [(r["input"], r["target"]) for r in rows[:3]] == [(e.input, e.target) for e in facts[:3]]
    assert rows[len(facts)]["input"] == rows[0]["input"]  # cycled
    assert not list(tmp_path.glob("*.part"))


def test_a_command_past_its_time_is_stopped_and_said_so(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "WORK", tmp_path)
    src = tmp_path / "src" / "layercard"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "__main__.py").write_text("import time\ntime.sleep(30)\n")
    r = bench._run(["card"], src.parent, max_s=0.5)
    assert r["stopped"] and 0.5 <= r["wall_s"] < 10
    (src / "__main__.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(SystemExit, match=r"failed \(3\)"):
        bench._run(["card"], src.parent, max_s=30)
    runs = {
        "this/10/card": {"source": "this", "records": 10, "file_mib": 0.0, "command": "card",
                         "wall_s": 1.25, "peak_rss_mib": 100.0, "stopped": False},
        "before/10/card": {"source": "before", "records": 10, "file_mib": 0.0, "command": "card",
                           "wall_s": 700.0, "peak_rss_mib": 4000.0, "stopped": True},
    }  # fmt: skip
    text = bench._table(
        {"machine": {"cpu_model": "cpu", "cpu_count": 2}, "sources": {"this": "abc"}, "runs": runs}
    )
    assert "| this | 10 | 0.0 | card | 1.2 | 100 |" in text
    assert "| before | 10 | 0.0 | card | stopped at 700 | 4,000 (at the stop) |" in text
