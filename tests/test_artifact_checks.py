"""train_metrics.json, eval.json and trim.json are checked field by field where they are read.

Each case edits one field of a copy of a tiny run and expects one line naming the file, the field and the
value, from the artifact's loader and from `layercard report` (exit 2), never an internal error or a report
of the edited number. Files written before a field was recorded still load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from test_pipeline import make_run
from typer.testing import CliRunner

from layercard.cli import app
from layercard.errors import LayercardError
from layercard.evaluate import EvalResult
from layercard.report.results import read_trim
from layercard.train import TrainMetrics

TRAIN = "train/card-2/train_metrics.json"
EVAL = "eval/card-2/eval.json"
TRIM = "trim/trim.json"
LOADERS: dict[str, Callable[[Path], Any]] = {TRAIN: TrainMetrics.load, EVAL: EvalResult.load, TRIM: read_trim}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """The config and folder of one complete tiny run."""
    cfg, run_dir, _ = make_run(tmp_path_factory.mktemp("artifact_checks"))
    return cfg, run_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run, to edit."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run[1], copy)
    return copy


def _edit(path: Path, change: Callable[[Any], Any]) -> None:
    """Rewrite the JSON file ``path`` as ``change`` leaves it (or as what it returns, if anything)."""
    d = json.loads(path.read_text())
    new = change(d)
    path.write_text(json.dumps(d if new is None else new, indent=1))


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(fields)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        del d[key]

    return change


def _report_fails(run: Path, expected: str) -> None:
    """`layercard report` of ``run`` exits 2 with the one line ``error: EXPECTED``."""
    r = CliRunner().invoke(app, ["report", str(run), "--out", str(run.parent / "out" / "report.html")])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == f"error: {expected}"
    assert not (run.parent / "out" / "report.html").exists()


def _refused(run: Path, rel: str, change: Callable[[Any], Any], problem: str) -> None:
    """Edit ``rel`` by ``change``: its loader and the report refuse it with ``FILE: PROBLEM``."""
    path = run / rel
    _edit(path, change)
    with pytest.raises(LayercardError) as e:
        LOADERS[rel](path)
    assert str(e.value) == f"{path}: {problem}"
    _report_fails(run, f"{path}: {problem}")


# ---------------------------------------------------------------- train_metrics.json


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_set(steps=-5), "steps: must be an integer >= 0, got -5"),
        (_set(steps="3"), "steps: must be an integer >= 0, got '3' (text)"),
        (_set(steps=True), "steps: must be an integer >= 0, got true"),
        (_set(steps=1e308), "steps: must be an integer >= 0, got 1e+308"),
        (_set(model=[]), "model: must be a mapping, got []"),
        (_set(plan=[]), "plan: must be a mapping, got []"),
        (_set(adapted=[1, 2]), "adapted: must be a mapping, got [1, 2]"),
        (_set(s_per_step="fast"), "s_per_step: must be a finite number >= 0, got 'fast' (text)"),
        (_set(peak_memory_mib="lots"), "peak_memory_mib: must be a finite number >= 0, got 'lots' (text)"),
        (_set(final_val_loss="x"), "final_val_loss: must be a finite number, got 'x' (text)"),
        (_set(loss_curve={"a": 1}), "loss_curve: must be a list, got a mapping"),
        (_set(loss_curve=[[1, "a"]]), "loss_curve[0][1]: must be a finite number, got 'a' (text)"),
        (_set(s_per_step_spread="x"), "s_per_step_spread: must be a mapping, got 'x' (text)"),
        (_set(task=[]), "task: must be a mapping, got []"),
        (_drop("steps"), "steps: missing"),
        (_set(final_trian_loss=1.0), "final_trian_loss: unknown field (did you mean final_train_loss?)"),
    ],
)
def test_train_metrics_fields_are_checked(run_copy, change, problem):
    _refused(run_copy, TRAIN, change, problem)


def test_train_metrics_without_the_fields_recorded_later_still_load(run_copy):
    """A file written before a field was recorded (the committed benchmark results among them) loads, the
    field read as None; one of the fields every file has is still required."""
    later = [f.name for f in dataclasses.fields(TrainMetrics) if f.default is not dataclasses.MISSING]
    later.append("predicted_step_time_scaled_s")  # older than the defaulted ones: committed files lack it

    def old(d: dict[str, Any]) -> None:
        for key in later:
            del d[key]

    _edit(run_copy / TRAIN, old)
    m = TrainMetrics.load(run_copy / TRAIN)
    assert m.predicted_step_time_scaled_s is None and m.s_per_step_spread is None and m.adapted is None


def test_a_negative_loss_a_trainers_own_objective_logged_loads(run_copy):
    """The Trainer callback records what a Trainer subclass logs, and a margin or reward objective may be
    negative: the run still reports."""

    def negative(d: dict[str, Any]) -> None:
        d["loss_curve"] = [[s, loss - 100.0] for s, loss in d["loss_curve"]]
        d["first_train_loss"] = d["loss_curve"][0][1]

    _edit(run_copy / TRAIN, negative)
    assert TrainMetrics.load(run_copy / TRAIN).first_train_loss < 0


# ---------------------------------------------------------------- eval.json and predictions.jsonl


def _metric(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["metrics"].update({name: value})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_metric("exact_match", -3.0), "metrics.exact_match: must be a score in [0, 1], got -3.0"),
        (_metric("exact_match", 7.0), "metrics.exact_match: must be a score in [0, 1], got 7.0"),
        (_metric("exact_match", "x"), "metrics.exact_match: must be a finite number, got 'x' (text)"),
        (
            _set(metrics={}),
            "metrics: must hold at least one metric (the first is the primary), got none",
        ),
        (_set(loss=-1.0), "loss: must be a finite number >= 0, got -1.0"),
        (_set(n="4"), "n: must be an integer >= 1, got '4' (text)"),
        (_set(example_tokens=["a"] * 4), "example_tokens[0]: must be an integer >= 1, got 'a' (text)"),
        (_set(timing=[]), "timing: must be a mapping, got []"),
        (_set(task=[]), "task: must be a mapping, got []"),
        (_set(provenance="x"), "provenance: must be a mapping, got 'x' (text)"),
        (_set(metrcs={}), "metrcs: unknown field (did you mean metrics?)"),
        (
            _set(predictions_file="/etc/passwd"),
            "predictions_file: must be 'predictions.jsonl', the file beside it, got '/etc/passwd' (text)",
        ),
    ],
)
def test_eval_fields_are_checked(run_copy, change, problem):
    _refused(run_copy, EVAL, change, problem)


def test_a_score_a_rounding_past_its_scale_loads(run_copy):
    """Floating point can put a perfect score a rounding past its scale (a perfect BLEU computes as
    100.00000000000004): that is the scale, not a damaged file."""
    _edit(run_copy / EVAL, _metric("exact_match", 1.0000000000000002))
    assert EvalResult.load(run_copy / EVAL).metrics["exact_match"] > 1.0


def test_an_eval_loss_must_be_its_examples_loss(run_copy):
    """Where the examples' losses are recorded, the loss is their ratio: 1e308 (finite, positive) is not."""
    d = json.loads((run_copy / EVAL).read_text())
    ratio = math.fsum(d["example_loss_sums"]) / sum(d["example_tokens"])
    problem = f"loss: must be the examples' summed loss over their tokens ({ratio!r}), got 1e+308"
    _refused(run_copy, EVAL, _set(loss=1e308), problem)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda b: b[:10] + b"\xff" + b[10:], "not UTF-8 text (byte 10)"),
        (lambda b: b"[1, 2]\n" + b, "line 1: must be a mapping, got [1, 2]"),
    ],
)
def test_predictions_lines_are_checked(run_copy, edit, problem):
    preds = run_copy / "eval" / "card-2" / "predictions.jsonl"
    preds.write_bytes(edit(preds.read_bytes()))
    with pytest.raises(LayercardError) as e:
        EvalResult.load(run_copy / EVAL)
    assert str(e.value) == f"{preds}: {problem}"
    _report_fails(run_copy, f"{preds}: {problem}")


