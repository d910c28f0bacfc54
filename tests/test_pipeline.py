"""The whole pipeline on a tiny model: one run folder, stage skipping and resumption, config errors, CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard.cli import app
from layercard.errors import LayercardError
from layercard.evaluate import EvalResult, difference_standard_error, fraction_standard_error
from layercard.pipeline import (
    STAGE_FILE,
    apply_overrides,
    demo_config_path,
    load_config,
    parse_config,
    run_pipeline,
)
from layercard.run_layout import RunLayout

STAGES = [
    "card",
    "plan:card-2",
    "plan:all",
    "train:card-2",
    "train:all",
    "trim",
    "eval:base",
    "eval:card-2",
    "eval:all",
    "eval:trimmed",
    "report",
]


def tiny_config(model_dir: Path) -> dict[str, Any]:
    """A config for the tiny model: everything small enough to run in seconds on one thread."""
    return {
        "model": str(model_dir),
        "task": {
            "train": "synthetic:facts",
            "train_split": "train",
            "eval": "synthetic:facts",
            "eval_split": "test",
        },
        "seed": 0,
        "threads": 1,
        "card": {
            "roles": "q,v",
            "examples": 8,
            "max_length": 64,
            "batch_size": 4,
            "coupling": True,
            "coupling_examples": 4,
            "calibrate": True,
            "calibrate_steps": 1,
        },
        "placements": [
            {"name": "card-2", "policy": "card", "budget": "layers=2", "rank": 4, "score": "gradnorm"},
            {"name": "all", "policy": "all", "rank": 4},
        ],
        "train": {
            "steps": 3,
            "batch_size": 4,
            "lr": "1e-3",
            "max_length": 64,
            "eval_examples": 4,
            "eval_every": 2,
            "checkpoint_every": 2,
        },
        "trim": {"examples": 4, "batch_size": 4, "max_length": 96, "radius": 1},
        "eval": {"examples": 4, "batch_size": 4, "max_new_tokens": 4},
    }


def make_model_dir(root: Path) -> Path:
    d = root / "tiny-llama"
    if not (d / "config.json").is_file():
        tiny_model("llama").save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
    return d


def write_config(root: Path, cfg: dict[str, Any], name: str = "config.yaml") -> Path:
    p = root / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def make_run(root: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Config file, run folder and summary of one complete tiny run under ``root``."""
    cfg_path = write_config(root, tiny_config(make_model_dir(root)))
    run_dir = root / "run"
    summary = run_pipeline(load_config(cfg_path), run_dir, progress=False)
    return cfg_path, run_dir, summary


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    return make_run(tmp_path_factory.mktemp("pipeline"))


def test_every_artifact_names_the_tokenizer_it_read(tiny_run):
    """The model hash covers the weights only: each artifact's provenance also names the tokenizer and
    chat-template files, as the run's fingerprints do."""
    from layercard.models import tokenizer_folder_hash

    cfg_path, run_dir, _ = tiny_run
    want = tokenizer_folder_hash(cfg_path.parent / "tiny-llama")
    names = ["card/card.json", "plan/all/plan.json", "train/all/train_metrics.json", "eval/all/eval.json"]
    for name in names + ["trim/trim.json", "trim/trace.json"]:
        assert json.loads((run_dir / name).read_text())["provenance"]["tokenizer_hash"] == want, name


def _records(run_dir: Path) -> dict[str, dict[str, Any]]:
    recs = {}
    for p in [*run_dir.glob(f"**/{STAGE_FILE}"), run_dir / "report.stage.json"]:
        d = json.loads(p.read_text())
        recs[d["stage"]] = {**d, "mtime": p.stat().st_mtime_ns}
    return recs


# ---------------------------------------------------------------- a full run


def test_run_writes_every_artifact(tiny_run):
    _, run_dir, summary = tiny_run
    assert summary["ran"] == STAGES and summary["skipped"] == []
    # trained in the process that calibrated the card: its plans take that process's memory figure
    assert json.loads((run_dir / "plan/all/plan.json").read_text())["predicted"]["memory_figure"] == "window"
    expected = [
        "run.json",
        "summary.json",
        "card/card.json",
        "card/card.md",
        "card/card_heatmap.png",
        "card/card_coupling.png",
        "plan/card-2/plan.json",
        "plan/all/plan.json",
        "train/card-2/adapter/adapter_config.json",
        "train/card-2/train_metrics.json",
        "train/all/adapter/adapter_model.safetensors",
        "train/all/train_metrics.json",
        "trim/trace.json",
        "trim/trim.json",
        "trim/adapter-trimmed/adapter_config.json",
        "eval/base/eval.json",
        "eval/card-2/eval.json",
        "eval/all/eval.json",
        "eval/trimmed/eval.json",
        "eval/trimmed/predictions.jsonl",
        "report.html",
        "report.md",
        "figures/quality_cost.png",
    ]
    missing = [p for p in expected if not (run_dir / p).is_file()]
    assert not missing, missing
    assert set(_records(run_dir)) == set(STAGES)
    assert all(r["status"] == "done" for r in _records(run_dir).values())
    # the trim stage picked the placement with the most layers, and the summary has every model
    assert json.loads((run_dir / "trim" / "stage.json").read_text())["config"]["placement"] == "all"
    names = [r["name"] for r in summary["rows"]]
    assert names == ["base", "card-2", "all", "all-trimmed"]
    rows = {r["name"]: r for r in summary["rows"]}
    assert len(rows["card-2"]["layers"]) == 2 and len(rows["all"]["layers"]) == 4
    assert rows["all"]["measured_gain"] == pytest.approx(rows["base"]["eval_loss"] - rows["all"]["eval_loss"])
    assert rows["all"]["s_per_step"] > 0 and rows["card-2"]["predicted_gain"] is not None
    assert rows["all-trimmed"]["modules"] <= rows["all"]["modules"]
    # the trim stage's summary says what chose K, and the loss beside the metric where the loss did
    trim = json.loads((run_dir / "trim" / "trim.json").read_text())
    said = next(s["summary"] for s in summary["stages"] if s["stage"] == "trim")
    by_loss = trim["chosen_by"] == "loss"
    assert ("by the held-out loss" in said["chosen K"]) is by_loss
    assert ("loss before → after" in said) is by_loss
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(summary["rows"]))
    # plans are priced at the batch the placements train at (train.batch_size), and say so
    plan = json.loads((run_dir / "plan" / "card-2" / "plan.json").read_text())
    assert plan["config"]["batch_size"] == 4


def _snippet_model(readme: str):
    """Run the README's Python block; the model it loads."""
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None, readme
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    return scope["model"]


