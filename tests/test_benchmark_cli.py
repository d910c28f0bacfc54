"""Every benchmark script reads its command line before it measures or writes anything."""

from __future__ import annotations

import re

import pytest
from benchscripts import BENCHMARKS, benchmark_script

# How a script parses its arguments: its own argparse, the shared no-options helper, or a shared main.
_PARSES = re.compile(
    r"argparse|no_options\(|run_or_summary\(|from rounds import main|main\(doc=__doc__\)|sys\.argv\[1:\]"
)


def _scripts() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_every_script_parses_its_command_line():
    scripts = _scripts()
    assert len(scripts) > 30
    blind = [s for s in scripts if not _PARSES.search((BENCHMARKS / f"{s}.py").read_text())]
    assert not blind, f"these scripts run on --help: {blind}"


def test_a_script_without_options_prints_its_help_and_refuses_others(capsys, monkeypatch):
    with benchmark_script("usage") as usage:
        monkeypatch.setattr("sys.argv", ["budget_margin.py", "--help"])
        with pytest.raises(SystemExit) as done:
            usage.no_options("What the script measures.")
        assert done.value.code == 0 and "What the script measures." in capsys.readouterr().out
        monkeypatch.setattr("sys.argv", ["budget_margin.py", "--bogus"])
        with pytest.raises(SystemExit) as done:
            usage.no_options("What the script measures.")
        assert done.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
        monkeypatch.setattr("sys.argv", ["budget_margin.py"])
        usage.no_options("What the script measures.")  # no argument: the script runs


def test_run_or_summary_runs_only_when_asked(capsys, monkeypatch):
    with benchmark_script("usage") as usage:
        called: list[str] = []

        def run() -> None:
            called.append("run")

        def summary() -> dict:
            called.append("summary")
            return {"tasks": {"sst2": 1}}

        monkeypatch.setattr("sys.argv", ["group_by_length.py", "--help"])
        with pytest.raises(SystemExit) as done:
            usage.run_or_summary("What the script measures.", run, summary)
        assert done.value.code == 0 and "What the script measures." in capsys.readouterr().out
        assert called == []
        monkeypatch.setattr("sys.argv", ["group_by_length.py", "summary"])
        usage.run_or_summary("doc", run, summary)
        assert called == ["summary"] and '"sst2": 1' in capsys.readouterr().out
        monkeypatch.setattr("sys.argv", ["group_by_length.py", "run"])
        usage.run_or_summary("doc", run, summary)
        assert called == ["summary", "run", "summary"]
        monkeypatch.setattr("sys.argv", ["group_by_length.py"])
        with pytest.raises(SystemExit) as done:
            usage.run_or_summary("doc", run, summary)
        assert done.value.code == 2 and called == ["summary", "run", "summary"]