# ---------------------------------------------------------------- trim.json


def test_trim_fields_are_checked(run_copy):
    """trim.json is read as a trim artifact of this schema, its boundary a layer of the model."""
    path = run_copy / TRIM
    original = path.read_text()
    n = json.loads(original)["n_layers"]
    cases: list[tuple[Callable[[Any], Any], str]] = [
        (_set(kind="other"), "expected a trim artifact, found kind='other'"),
        (lambda d: [d], "expected a trim artifact, found kind='list'"),
        (_drop("provenance"), "provenance: missing"),
        (_set(chosen_k=99), f"chosen_k: must be an integer in 0..{n - 1}, got 99"),
        (_set(chosen_k=-5), f"chosen_k: must be an integer in 0..{n - 1}, got -5"),
        (_set(chosen_k="0"), f"chosen_k: must be an integer in 0..{n - 1}, got '0' (text)"),
        (_drop("chosen_k"), "chosen_k: missing"),
        (_set(chosen=0), "chosen: unknown field (did you mean chosen_k?)"),
        (_set(after=[]), "after: must be a mapping, got []"),
        (
            lambda d: d["sweep"][0].update(adapted_modules=-1),
            "sweep[0].adapted_modules: must be an integer >= 0, got -1",
        ),
    ]
    for change, problem in cases:
        path.write_text(original)
        _refused(run_copy, TRIM, change, problem)
    for version in (0, 2):  # the version's words are read_json's
        path.write_text(original)
        _edit(path, _set(schema_version=version))
        with pytest.raises(LayercardError, match=rf"^{re.escape(str(path))}: schema_version={version}\b"):
            read_trim(path)
        r = CliRunner().invoke(app, ["report", str(run_copy), "--out", str(run_copy.parent / "o" / "r.html")])
        assert r.exit_code == 2 and r.output.startswith(f"error: {path}: schema_version={version}"), r.output