def test_adapter_folders_say_what_they_hold_and_load_as_they_say(tiny_run):
    import torch
    from peft import PeftModel

    _, run_dir, _ = tiny_run
    metrics = json.loads((run_dir / "train/all/train_metrics.json").read_text())
    trim = json.loads((run_dir / "trim/trim.json").read_text())
    readme = (run_dir / "train/all/adapter/README.md").read_text()
    assert readme.startswith("---\nlibrary_name: peft\n") and "- layercard\n" in readme
    assert "More Information Needed" not in readme  # not PEFT's placeholder card
    assert f"| steps | {metrics['steps']} of batch {metrics['batch_size']}," in readme
    assert f"sha256 `{metrics['model']['hash']}`" in readme
    assert f"{metrics['final_val_loss']:.4f}" in readme
    trimmed = (run_dir / "trim/adapter-trimmed/README.md").read_text()
    assert f"above decoder layer {trim['chosen_k']}" in trimmed and "- trimmed\n" in trimmed
    assert (
        f"| adapted modules | {trim['before']['adapted_modules']} | {trim['after']['adapted_modules']} |"
        in (trimmed)
    )
    assert "## The adapter it was trimmed from" in trimmed and "### Training, as measured" in trimmed
    model_dir = make_model_dir(run_dir.parent)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    for folder, text in (
        (run_dir / "train/all/adapter", readme),
        (run_dir / "trim/adapter-trimmed", trimmed),
    ):
        got = _snippet_model(text)
        want = PeftModel.from_pretrained(tiny_model("llama").__class__.from_pretrained(model_dir), folder)
        with torch.no_grad():
            torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=0, atol=0)


def copied(tiny_run, tmp_path) -> tuple[Path, Path]:
    """The tiny run's config and a copy of its folder to change (the fixture's folder is shared)."""
    cfg_path, run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return cfg_path, copy


def test_second_run_skips_every_stage(tiny_run, tmp_path, monkeypatch):
    import layercard.cost

    cfg_path, copy = copied(tiny_run, tmp_path)
    # as in a new process: no calibration here, so a plan made now would price the first steps' memory; the
    # cached plans keep the figure they were made with rather than retraining every placement
    monkeypatch.setattr(layercard.cost, "_calibrated_here", False)
    # the report names its run folder: in a copy it is made again, and names the copy; nothing else reruns
    moved = run_pipeline(load_config(cfg_path), copy, progress=False)
    assert moved["ran"] == ["report"], moved["ran"]
    assert f"Run folder {copy.resolve()};" in (copy / "report.md").read_text()
    before = _records(copy)
    events: list[tuple[str, str]] = []
    summary = run_pipeline(
        load_config(cfg_path), copy, progress=False, on_stage=lambda e, n, r: events.append((e, n))
    )
    assert summary["ran"] == [] and summary["skipped"] == STAGES
    assert not [e for e in events if e[0] == "start"]
    after = _records(copy)
    assert {k: v["mtime"] for k, v in after.items()} == {k: v["mtime"] for k, v in before.items()}
    # a report whose figures were lost (a replace cut half-way) is made again, not kept with dead links
    shutil.rmtree(copy / "figures")
    summary = run_pipeline(load_config(cfg_path), copy, progress=False)
    assert summary["ran"] == ["report"] and (copy / "figures").is_dir()


