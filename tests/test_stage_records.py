"""What a stage's record promises: an artifact's hash is of its content, a stage interrupted under other
settings starts again, and a result whose stage did not finish is not reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import make_run, tiny_config

from layercard.artifacts import artifact_hash, content_hash, sha256_json
from layercard.pipeline import parse_config
from layercard.pipeline.stages import Runner
from layercard.report import collect_results


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    return make_run(tmp_path_factory.mktemp("records"))


def test_an_artifacts_hash_leaves_out_when_it_was_made_and_how_long_it_took(tmp_path):
    """Provenance and timings change with every rerun; the hash is of the rest, so that a stage that makes
    the same content again does not make the stages after it stale."""
    made = {
        "kind": "plan",
        "layers": [1, 2],
        "provenance": {"created": "2024-01-01T00:00:00", "host": "a"},
        "timings": {"total_s": 1.5},
    }
    again = {
        **made,
        "provenance": {"created": "2025-06-30T12:00:00", "host": "b"},
        "timings": {"total_s": 9.0},
    }
    assert artifact_hash(made) == artifact_hash(again) == sha256_json({"kind": "plan", "layers": [1, 2]})
    assert artifact_hash({**made, "layers": [1, 3]}) != artifact_hash(made)
    assert artifact_hash({**made, "rank": 8}) != artifact_hash(made)
    path = tmp_path / "plan.json"  # a file's content hash is the same
    path.write_text(json.dumps(again))
    assert content_hash(path) == artifact_hash(made)


def test_a_stage_interrupted_under_other_settings_starts_again_from_nothing(tmp_path):
    """A stage whose record says it was interrupted resumes only under the settings it was interrupted
    under: under others it runs from scratch, and what it had written is gone first."""
    runner = Runner(parse_config(tiny_config(tmp_path), source="c.yaml"), tmp_path / "run", progress=False,
                    on_stage=None)  # fmt: skip
    folder = tmp_path / "run" / "step"
    out = folder / "out.txt"
    seen: list[tuple[bool, bool]] = []

    def interrupted(resume: bool) -> None:
        (folder / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    def finish(resume: bool) -> None:
        seen.append((resume, (folder / "partial.txt").exists()))
        out.write_text("done")

    def stage(settings: dict[str, Any], fn) -> str:
        return runner.stage("step", "step", folder, settings, {"data": "d"}, [out], fn, lambda: []).status

    with pytest.raises(KeyboardInterrupt):
        stage({"lr": 1}, interrupted)
    assert json.loads((folder / "stage.json").read_text())["status"] == "running"
    assert stage({"lr": 2}, finish) == "ran" and seen[-1] == (False, False)
    # under the settings it was interrupted under, it goes on from what it had written
    with pytest.raises(KeyboardInterrupt):
        stage({"lr": 3}, interrupted)
    assert stage({"lr": 3}, finish) == "resumed" and seen[-1] == (True, True)


@pytest.mark.parametrize("status", ["failed", "running"])
def test_an_evaluation_whose_stage_did_not_finish_is_not_reported(tiny_run, tmp_path, status):
    """A result counts only when its stage's record says it finished: an eval.json left by a stage that
    then failed, or was interrupted, is not the row's result, even with the file intact."""
    _, run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {r["name"]: r for r in collect_results(copy)["rows"]}
    assert before["card-2"]["eval_loss"] is not None
    record = copy / "eval" / "card-2" / "stage.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "status": status, "error": "stopped"}))
    results = collect_results(copy)
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["card-2"]["eval_loss"] is None and rows["card-2"]["measured_gain"] is None
    assert "eval:card-2" in results["left_out"] or "eval:card-2" in results["failed"]
    assert rows["all"]["eval_loss"] == before["all"]["eval_loss"]  # the other rows stay


def test_a_stage_summary_keeps_every_note():
    from layercard.pipeline.stages import StageResult

    rows = [("loss", "0.5"), ("note", "one"), ("note", "two")]
    said = StageResult("eval:x", "ran", 1.0, "/tmp", "fp", rows).to_dict()["summary"]
    assert said == {"loss": "0.5", "note": "one\ntwo"}