def test_the_runs_trim_summary_reads_a_trim_artifact(tiny_run, run_copy):
    """The pipeline's trim stage, skipped as done, says what trim.json holds: only of a trim artifact."""
    from layercard.pipeline import load_config, run_pipeline
    from layercard.pipeline.stages import _output_hash

    path = run_copy / TRIM
    _edit(path, _set(kind="other"))
    record = run_copy / "trim" / "stage.json"  # as if the stage had written it so: skipped, not rerun
    _edit(record, lambda r: r["output_hashes"].update({TRIM: _output_hash(path)}))
    expected = f"{path}: expected a trim artifact, found kind='other'"
    with pytest.raises(LayercardError, match=f"^{re.escape(expected)}$"):
        run_pipeline(load_config(tiny_run[0]), run_copy, progress=False)


# ---------------------------------------------------------------- a folder in place of an artifact


@pytest.mark.parametrize("rel", [TRAIN, EVAL, TRIM])
def test_a_folder_in_place_of_an_artifact_is_refused(run_copy, rel):
    """Not read as a stage that did not run: the report would leave that row out in silence."""
    path = run_copy / rel
    path.unlink()
    (path / "x").mkdir(parents=True)
    with pytest.raises(LayercardError) as e:
        LOADERS[rel](path)
    assert str(e.value) == f"{path}: is a folder, not a JSON file"
    _report_fails(run_copy, f"{path}: is a folder, not a JSON file")


# ---------------------------------------------------------------- committed results


def test_every_committed_artifact_still_loads():
    """The checks refuse no train_metrics, eval or trim artifact the benchmarks committed."""
    seen = {"train_metrics": 0, "eval": 0, "trim": 0}
    loaders = {"train_metrics": TrainMetrics.load, "eval": EvalResult.load, "trim": read_trim}
    for path in sorted((REPO / "benchmarks" / "results").rglob("*.json")):
        try:
            kind = json.loads(path.read_text()).get("kind")
        except (ValueError, AttributeError, UnicodeDecodeError):
            continue
        if kind in loaders:
            loaders[kind](path)
            seen[kind] += 1
    assert all(seen.values()), seen


@pytest.mark.parametrize("name", ["../../elsewhere", "/abs/run", "all\n"])
def test_a_placement_name_in_run_json_cannot_lead_the_report_out_of_the_run(run_copy, name):
    """run.json names the placement folders the report reads: a name that is no plain folder name is refused,
    not followed."""
    run_json = run_copy / "run.json"
    _edit(run_json, lambda d: d["config"]["placements"][0].update(name=name))
    _report_fails(
        run_copy,
        f"{run_json}: config.placements[0].name: {name!r} is not a placement name "
        "(letters, digits, '_', '.', '-')",
    )


def test_an_artifact_rewritten_after_its_stage_is_left_out_of_the_report(run_copy):
    """A command run into the run's folder after the run (an eval of another adapter, say) writes figures
    the run did not make: the stage's record keeps its outputs' hashes, and the report leaves them out."""
    from layercard.report import collect_results

    before = collect_results(run_copy)
    assert "eval:all" not in before["left_out"]
    row = next(r for r in before["rows"] if r["name"] == "all")
    # another evaluation's file: valid, and not the one the stage wrote
    _edit(run_copy / "eval/all/eval.json", lambda d: d["provenance"].update(created="2020-01-01T00:00:00Z"))
    after = collect_results(run_copy)
    assert "eval:all" in after["left_out"]
    assert next(r for r in after["rows"] if r["name"] == "all")["eval_loss"] is None
    assert row["eval_loss"] is not None
    r = CliRunner().invoke(app, ["report", str(run_copy)])
    assert r.exit_code == 0, r.output
    said = " ".join((run_copy / "report.md").read_text().split())
    assert "Left out: the artifacts of eval:all" in said and "rewritten after it" in said