def test_until_plan_trains_nothing_and_the_next_call_goes_on(tmp_path):
    from layercard.cost import peak_of

    cfg_path = write_config(tmp_path, tiny_config(make_model_dir(tmp_path)))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(out), "--until", "nope"])
    assert r.exit_code == 2 and "until 'nope': not a stage" in r.output and not out.exists()
    rows: dict[str, dict[str, str]] = {}

    def on_stage(event: str, name: str, result: Any) -> None:
        if event == "end":
            rows[name] = dict(result.rows)

    summary = run_pipeline(load_config(cfg_path), out, progress=False, on_stage=on_stage, until="plan")
    assert summary["ran"] == ["card", "plan:card-2", "plan:all"] and list(rows) == summary["ran"]
    assert summary["until"] == "plan" and summary["report"] is None and summary["train_steps"] == 3
    lay = RunLayout(out)
    assert not lay.train_dir("all").exists() and not lay.report_html.exists()
    for name in ("card-2", "all"):
        plan = json.loads(lay.plan_json(name).read_text())
        assert plan["config"]["step_positions"]  # priced at the run's own batches
        # by the memory figure of the later process that will train it, not this one's (which calibrated)
        assert plan["predicted"]["memory_figure"] == "first_step"
        said = rows[f"plan:{name}"]["predicted time of the 3 optimizer steps"]
        assert float(said.removesuffix(" s")) == pytest.approx(3 * plan["predicted"]["step_time_s"], rel=0.01)
    # the next call keeps the card and the plans and goes on
    done = run_pipeline(load_config(cfg_path), out, progress=False)
    assert set(done["skipped"]) == {"card", "plan:card-2", "plan:all"}
    assert set(done["ran"]) == set(STAGES) - set(done["skipped"])
    assert done["report"] is not None and lay.report_html.is_file()
    # the command line: the plans' table and how to go on
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(tmp_path / "cli"), "--until", "plan"])
    assert r.exit_code == 0, r.output
    assert "plans · 3 optimizer steps each" in r.output and "stopped after plan" in r.output
    plan = json.loads(RunLayout(tmp_path / "cli").plan_json("all").read_text())["predicted"]
    peak = f"{peak_of(plan['memory'], plan.get('memory_figure')):,.0f}"
    assert re.search(rf"^ *all +4 +8 +1,792 +\S+ +\S+ s +{peak} ", r.output, re.M), r.output
    assert "no costs" not in r.output
    # a card without the cost calibration: the table says why it has no costs
    args = ["run", str(cfg_path), "--out", str(tmp_path / "bare"), "--until", "plan"]
    args += ["--set", "card.calibrate=false"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "no costs: the card was measured without the cost calibration" in " ".join(r.output.split())


def test_results_of_replaced_inputs_are_left_out_until_made_again(tiny_run, tmp_path):
    cfg_path, run_dir, summary = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {r["name"]: r for r in summary["rows"]}
    # the placement is planned again at another rank, and the run stops before training it
    changed = load_config(cfg_path, ["placements.all.rank=2"])
    stopped = run_pipeline(changed, copy, progress=False, until="plan")
    rows = {r["name"]: r for r in stopped["rows"]}
    plan = json.loads((copy / "plan/all/plan.json").read_text())
    assert rows["all"]["trainable_params"] == plan["predicted"]["params"] < before["all"]["trainable_params"]
    assert rows["all"]["s_per_step"] is None and rows["all"]["eval_loss"] is None
    assert "all-trimmed" not in rows  # trimmed from the adapter the new plan replaces
    assert set(stopped["left_out"]) == {"train:all", "eval:all", "trim", "eval:trimmed"}
    assert rows["card-2"]["eval_loss"] == before["card-2"]["eval_loss"]  # untouched placements stay
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    text = (copy / "report.md").read_text()
    assert "Left out: the artifacts of train:all, eval:all, trim, eval:trimmed" in text
    # the next call makes them again, and nothing is left out
    done = run_pipeline(changed, copy, progress=False)
    assert done["left_out"] == [] and {r["name"] for r in done["rows"]} >= {"all", "all-trimmed"}


def test_results_trained_under_other_settings_are_left_out_until_made_again(tiny_run, tmp_path):
    cfg_path, run_dir, summary = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    changed = load_config(cfg_path, ["train.lr=5e-3"])  # the plans stay; every training is another
    stopped = run_pipeline(changed, copy, progress=False, until="plan")
    assert stopped["ran"] == [] and {"card", "plan:card-2", "plan:all"} <= set(stopped["skipped"])
    rows = {r["name"]: r for r in stopped["rows"]}
    assert rows["all"]["s_per_step"] is None and rows["card-2"]["eval_loss"] is None
    assert {"train:card-2", "train:all", "eval:card-2", "eval:all"} <= set(stopped["left_out"])
    assert rows["base"]["eval_loss"] == summary["rows"][0]["eval_loss"]  # the base is not trained


def test_evaluations_of_another_eval_task_are_left_out(tiny_run, tmp_path):
    """A run stopped before evaluating a changed eval task keeps no evaluation of the old one: not the
    base's, not a placement's (their adapters are unchanged, their data is not)."""
    cfg_path, copy = copied(tiny_run, tmp_path)
    changed = load_config(cfg_path, ["task.eval=synthetic:format", "train.eval_examples=0"])
    stopped = run_pipeline(changed, copy, progress=False, until="plan")
    assert {"eval:base", "eval:card-2", "eval:all"} <= set(stopped["left_out"])
    assert all(r["eval_loss"] is None for r in stopped["rows"]), stopped["rows"]
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    assert "examples of facts" not in (copy / "report.md").read_text()


def test_a_failed_rerun_leaves_no_summary_of_the_earlier_call(tiny_run, tmp_path):
    cfg_path, copy = copied(tiny_run, tmp_path)
    with pytest.raises(LayercardError, match="stage train:card-2"):
        run_pipeline(load_config(cfg_path, ["train.lr=1e30"]), copy, progress=False)
    summary = json.loads((copy / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["card-2"]["s_per_step"] is None and rows["card-2"]["eval_loss"] is None
    assert "train:card-2" in summary["failed"] and summary["report"] is None
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    text = " ".join((copy / "report.md").read_text().split())
    assert "Failed: train:card-2" in text and "trim.enabled: false" not in text


def failing(tiny_run, tmp_path, monkeypatch, module, name: str, error: BaseException, override: str):
    """A copy of the tiny run run again with ``override`` (which makes a stage run) and ``module.name``
    raising ``error``: the config, the copy, what the call raised and the summary it left."""
    cfg_path, copy = copied(tiny_run, tmp_path)

    def fails(*a, **k):
        raise error

    monkeypatch.setattr(module, name, fails)
    with pytest.raises(type(error)) as raised:
        run_pipeline(load_config(cfg_path, [override]), copy, progress=False)
    return cfg_path, copy, raised.value, json.loads((copy / "summary.json").read_text())


def test_a_failed_card_leaves_a_summary_and_a_report_that_say_so(tiny_run, tmp_path, monkeypatch):
    import layercard.card

    error = LayercardError("the probe pass failed")
    _, copy, raised, summary = failing(
        tiny_run, tmp_path, monkeypatch, layercard.card, "compute_card", error, "card.examples=6"
    )
    assert str(raised) == "stage card: the probe pass failed"
    assert summary["failed"] == {"card": "the probe pass failed"}
    assert {"plan:card-2", "plan:all"} <= set(summary["left_out"]), summary["left_out"]
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    assert "Failed: card, which left no artifact (the probe pass failed)" in (copy / "report.md").read_text()


def test_a_plan_at_named_positions_is_made_again_for_other_micro_batches(tiny_run, tmp_path):
    cfg_path, run_dir, _ = tiny_run
    named = ["placements.all.step_positions=300", "placements.all.peak_positions=150"]
    first = run_pipeline(load_config(cfg_path, named), tmp_path / "run", progress=False, until="plan")
    assert "plan:all" in first["ran"]
    again = run_pipeline(
        load_config(cfg_path, [*named, "train.grad_accum=2"]), tmp_path / "run", progress=False, until="plan"
    )
    assert "plan:all" in again["ran"]
    plan = json.loads((tmp_path / "run" / "plan" / "all" / "plan.json").read_text())
    assert plan["config"]["grad_accum"] == 2 and plan["predicted"]["step_micro_batches"] == 2


def test_checkpoint_frequency_trains_nothing_again(tiny_run, tmp_path):
    cfg_path, copy = copied(tiny_run, tmp_path)
    summary = run_pipeline(load_config(cfg_path, ["train.checkpoint_every=7"]), copy, progress=False)
    assert summary["ran"] == ["report"] and summary["left_out"] == [], summary  # the report is redrawn


def test_keeping_the_best_weights_trains_again_only_when_asked(tiny_run, tmp_path):
    """Settings added after run folders were first made stay out of the train stage's fingerprint at their
    defaults: a folder trained before them is not trained again."""
    cfg_path, copy = copied(tiny_run, tmp_path)
    record = _records(copy)["train:all"]
    added = {"keep_best", "early_stopping", "max_grad_norm", "early_stopping_min_delta", "group_by_length"}
    assert not added & set(record["config"])
    off = [
        "train.keep_best=false", "train.early_stopping=0", "train.max_grad_norm=null",
        "train.early_stopping_min_delta=0", "train.group_by_length=false",
    ]  # fmt: skip
    assert run_pipeline(load_config(cfg_path, off), copy, progress=False)["ran"] == ["report"]
    kept = run_pipeline(load_config(cfg_path, ["train.keep_best=true"]), copy, progress=False)
    assert {"train:all", "train:card-2"} <= set(kept["ran"])
    metrics = json.loads((copy / "train" / "all" / "train_metrics.json").read_text())
    assert metrics["best_step"] in [s for s, _ in metrics["val_curve"]]
    said = f"all: the adapter holds step {metrics['best_step']}'s, the lowest validation loss"
    assert said in (copy / "report.md").read_text()


def test_changed_train_steps_reruns_downstream_only(tiny_run, tmp_path, monkeypatch):
    import layercard.train

    cfg_path, copy = copied(tiny_run, tmp_path)
    before = _records(copy)
    calls: list[int] = []
    real = layercard.train.planned_positions
    monkeypatch.setattr(layercard.train, "planned_positions", lambda *a: calls.append(1) or real(*a))
    encoded: list[str] = []
    real_encode = layercard.train.loop.encode_task
    monkeypatch.setattr(
        layercard.train.loop,
        "encode_task",
        lambda tok, task, **kw: encoded.append(task.split) or real_encode(tok, task, **kw),
    )
    # the plans are priced at the batches training will draw, so more steps plan again
    summary = run_pipeline(load_config(cfg_path, ["train.steps=4"]), copy, progress=False)
    assert len(calls) == 1  # read once for both placements: they train on the same stream
    # and encoded once for the positions and both placements' training (the train split, then the val's)
    assert len(encoded) == 2 and encoded[0] != encoded[1], encoded
    assert set(summary["skipped"]) == {"card", "eval:base"}
    assert set(summary["ran"]) == set(STAGES) - set(summary["skipped"])
    after = _records(copy)
    for stage in ("card", "eval:base"):
        assert after[stage]["mtime"] == before[stage]["mtime"]
    m = json.loads((copy / "train/all/train_metrics.json").read_text())
    assert m["steps"] == 4
    # what the plan was priced at is what the run then computed
    plan = json.loads((copy / "plan/all/plan.json").read_text())
    assert plan["config"]["step_positions"] == pytest.approx(m["batch_positions_per_step"])
    assert plan["config"]["peak_positions"] == m["max_batch_positions"]
    assert m["predicted_peak_memory_scaled_mib"] == pytest.approx(m["predicted_peak_memory_mib"])
    assert m["budget_notes"] == []
    # a change that leaves the batches as they were (the learning rate) trains again but keeps the plans
    summary = run_pipeline(load_config(cfg_path, ["train.steps=4", "train.lr=0.02"]), copy, progress=False)
    assert {"card", "plan:card-2", "plan:all", "eval:base"} <= set(summary["skipped"])
    assert "train:all" in summary["ran"]


def test_stopped_training_resumes(tiny_run, tmp_path, monkeypatch):
    """A run stopped inside training continues from its checkpoint; finished stages are not redone."""
    import layercard.train as train_mod

    cfg_path, copy = copied(tiny_run, tmp_path)
    cfg = load_config(cfg_path, ["train.steps=5"])
    real = train_mod.train

    def stop_after_checkpoint(*args, **kwargs):
        def cb(step, _loss, _model):
            if step == 2:
                raise KeyboardInterrupt

        return real(*args, **kwargs, callback=cb)

    monkeypatch.setattr(train_mod, "train", stop_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, copy, progress=False)
    rec = json.loads((copy / "train/card-2/stage.json").read_text())
    assert rec["status"] == "running"
    assert (copy / "train/card-2/checkpoints/step-2").is_dir()
    monkeypatch.setattr(train_mod, "train", real)
    summary = run_pipeline(cfg, copy, progress=False)
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status["train:card-2"] == "resumed" and status["card"] == "skipped"
    metrics = json.loads((copy / "train/card-2/train_metrics.json").read_text())
    assert metrics["resumed_from"] == 2 and metrics["steps"] == 5


def test_a_stage_folder_another_process_writes_is_left_whole(tiny_run, tmp_path):
    """`layercard train --resume` on a placement's folder holds its lock: a run of other settings must
    refuse before deleting anything, and a delete an earlier run had begun is finished by the next."""
    import subprocess

    from bad_world import dead_pid

    from layercard import artifacts

    cfg_path, copy = copied(tiny_run, tmp_path)
    folder = copy / "train" / "all"
    before = sorted(p.name for p in folder.iterdir())
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = {**artifacts._owner_record(), "pid": other.pid, "pid_start": artifacts._pid_start(other.pid)}
        artifacts.lock_path(folder).write_text(json.dumps(record))
        with pytest.raises(LayercardError, match=r"another layercard process is writing this stage folder"):
            run_pipeline(load_config(cfg_path, ["train.lr=0.02"]), copy, progress=False)
        assert sorted(p.name for p in folder.iterdir()) == before
    finally:
        other.kill()
        other.wait()
    # a delete cut after its rename: the folder's remains under a dead process's temporary name
    cut = folder.parent / f".gone.{artifacts._host_tag()}-{dead_pid()}.abcd1234.tmp"
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_text("partial")
    summary = run_pipeline(load_config(cfg_path, ["train.lr=0.02"]), copy, progress=False)
    assert "train:all" in summary["ran"] and not cut.exists()
    assert json.loads((folder / "stage.json").read_text())["status"] == "done"


def test_a_failed_trim_is_in_the_summary(tiny_run, tmp_path, monkeypatch):
    import layercard.trim

    error = LayercardError("the sweep failed")
    _, _, raised, summary = failing(
        tiny_run, tmp_path, monkeypatch, layercard.trim, "trim", error, "trim.radius=2"
    )
    assert str(raised) == "stage trim: the sweep failed"
    assert summary["failed"] == {"trim": "the sweep failed"}
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["trim"]["status"] == "failed" and "trim" not in summary["ran"]
    assert stages["trim"]["summary"] == {"error": "the sweep failed"}
    assert "all-trimmed" not in [r["name"] for r in summary["rows"]]


def test_a_stage_that_raises_a_bug_is_recorded_as_failed(tiny_run, tmp_path, monkeypatch):
    import layercard.trim

    bug = RuntimeError("out of memory\nand more")
    cfg_path, copy, raised, summary = failing(
        tiny_run, tmp_path, monkeypatch, layercard.trim, "trim", bug, "trim.radius=2"
    )
    assert raised is bug  # the cause itself, for --debug
    record = json.loads((copy / "trim/stage.json").read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: out of memory"
    assert summary["failed"] == {"trim": "RuntimeError: out of memory"}
    monkeypatch.undo()  # mended, the next call makes the stage again
    again = run_pipeline(load_config(cfg_path, ["trim.radius=2"]), copy, progress=False)
    assert {s["stage"]: s["status"] for s in again["stages"]}["trim"] in ("ran", "resumed")


def test_an_interrupted_call_leaves_no_summary_of_the_earlier_call(tiny_run, tmp_path, monkeypatch):
    import layercard.evaluate

    cfg_path, copy = copied(tiny_run, tmp_path)
    assert json.loads((copy / "summary.json").read_text())["report"] is not None

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(layercard.evaluate, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_config(cfg_path, ["eval.batch_size=2"]), copy, progress=False)
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["report"] is None and summary["stages"][-1]["stage"] == "eval:base"
    assert summary["stages"][-1]["status"] == "stopped" and summary["ran"] == []
    # the interrupted stage resumes next time, as any stopped stage
    assert json.loads((copy / "eval/base/stage.json").read_text())["status"] == "running"


def test_a_damaged_output_is_made_again(tiny_run, tmp_path):
    cfg_path, copy = copied(tiny_run, tmp_path)
    rec = json.loads((copy / "train/all/stage.json").read_text())
    assert set(rec["output_hashes"]) == {"train/all/adapter", "train/all/train_metrics.json"}
    (copy / "train/all/adapter/adapter_model.safetensors").unlink()
    # a record written before outputs were hashed: its outputs' existence is all that is checked
    old = copy / "eval/base/stage.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "output_hashes"}))
    summary = run_pipeline(load_config(cfg_path), copy, progress=False)
    assert "train:all" in summary["ran"] and "train:card-2" in summary["skipped"]
    assert "eval:base" in summary["skipped"]
    assert (copy / "train/all/adapter/adapter_model.safetensors").is_file()
    # an edited result is no result of the run either
    metrics = copy / "eval/card-2/eval.json"
    metrics.write_text(metrics.read_text().replace('"loss"', '"loss" ', 1))
    again = run_pipeline(load_config(cfg_path), copy, progress=False)
    assert again["ran"][0] == "eval:card-2" and set(again["ran"]) <= {"eval:card-2", "report"}


def test_a_folder_that_is_no_run_is_never_deleted(tiny_run, tmp_path):
    cfg_path, run_dir, _ = tiny_run
    # a project folder that holds folders of a run's names
    proj = tmp_path / "proj"
    for rel in ("card/notes.md", "train/all/mine.txt", "eval/all/keep.json"):
        (proj / rel).parent.mkdir(parents=True)
        (proj / rel).write_text("mine")
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(proj)])
    assert r.exit_code == 2, r.output
    assert f"run folder {proj}: not empty and holds no run.json of a layercard run" in " ".join(
        r.output.split()
    )
    assert sorted(p.name for p in proj.rglob("*") if p.is_file()) == ["keep.json", "mine.txt", "notes.md"]
    assert not (proj / "run.json").exists()
    # nor a folder inside a run
    with pytest.raises(LayercardError, match=re.escape(f"lies inside the run folder {run_dir.resolve()}")):
        run_pipeline(load_config(cfg_path), run_dir / "train" / "again", progress=False)
    assert not (run_dir / "train" / "again").exists()
    # inside a run, a stage folder without its record holds someone else's files: refused, kept
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "train/all/stage.json").unlink()
    (copy / "train/all/mine.txt").write_text("mine")
    with pytest.raises(
        LayercardError, match=re.escape(f"{copy / 'train' / 'all'}: holds files but no stage")
    ):
        run_pipeline(load_config(cfg_path), copy, progress=False)
    assert (copy / "train/all/mine.txt").read_text() == "mine"
    assert (copy / "train/all/adapter/adapter_model.safetensors").is_file()
    # an empty folder is a new run's
    (tmp_path / "empty").mkdir()
    done = run_pipeline(load_config(cfg_path), tmp_path / "empty", progress=False, until="card")
    assert done["ran"] == ["card"]


def test_dtype_device_and_tokenizer_are_inputs_of_every_stage_that_reads_text(tiny_run, tmp_path):
    from layercard.models import resolve_device

    cfg_path, run_dir, _ = tiny_run
    device = resolve_device("auto").type  # the config's device: auto
    for stage in ("card", "train/all", "trim", "eval/base", "eval/all"):
        inputs = json.loads((run_dir / stage / "stage.json").read_text())["inputs"]
        assert inputs["dtype"] == "float32" and inputs["device"] == device, stage
        assert len(inputs["tokenizer"]) == 64 and len(inputs["config"]) == 64, stage
    assert json.loads((run_dir / "run.json").read_text())["inputs"]["device"] == device
    # the same weights with another chat template: the card reads other prompts
    model = tmp_path / "model"
    shutil.copytree(make_model_dir(cfg_path.parent), model)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    moved = load_config(cfg_path, [f"model={model}"])
    assert run_pipeline(moved, copy, progress=False, until="card")["skipped"] == ["card"]
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("'<|user|>'", "'<|user|> '"))
    assert run_pipeline(moved, copy, progress=False, until="card")["ran"] == ["card"]
    # the same weights under another architecture setting compute otherwise
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert run_pipeline(moved, copy, progress=False, until="card")["ran"] == ["card"]
    # and another dtype
    wider = load_config(cfg_path, [f"model={model}", "dtype=bfloat16"])
    assert run_pipeline(wider, copy, progress=False, until="card")["ran"] == ["card"]
    assert json.loads((copy / "card/stage.json").read_text())["inputs"]["dtype"] == "bfloat16"


