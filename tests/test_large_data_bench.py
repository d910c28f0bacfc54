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
        "this/10/card": {"source": "this", "commit": "abc", "format": "jsonl", "records": 10,
                         "file_mib": 0.0, "command": "card", "wall_s": 1.25, "peak_rss_mib": 100.0,
                         "stopped": False},
        "before/parquet/10/card": {"source": "before", "commit": None, "format": "parquet", "records": 10,
                                   "file_mib": 0.0, "command": "card", "wall_s": 700.0,
                                   "peak_rss_mib": 4000.0, "stopped": True},
    }  # fmt: skip
    text = bench._table({"machine": {"cpu_model": "cpu", "cpu_count": 2}, "runs": runs})
    assert "| this | abc | jsonl | 10 | 0.0 | card | 1.2 | 100 |" in text
    assert "| before | ? | parquet | 10 | 0.0 | card | stopped at 700 | 4,000 (at the stop) |" in text
    assert text.index("| this | abc | jsonl") < text.index("| before | ? | parquet")  # JSONL rows first


def test_rows_written_before_formats_were_recorded_keep_their_commit(bench):
    old = {"sources": {"this": "abc", "before": "def"}, "runs": {"this/10/card": {"source": "this"}}}
    assert bench._upgrade(old) == {
        "runs": {"this/10/card": {"source": "this", "format": "jsonl", "commit": "abc"}}
    }


def test_the_table_files_hold_the_jsonl_files_records(bench, tmp_path):
    jsonl = bench._records(tmp_path / "r.jsonl", 30, "train")
    from layercard.tasks import load_task

    want = [(e.id, e.input, e.target) for e in load_task(str(jsonl)).examples]
    for fmt in ("parquet", "dataset"):
        data = bench._table_data(jsonl, fmt)
        assert bench._table_data(jsonl, fmt) == data  # written once
        assert [(e.id, e.input, e.target) for e in load_task(str(data)).examples] == want
        assert bench._mib(data) >= 0.0 and not list(tmp_path.glob("*.part"))
