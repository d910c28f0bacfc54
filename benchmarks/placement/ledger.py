"""The benchmark's records: the run cache under ROOT and the committed ledger under RESULTS.

Every train+eval run is cached as ROOT/runs/<sha256 of its config>/result.json (with its adapter) and
copied to RESULTS/placement_runs/<sha256>.json; every trim of an all-30 run is recorded in
RESULTS/placement_trims/<task>-<run key[:16]>.json. RESULTS is committed, so a fresh checkout resumes
where the last sitting stopped and reports from those records alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layercard.artifacts import machine_info, package_versions, read_json, write_json

from .measure import now
from .settings import FROZEN_FILE, MEASURED_FILE, REPORT_JSON, RUNS_LEDGER, TRIMS_LEDGER

TRIM_KIND = "placement_trim"


def has_texts(res: dict[str, Any]) -> bool:
    """Whether the run result holds dataset texts (sample references written by older runs)."""
    return any("reference" in x for x in res.get("eval", {}).get("samples") or [])


def without_texts(res: dict[str, Any]) -> dict[str, Any]:
    """The run result without dataset texts (sample references written by older runs)."""
    if has_texts(res):
        res["eval"]["samples"] = [
            {k: v for k, v in x.items() if k != "reference"} for x in res["eval"]["samples"]
        ]
    return res


def scrub_ledger(results: Path) -> int:
    """Drop dataset texts (sample references) that older runs wrote into the committed ledger."""
    n = 0
    for f in sorted((results / RUNS_LEDGER).glob("*.json")):
        res = read_json(f)
        if has_texts(res):
            write_json(f, without_texts(res))
            n += 1
    return n


def trim_entry(
    trim: dict[str, Any], trimmed_eval: dict[str, Any] | None, before: dict[str, Any]
) -> dict[str, Any]:
    """The report's summary of a trim (layercard.trim's trim.json) and of the trimmed adapter's test eval.

    ``before`` is the untrimmed all-30 run's eval; ``trimmed_eval`` None when it is not evaluated yet.
    """
    t, ev = trim, trimmed_eval
    return {
        "chosen_k": t["chosen_k"],
        "candidates": t["candidates"],
        "ks": t["ks"],
        "metric": t["metric"],
        "layers_before": len(t["adapted_layers"]),
        "layers_after": len([k for k in t["adapted_layers"] if k <= t["chosen_k"]]),
        "modules_before": len(t["adapted_modules_before"]),
        "modules_after": len(t["adapted_modules_after"]),
        "selection_set": {
            "n": t["task"]["n_examples"],
            "before": t["before"]["metrics"],
            "after": t["after"]["metrics"],
            "loss_before": t["before"]["loss"],
            "loss_after": t["after"]["loss"],
            "s_per_example_before": t["before"]["s_per_example"],
            "s_per_example_after": t["after"]["s_per_example"],
        },
        "test": {
            "before": {"test_loss": before["test_loss"], "metric": before.get("metric")},
            "after": {"test_loss": ev["test_loss"], "metric": ev.get("metric")} if ev else None,
        },
    }


class Ledger:
    """Paths and records of one benchmark root (run cache) and results folder (committed ledger)."""

    def __init__(self, root: Path, results: Path) -> None:
        self.root = root
        self.results = results
        self._machine_noted = False
        self._previous: dict[str, Any] | None = None

    # ---- runs -----------------------------------------------------------------------------------------
    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    def run(self, key: str) -> dict[str, Any] | None:
        """A finished run's result: from the run cache, else from the committed ledger."""
        done = self.run_dir(key) / "result.json"
        if done.is_file():
            return without_texts(read_json(done))
        ledger = self.results / RUNS_LEDGER / f"{key}.json"
        if ledger.is_file():
            return without_texts(read_json(ledger))
        return None

    def store_run(self, key: str, res: dict[str, Any]) -> None:
        """result.json is written last: a run folder without one is a crashed run, redone from scratch."""
        write_json(self.run_dir(key) / "result.json", res)
        write_json(self.results / RUNS_LEDGER / f"{key}.json", res)

    # ---- trims ----------------------------------------------------------------------------------------
    def trim_dir(self, task: str, key: str) -> Path:
        """Where the trim of the all-30 run ``key`` writes its sweep and trimmed adapter (run cache)."""
        return self.root / "trim" / task / key[:16]

    def _trim_path(self, task: str, key: str) -> Path:
        return self.results / TRIMS_LEDGER / f"{task}-{key[:16]}.json"

    def trim(self, task: str, key: str) -> dict[str, Any] | None:
        """The recorded trim summary of the all-30 run ``key``, if any."""
        p = self._trim_path(task, key)
        if not p.is_file():
            return None
        rec = read_json(p)
        return rec["summary"] if rec.get("run") == key else None

    def store_trim(self, task: str, key: str, summary: dict[str, Any], source: str) -> None:
        rec = {"kind": TRIM_KIND, "task": task, "run": key, "source": source, "summary": summary}
        write_json(self._trim_path(task, key), {**rec, "created": now()})

    # ---- the previous report, the machines that measured, the frozen score ----------------------------
    def previous_report(self) -> dict[str, Any] | None:
        """RESULTS/placement.json as it was before this process wrote one (read once)."""
        if self._previous is None:
            p = self.results / REPORT_JSON
            self._previous = read_json(p) if p.is_file() else {}
        return self._previous or None

    def measured_on(self) -> list[dict[str, Any]]:
        """Each distinct machine (and package versions) that measured runs into these results.

        Results measured before RESULTS/placement_measured_on.json existed name their machine only in
        the report made then, so that report's list stands in for the file.
        """
        p = self.results / MEASURED_FILE
        if p.is_file():
            return read_json(p)["machines"]
        return list((self.previous_report() or {}).get("measured_on") or [])

    def note_machine(self) -> None:
        """Record this machine before it measures a run, so a report made elsewhere still names it."""
        if self._machine_noted:  # the machine does not change within one process
            return
        self._machine_noted = True
        entry = {"machine": machine_info(), "versions": package_versions()}
        known = self.measured_on()
        if entry not in known:
            write_json(self.results / MEASURED_FILE, {"machines": [*known, entry]})

    @property
    def frozen_path(self) -> Path:
        return self.results / FROZEN_FILE

    def frozen(self) -> dict[str, Any] | None:
        """The frozen default-score choice of `select`, if made."""
        return read_json(self.frozen_path) if self.frozen_path.is_file() else None