def test_an_eval_task_without_a_split_is_held_out(tmp_path):
    from layercard.pipeline.stages import Runner

    base = tiny_config(tmp_path)

    def runner(task: Any) -> Runner:
        return Runner(parse_config({**base, "task": task}, source="c.yaml"), tmp_path / "r", progress=False,
                      on_stage=None)  # fmt: skip

    r = runner({"train": "synthetic:facts", "eval": "synthetic:facts"})
    assert (r.train_task.split, r.eval_task.split) == ("train", "test") and r.trim_task.split == "test"
    r = runner({"train": "synthetic:facts:train", "eval": "synthetic:facts"})
    assert r.eval_task.split == "test"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(8)))
    copy = tmp_path / "held_out.jsonl"  # the same records under another name: ids made from it differ
    copy.write_text(data.read_text().replace("\n", "\r\n"))
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps({"input": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(6, 12)))
    r = runner({"train": str(data), "eval": str(part)})
    assert r.eval_shared == 2
    msg = "the run would evaluate on its training examples"
    for task in (
        {"train": str(data), "eval": str(data)},
        {"train": str(data), "eval": str(copy)},
        {"train": "synthetic:facts", "eval_split": "train"},
        {"train": "synthetic:facts", "eval": "synthetic:facts:train"},
    ):
        with pytest.raises(LayercardError, match=msg) as e:
            runner(task)
        assert str(e.value).startswith("c.yaml: task.eval: ") and "\n" not in str(e.value)
    cfg = write_config(tmp_path, {**base, "task": {"train": str(data), "eval": str(data)}})
    r = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and msg in " ".join(r.output.split()) and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- config validation


