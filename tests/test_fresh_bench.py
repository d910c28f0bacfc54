"""The fresh-task benchmark's tasks: field mappings that turn the project's data into tasks of their own."""

from __future__ import annotations

import pytest
from benchscripts import benchmark_script
from conftest import shared_data


@pytest.fixture(scope="module")
def fresh():
    with benchmark_script("fresh_tasks") as module:
        yield module


def test_e2e_parse_reads_a_description_and_writes_its_meaning_representation(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("e2e_nlg/test.jsonl").parents[1]))
    t = fresh.TASKS["e2e_parse"]
    task = fresh.load(t, "test")
    ex = task.examples[0]
    assert ex.target.startswith("name[") and "]" in ex.target
    assert "[" not in ex.input  # the input is the description, not the representation
    assert "meaning representation" in task.format.instruction


def test_gsm8k_answer_targets_the_final_number_alone(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("gsm8k/test.jsonl").parents[1]))
    task = fresh.load(fresh.TASKS["gsm8k_answer"], "test")
    targets = [e.target for e in task.examples[:50]]
    assert all(x.replace(",", "").lstrip("-").replace(".", "", 1).isdigit() for x in targets)
    assert "####" not in task.examples[0].input


def test_a_missing_dataset_names_where_it_looked(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERCARD_DATA", str(tmp_path))
    with pytest.raises(SystemExit, match="e2e_nlg/test.jsonl not found"):
        fresh.load(fresh.TASKS["e2e_parse"], "test")
