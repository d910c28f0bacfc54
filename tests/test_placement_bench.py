"""The placement benchmark's pure parts: its profiles, its job grid and the ledger's records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from benchscripts import BENCHMARKS, benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("placement") as module:  # its package sits beside the entry script
        yield module


def test_grid_has_the_issue_counts(bench):
    s = bench.real_settings()
    jobs = bench.grid_jobs(s, ["e2e_nlg", "gsm8k"])
    e2e = [j for j in jobs if j.task == "e2e_nlg"]
    # 2 budgets × (8 policies + random × 3) + all-30 in the grid; 4 policies × 2 extra seeds repeated
    assert sum(j.group == "grid" for j in e2e) == 23
    assert sum(j.group == "repeat" for j in e2e) == 8
    gsm = [j for j in jobs if j.task == "gsm8k"]
    assert [j.policy for j in gsm] == [*bench.SMALL_POLICIES, "all"]
    assert all(j.budget == 8 for j in gsm if j.policy != "all")
    only = bench.grid_jobs(s, ["e2e_nlg"], {"card"}, {"repeat"})
    assert [(j.policy, j.train_seed) for j in only] == [("card", 1), ("card", 2)]


def test_gpu_profile_scales_steps_and_examples_but_keeps_lengths(bench):
    cpu, gpu = bench.real_settings(), bench.gpu_settings()
    assert (gpu.profile, cpu.profile) == ("gpu", "cpu")
    assert gpu.steps > cpu.steps and gpu.card_examples > cpu.card_examples
    for c, g in zip(cpu.tasks, gpu.tasks, strict=True):
        assert (g.name, g.max_length, g.max_input_tokens, g.max_new_tokens, g.grid) == (
            c.name,
            c.max_length,
            c.max_input_tokens,
            c.max_new_tokens,
            c.grid,
        )
        assert g.loss_examples > c.loss_examples and g.gen_examples <= g.loss_examples
        assert f"batch {g.batch_size}" in g.why
    # the same policies, seeds and budgets: only the measurement's size changes
    assert bench.grid_jobs(cpu, ["sst2"]) == bench.grid_jobs(gpu, ["sst2"])
    assert any("GPU" in w for w in bench.why(gpu)) and not any("GPU" in w for w in bench.why(cpu))


def _run(samples):
    return {"key": "k", "eval": {"test_loss": 1.0, "samples": samples}}


def test_ledger_scrub_drops_dataset_texts_only(bench, tmp_path):
    ledger = tmp_path / "placement_runs"
    ledger.mkdir()
    old = _run([{"prediction": "p1", "reference": "a dataset text"}, {"prediction": "p2", "reference": "b"}])
    new = _run([{"id": "x-1", "prediction": "p1"}])
    (ledger / "old.json").write_text(json.dumps(old))
    (ledger / "new.json").write_text(json.dumps(new))
    before_new = (ledger / "new.json").read_text()

    assert bench.scrub_ledger(tmp_path) == 1
    scrubbed = json.loads((ledger / "old.json").read_text())
    assert scrubbed["eval"]["samples"] == [{"prediction": "p1"}, {"prediction": "p2"}]
    assert scrubbed["eval"]["test_loss"] == 1.0
    assert (ledger / "new.json").read_text() == before_new  # nothing to remove: left untouched
    assert bench.scrub_ledger(tmp_path) == 0
    assert bench.without_texts({"eval": {"test_loss": 2.0}}) == {"eval": {"test_loss": 2.0}}


def test_ledger_keeps_runs_trims_and_the_machines_of_older_reports(bench, tmp_path):
    from placement.ledger import Ledger

    results = tmp_path / "results"
    results.mkdir()
    machines = [{"machine": {"cpu_count": 2}, "versions": {"torch": "x"}}]
    (results / "placement.json").write_text(json.dumps({"created": "then", "measured_on": machines}))
    led = Ledger(tmp_path / "root", results)
    # results measured before placement_measured_on.json existed: the report made then names the machine
    assert led.measured_on() == machines

    key = "ab" * 32
    assert led.run(key) is None
    led.store_run(key, _run([{"id": "x-1", "prediction": "p"}]))
    assert (results / "placement_runs" / f"{key}.json").is_file()
    assert led.run(key)["eval"]["test_loss"] == 1.0

    assert led.trim("sst2", key) is None
    led.store_trim("sst2", key, {"chosen_k": 27}, "trim phase")
    assert led.trim("sst2", key) == {"chosen_k": 27}
    assert led.trim("sst2", key[:16] + "cd" * 24) is None  # same file name, another run: not its trim


def test_report_keeps_its_stamp_only_while_nothing_else_changed(bench):
    from placement.report import keep_created

    previous = {"kind": "placement_benchmark", "created": "then", "rows": [{"test_loss": 1.0}]}
    same = {"kind": "placement_benchmark", "created": "now", "rows": ({"test_loss": 1.0},)}
    assert keep_created(same, previous)["created"] == "then"
    changed = {**same, "rows": [{"test_loss": 0.5}]}
    assert keep_created(changed, previous)["created"] == "now"
    assert keep_created(same, None)["created"] == "now"


def test_card_and_run_keys_read_the_settings_the_committed_cards_and_runs_recorded(bench, tmp_path):
    """The keys are hashes of the library's configs, which gained settings after the committed cards and
    runs were made: at the values those were made with, the keys must read what the records hold, or
    `report` finds none of them and the phases that train make them all again."""
    import dataclasses

    from placement.runner import Bench, card_key_config, run_key_train
    from placement.settings import RESULTS

    s = bench.real_settings()
    b = Bench(s, tmp_path / "root", RESULTS, tasks=[t.name for t in s.tasks])
    for ts in s.tasks:
        recorded = json.loads((RESULTS / "placement_cards" / ts.name / "card.json").read_text())["config"]
        assert card_key_config(dataclasses.asdict(b.card_config(ts))) == recorded
    runs = sorted((RESULTS / "placement_runs").glob("*.json"))
    trained = [r["config"] for r in map(json.loads, (p.read_text() for p in runs)) if "train" in r["config"]]
    assert trained
    for cfg in trained:
        ts = s.task(cfg["task"])
        assert run_key_train(b.train_config(ts, cfg["train"]["seed"]).to_dict()) == cfg["train"]
    # another value of an added setting is another card or run
    assert card_key_config({**recorded, "weight_snr": True})["weight_snr"] is True
    assert run_key_train({**cfg["train"], "init": "eva"})["init"] == "eva"


def test_entry_script_keeps_its_command_line():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "placement.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for phase in ("cards", "single", "select", "confirm", "policies", "trim", "report", "all"):
        assert phase in out
    assert "--dry-run-tiny" in out and "--profile" in out and "Every train+eval run is cached" in out