def _error(raw: dict[str, Any], source: str = "config.yaml") -> str:
    with pytest.raises(LayercardError) as e:
        parse_config(raw, source=source)
    return str(e.value)


def test_config_errors_name_the_key(tmp_path):
    base = tiny_config(tmp_path / "model")
    bad_steps = apply_overrides(base, ["train.steps=-3"])
    assert _error(bad_steps) == "config.yaml: train.steps: must be a positive integer, got -3"
    msg = _error(apply_overrides(base, ["train.stpes=3"]))
    assert msg.startswith("config.yaml: train.stpes: unknown key (did you mean steps?)")
    msg = _error(apply_overrides(base, ["placements.all.policy=everything"]))
    assert msg.startswith("config.yaml: placements[all].policy: must be one of recommend, ")
    assert "got 'everything'" in msg
    assert _error({**base, "colour": 1}).startswith("config.yaml: colour: unknown key")
    # YAML's unquoted on / no are booleans: the message says to quote them
    assert _error({**base, "task": {**base["task"], "eval_split": False}}) == (
        "config.yaml: task.eval_split: must be a non-empty string, got False (YAML reads an unquoted off or "
        "no as false: quote it)"
    )
    assert "(YAML reads an unquoted on, off, yes or no as true: quote it)" in _error(
        {**base, "train": {"scheduler": True}}
    )
    assert _error(apply_overrides(base, ["card.coupling=maybe"])) == (
        "config.yaml: card.coupling: must be true or false, got 'maybe'"
    )
    assert "placements[card-2].budget" in _error(apply_overrides(base, ["placements.0.budget=rooms=3"]))
    assert "placements[card-2].budget: policy card needs a budget" in _error(
        apply_overrides(base, ["placements.0.budget=null"])
    )
    dup = apply_overrides(base, ["placements.1.name=card-2"])
    assert "name 'card-2' is used twice" in _error(dup)
    assert "trim.placement: 'nope' is not a placement" in _error(
        apply_overrides(base, ["trim.placement=nope"])
    )
    assert "task: required key" in _error({k: v for k, v in base.items() if k != "task"})
    assert _error({**base, "train": None}) == (
        "config.yaml: train: is empty (null): leave the section out for its defaults, or give keys"
    )
    assert "eval.metrics: unknown metric 'accuracy'" in _error(
        apply_overrides(base, ["eval.metrics=accuracy"])
    )
    # YAML flow mappings split `roles: q,v` at the comma; the error says how to write it
    flow = yaml.safe_load("{roles: q,v, examples: 8}")
    assert "write roles: 'q,v'" in _error({**base, "card": flow})


def test_placement_names_that_would_collide_are_refused(tmp_path):
    base = tiny_config(tmp_path)
    assert "'all-trimmed' ends in -trimmed" in _error(
        apply_overrides(base, ["placements.0.name=all-trimmed"])
    )
    assert "'card-2-Trimmed' ends in -trimmed" in _error(
        apply_overrides(base, ["placements.0.name=card-2-Trimmed"])
    )
    assert "'Base' is reserved" in _error(apply_overrides(base, ["placements.0.name=Base"]))
    assert _error(apply_overrides(base, ["placements.0.name=ALL"])) == (
        "config.yaml: placements: names 'ALL' and 'all' differ only in case; names must be unique"
    )


def test_set_reads_text_settings_as_text(tmp_path):
    base = tiny_config(tmp_path)

    def task(*sets: str) -> Any:
        return parse_config(apply_overrides(base, list(sets))).task

    assert task("task.prompt={input}").prompt == "{input}"
    assert task("task.system=You are: terse").system == "You are: terse"
    assert task("task.prompt=#{input}").prompt == "#{input}"
    assert task("task.prompt=@p.txt").prompt == "@p.txt"
    assert task("task.prompt='Q: {input}'").prompt == "Q: {input}"
    assert task("task.prompt={input}", "task.prompt=null").prompt is None
    assert task("task.eval_split=2024").eval_split == "2024"
    assert task("task.fields={input: q, target: a}").fields == "input=q,target=a"  # a mapping as ever
    with pytest.raises(LayercardError, match="not valid YAML"):
        apply_overrides(base, ["train.steps=[1"])  # other settings are typed by YAML as before
    # the shorthand `task: NAME` takes the keys of the mapping it stands for
    short = apply_overrides({**base, "task": "synthetic:facts"}, ["task.eval_split=test"])
    assert short["task"] == {"train": "synthetic:facts", "eval_split": "test"}
    # `trim: false` stays off when one of its keys is set
    off = apply_overrides({**base, "trim": False}, ["trim.radius=2"])
    assert parse_config(off).trim.enabled is False and parse_config(off).trim.config.radius == 2
    assert parse_config(apply_overrides(off, ["trim.enabled=true"])).trim.enabled


def test_config_values_typed_and_defaults_filled(tmp_path):
    cfg = parse_config(tiny_config(tmp_path), source="c.yaml")
    assert cfg.train.lr == 1e-3  # "1e-3" is a string to PyYAML; numbers in strings are accepted
    assert cfg.card.seed == cfg.train.seed == cfg.eval.seed == cfg.placements[0].plan.seed == 0
    assert cfg.to_dict()["card"]["coupling"] is True
    over = load_config(write_config(tmp_path, tiny_config(tmp_path)), ["train.steps=10", "card.roles=[q, k]"])
    assert over.train.steps == 10 and over.card.roles == "q,k"
    # a layer window A:B as written, in the file and with --set (YAML 1.1 would read 1:2 as 62)
    windowed = tiny_config(tmp_path)
    windowed["trim"]["window"] = "1:2"
    text = yaml.safe_dump(windowed).replace("window: '1:2'", "window: 1:2")
    assert "window: 1:2\n" in text
    (tmp_path / "w.yaml").write_text(text)
    assert load_config(tmp_path / "w.yaml").trim.config.window == (1, 2)
    assert load_config(
        write_config(tmp_path, tiny_config(tmp_path)), ["trim.window=2:3"]
    ).trim.config.window == (2, 3)
    with pytest.raises(LayercardError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(LayercardError, match=r"placements\.x: no such list entry"):
        apply_overrides(tiny_config(tmp_path), ["placements.x.rank=2"])
    no_steps = tiny_config(tmp_path)
    del no_steps["train"]["steps"]
    epochs = parse_config(apply_overrides(no_steps, ["train.epochs=0.5"]))
    assert epochs.train.steps is None and epochs.train.epochs == 0.5


def test_a_spectrum_placement_turns_the_weight_snr_on(tmp_path):
    base = tiny_config(tmp_path)
    assert not parse_config(base).card.weight_snr  # nothing reads it: not measured
    to_spectrum = ["placements.0.policy=spectrum", "placements.0.budget=params=0.25x"]
    # the card policy's score does not carry over: spectrum ranks by weight_snr
    assert "placements[card-2].score: policy spectrum scores units by weight_snr" in _error(
        apply_overrides(base, to_spectrum)
    )
    spectrum = apply_overrides(base, [*to_spectrum, "placements.0.score=null"])
    assert parse_config(spectrum).card.weight_snr
    off = apply_overrides(spectrum, ["card.weight_snr=false"])
    assert _error(off) == (
        "config.yaml: card.weight_snr: is false, but placement 'card-2' uses policy spectrum, which reads it"
    )


def test_the_card_calibrates_with_the_placements_dropout(tmp_path):
    base = tiny_config(tmp_path)
    assert parse_config(base).card.calibrate_dropout == 0.0
    every = [f"placements.{i}.dropout=0.05" for i in range(len(base["placements"]))]
    assert parse_config(apply_overrides(base, every)).card.calibrate_dropout == 0.05
    # placements of different dropouts: the card keeps its own, and the plans of another say so
    assert parse_config(apply_overrides(base, every[:1])).card.calibrate_dropout == 0.0
    # the config's own value wins
    own = apply_overrides(base, [*every, "card.calibrate_dropout=0.1"])
    assert parse_config(own).card.calibrate_dropout == 0.1


def test_demo_config_is_packaged_and_valid():
    cfg = load_config(demo_config_path())
    assert cfg.model == "smollm2" and [p.name for p in cfg.placements] == [
        "recommend",
        "peft-default",
        "all-linear",
        "reference",
    ]
    budgets = [str(p.plan.budget) for p in cfg.placements]
    assert budgets == ["params=0.2x"] * 3 + ["None"]  # both rules fitted to the recommendation's budget
    assert cfg.card.roles == "all-linear" and cfg.card.calibrate and not cfg.trim.enabled


def test_reference_config_lists_every_key_with_its_default():
    """configs/reference.yaml documents each key at its default: it must parse to the defaults exactly."""
    ref = load_config(demo_config_path().with_name("reference.yaml")).to_dict()
    minimal = {"task": "synthetic:facts", "placements": [{"name": "all", "policy": "all"}]}
    assert ref == parse_config(minimal).to_dict()
    text = demo_config_path().with_name("reference.yaml").read_text()
    raw = yaml.safe_load(text)
    # keys a run sets for itself when left out are there, commented out
    left_out = set(re.findall(r"^  # (\w+): ", text, re.M))
    assert left_out == {"calibrate_dropout", "calibrate_checkpointing", "weight_snr", "steps"}
    for section in ("card", "train", "trim", "eval"):
        listed = set(raw[section]) | (left_out & set(ref[section]))
        assert listed == set(ref[section]), section  # no key missing from the reference
    # so that --set of the key they go with does not conflict with a pinned value
    spectrum = ["placements.all.policy=spectrum", "placements.all.budget=params=0.25x"]
    assert load_config(demo_config_path().with_name("reference.yaml"), spectrum).card.weight_snr
    dropout = load_config(demo_config_path().with_name("reference.yaml"), ["placements.all.dropout=0.1"])
    assert dropout.card.calibrate_dropout == 0.1
    epochs = load_config(demo_config_path().with_name("reference.yaml"), ["train.epochs=2"]).train
    assert (epochs.steps, epochs.epochs) == (None, 2)


def test_reference_config_is_the_rendered_schema():
    """The file is generated from the stage settings, so its keys, defaults and help cannot drift."""
    from layercard.config.run import reference_yaml

    text = demo_config_path().with_name("reference.yaml").read_text()
    assert text == reference_yaml()
    # the help a stage command shares says here what the run does
    trim = text.split("\ntrim:")[1].split("\neval:")[0]
    examples = re.search(r"^  examples: .*$", trim, re.M).group(0)
    assert "chosen on the examples evaluated" in examples and "held-out" not in examples
    eval_split = re.search(r"^  eval_split: .*$", text, re.M).group(0)
    assert "task.eval named without a split" in eval_split and "never the training data" in eval_split


def test_every_setting_has_help_and_a_valid_default():
    import dataclasses

    from layercard.config import CardConfig, EvalConfig, PlanConfig, TraceConfig, TrainConfig, TrimConfig
    from layercard.config.schema import check, spec_of

    for schema in (CardConfig, EvalConfig, PlanConfig, TraceConfig, TrainConfig, TrimConfig):
        for f in schema.settings():
            spec = spec_of(f)
            assert spec.help.strip(), f"{schema.__name__}.{f.name} has no help"
            if f.default is not dataclasses.MISSING:
                check(f"{schema.SECTION}.{f.name}", spec, f.default)  # a default passes its own check


def test_config_error_writes_nothing(tmp_path):
    cfg = write_config(tmp_path, apply_overrides(tiny_config(tmp_path), ["train.steps=-3"]))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out)])
    assert r.exit_code == 2
    assert f"{cfg}: train.steps: must be a positive integer, got -3" in r.output
    assert not out.exists()
    r = CliRunner().invoke(
        app, ["run", str(cfg), "--set", "train.steps=2", "--set", "task.train=nope", "--out", str(out)]
    )
    assert r.exit_code == 2 and "task.train: unknown task 'nope'" in r.output
    assert not out.exists()
    r = CliRunner().invoke(
        app,
        ["run", str(cfg), "--set", "train.steps=2", "--set", f"model={tmp_path / 'none'}", "--out", str(out)],
    )
    said = f"--set 'model={tmp_path / 'none'}': model: model '{tmp_path / 'none'}': not a built-in"
    assert r.exit_code == 2 and said in r.output
    assert not out.exists()


# ---------------------------------------------------------------- CLI


def test_cli_run_json_and_tables(tiny_run, tmp_path):
    cfg_path, copy = copied(tiny_run, tmp_path)
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(copy), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ran"] == ["report"] and Path(d["report"]["html"]).is_file()  # in a copy: it names the copy
    assert [row["name"] for row in d["rows"]] == ["base", "card-2", "all", "all-trimmed"]
    # what --until plan is for, a run's costs before training, is in its JSON too
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(copy), "--until", "plan", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    row = next(x for x in d["rows"] if x["name"] == "all")
    assert row["predicted_s_per_step"] > 0 and row["predicted_peak_memory_mib"] > 0 and d["train_steps"] == 3
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(copy), "--set", "eval.batch_size=2"])
    assert r.exit_code == 0, r.output
    assert "eval:all · ran" in r.output and "card: skipped (inputs unchanged)" in r.output
    assert "comparison" in r.output and "report:" in r.output
    # in an 80-column terminal the comparison keeps every number whole, at the report's formats
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(copy)], env={"COLUMNS": "80"})
    table = r.stdout[r.stdout.index("comparison") : r.stdout.index("report:")]
    assert "…" not in table, table  # rich fits the width itself: a number cut would show as …
    base = json.loads((copy / "summary.json").read_text())["rows"][0]
    assert f"{base['eval_loss']:.4f}" in table, table
    r = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(copy), "--set", "train.lr=0.002"])
    assert r.exit_code == 0, r.output
    # the retrained placement's summary: its steps' spread, and its peak beside the plan's
    m = json.loads((copy / "train" / "all" / "train_metrics.json").read_text())
    spread = m["s_per_step_spread"]
    assert f"{m['s_per_step']:.3f} ({spread['p10']:.3f}–{spread['p90']:.3f})" in r.output
    peak = m["predicted_peak_memory_scaled_mib"] or m["predicted_peak_memory_mib"]
    assert f"{m['peak_memory_mib']:,.0f} / {peak:,.0f} MiB" in r.output


def test_demo_command_runs_the_packaged_config(tmp_path, monkeypatch):
    """`demo` runs the packaged demo.yaml once per built-in task; here shrunk onto the tiny model."""
    import layercard.plan.figures as plan_figures
    from layercard.report.figures import palette

    drawn: list[tuple[dict, dict]] = []  # each frontier figure's measured points and colours
    plot = plan_figures.plot_frontier
    monkeypatch.setattr(
        plan_figures,
        "plot_frontier",
        lambda plan, path, measured=None, colors=None: (
            drawn.append((measured, colors)) or plot(plan, path, measured, colors)
        ),
    )
    # a plan made inside the run names its settings as its placement's keys, not as flags
    import layercard.plan as plan_pkg
    from layercard.errors import setting_name

    named: list[str] = []
    make = plan_pkg.make_plan
    monkeypatch.setattr(
        plan_pkg, "make_plan", lambda *a, **k: named.append(setting_name("depth")) or make(*a, **k)
    )
    model = make_model_dir(tmp_path)
    sets = [
        f"model={model}",
        "card.examples=8",
        "card.max_length=64",
        "train.steps=2",
        "train.max_length=64",
        "train.eval_examples=4",
        "train.checkpoint_every=0",
        "eval.examples=4",
        "eval.max_new_tokens=4",
    ]
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--json"]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d["tasks"]) == {"facts", "format"}
    for task, head in d["tasks"].items():
        rows = {row["name"]: row for row in head["rows"]}
        assert list(rows) == ["base", "recommend", "peft-default", "all-linear", "reference"]
        assert head["ran"][-1] == "report" and Path(head["report"]["html"]).is_file()
        assert rows["reference"]["measured_fraction"] == pytest.approx(1.0)
        # the frontier figure draws no measured point for the reference, 1 by definition, and each
        # placement in the colour the report's other figures give it
        measured, colors = drawn.pop(0)
        assert "reference" not in measured and colors == palette(list(rows))
        # the recommendation's adapter says what its plan predicted
        readme = (out / task / "train" / "recommend" / "adapter" / "README.md").read_text()
        predicted = json.loads((out / task / "train" / "recommend" / "train_metrics.json").read_text())
        assert f"| predicted quality | {predicted['predicted_quality']:.2f} of the reference" in readme
        # each measured fraction carries its sampling error over the evaluated examples
        evals = {n: EvalResult.load(RunLayout(out / task).eval_json(n)) for n in rows}
        sums = {n: ev.example_loss_sums for n, ev in evals.items()}
        assert rows["reference"]["measured_fraction_se"] is None  # 1 by definition
        for n in ("recommend", "peft-default", "all-linear"):
            if rows[n]["measured_fraction"] is not None:
                want = fraction_standard_error(sums["base"], sums["reference"], sums[n])
                assert rows[n]["measured_fraction_se"] == pytest.approx(want) and want > 0
        # the recommendation against each rule: the difference of fractions and its paired error
        rec_f = rows["recommend"]["measured_fraction"]
        for n in ("peft-default", "all-linear"):
            lead, se = rows[n]["measured_lead_of_recommend"], rows[n]["measured_lead_se"]
            if rec_f is None or rows[n]["measured_fraction"] is None:
                assert lead is None
                continue
            assert lead == pytest.approx(rec_f - rows[n]["measured_fraction"])
            want = difference_standard_error(sums["base"], sums["reference"], sums["recommend"], sums[n])
            assert se == pytest.approx(want)
        assert rows["recommend"]["measured_lead_of_recommend"] is None
        assert rows["reference"]["measured_lead_of_recommend"] is None
        summary = json.loads(Path(head["summary"]).read_text())
        assert summary["reference"] == "reference" and summary["recommendation"]["placement"] == "recommend"
        html = (out / task / "report.html").read_text()
        # the report opens with the recommendation, before the headline table
        assert html.index("Recommendation") < html.index("Headline")
        assert summary["recommendation"]["sentence"].split(":")[0] in html
        # each search placement's quality, measured / predicted ± its expected error; the reference's is 1
        report = (out / task / "report.md").read_text()
        measured = r"-?\d\.\d\d(?: ± \d\.\d\d)?|—"
        assert len(re.findall(rf"\| (?:{measured}) / \d\.\d\d ± 0\.\d\d \|", report)) == 3
        assert report.count("| 1 by definition |") == 1 and "the two ± differ" in report
    names = [f"placements[{n}].depth" for n in ("recommend", "peft-default", "all-linear", "reference")]
    assert named == names * 2
    overview = (out / "demo.md").read_text()
    assert overview == Path(d["overview"]).read_text()
    assert overview.count("Recommendation:") == 2 and "## facts" in overview and "## format" in overview
    from layercard.artifacts import machine_info
    from layercard.progress import count

    threads = json.loads((out / "facts" / "summary.json").read_text())["threads"]
    here = machine_info()  # the steps and peaks above were measured on this machine, at the run's threads
    cpu = here.get("cpu_model") or here["processor"]  # the processor's model where the system names it
    on = f"Measured on {cpu} with {here['cpu_count']} CPUs, {count(threads, 'torch thread')}."
    assert on in overview


def test_switching_trim_off_reruns_only_the_report(tiny_run, tmp_path):
    cfg_path, copy = copied(tiny_run, tmp_path)
    summary = run_pipeline(load_config(cfg_path, ["trim=false"]), copy, progress=False)
    assert summary["ran"] == ["report"]
    assert [r["name"] for r in summary["rows"]] == ["base", "card-2", "all"]
    text = (copy / "report.html").read_text()
    assert "Trimming was not run" in text and "all-trimmed" not in text


# ---------------------------------------------------------------- run folder layout and module order


def test_run_layout_names_match_the_stages():
    """run_layout repeats the file names the stages write (it imports none of them): they must agree."""
    from layercard import evaluate, run_layout, train, trim

    assert run_layout.TRAIN_METRICS_FILE == train.METRICS_FILE
    assert run_layout.ADAPTER_DIR == train.ADAPTER_DIR
    assert run_layout.TRIM_FILE == trim.TRIM_FILE
    assert run_layout.TRACE_FILE == trim.TRACE_FILE
    assert run_layout.TRIMMED_ADAPTER_DIR == trim.TRIMMED_DIR
    assert run_layout.EVAL_FILE == evaluate.EVAL_FILE


def test_report_does_not_import_the_pipeline():
    """The pipeline runs the report; the report reads the run folder through run_layout only."""
    import subprocess
    import sys

    code = (
        "import sys, layercard.report, layercard.run_layout\n"
        "bad = sorted(m for m in sys.modules if m.startswith('layercard.pipeline'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_auto_threads_take_the_idle_cores(monkeypatch):
    import os

    import torch

    from layercard.pipeline import run as R

    cores, default = os.cpu_count() or 1, torch.get_num_threads()
    monkeypatch.setattr(R, "_busy_cores", lambda: float(cores))  # every core busy elsewhere
    assert R.choose_threads("auto") == 1
    monkeypatch.setattr(R, "_busy_cores", lambda: 0.0)
    assert R.choose_threads("auto") == min(default, cores)
    assert R.choose_threads(3) == 3
    # without /proc/stat the 1-minute load average stands in
    monkeypatch.setattr(R, "_busy_cores", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    assert R.choose_threads("auto") == 1


def test_a_plans_warnings_go_to_stderr_with_its_stage(capsys):
    """A run's stage tables are its results, on stdout; a plan's warnings go to stderr, as every standalone
    command's do, each naming the stage it came from."""
    from layercard.cli.run import _on_stage
    from layercard.pipeline.stages import StageResult

    rows = [("placement", "mlp · 0–29 · r2"), ("warning", "quality model: the default")]
    _on_stage("end", "plan:top", StageResult("plan:top", "ran", 0.5, "plan/top", "f", rows))
    out, err = capsys.readouterr()
    assert "mlp · 0–29 · r2" in out and "quality model" not in out
    assert "warning: plan:top: quality model: the default" in " ".join(err.split())
