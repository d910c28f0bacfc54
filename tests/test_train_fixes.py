"""Training's edges: finishing and resuming a run, damaged checkpoints, what the adapter README and the
metrics say was trained, plan settings training reads, divergence and mixed precision in one process."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_train import FAST, TRAIN, VAL, _loaded, make_plan, plan_dict

from layercard.errors import LayercardError
from layercard.plan import Plan
from layercard.train import TrainConfig, train
from layercard.train.checkpoints import check_resumable, latest_checkpoint, save_checkpoint
from layercard.train.readme import _placement, trimmed_readme

CKPT = {**FAST, "checkpoint_every": 2}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _killed_before_the_adapter(out: Path) -> None:
    """What a run killed after its last checkpoint, before it wrote its adapter, leaves."""
    shutil.rmtree(out / "adapter")
    (out / "train_metrics.json").unlink()


@pytest.fixture
def checkpointed(tmp_path: Path) -> tuple[Path, TrainConfig, dict[str, Any]]:
    """A 4-step run of the tiny llama with checkpoints at steps 2 and 4, killed before its adapter."""
    cfg = TrainConfig(steps=4, **CKPT)
    loaded = _loaded()
    out = tmp_path / "run"
    metrics = train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, cfg, out, progress=False)
    _killed_before_the_adapter(out)
    return out, cfg, metrics


def _resume(out: Path, cfg: TrainConfig, **kw: Any) -> dict[str, Any]:
    loaded = kw.pop("loaded", None) or _loaded()
    val = kw.pop("val", VAL)
    return train(loaded, make_plan(loaded, [1, 2]), TRAIN, val, cfg, out, resume=True, progress=False, **kw)


# ---------------------------------------------------------------------------------------------------------
# Finishing a run whose last step is checkpointed; resuming past it
# ---------------------------------------------------------------------------------------------------------


def test_a_run_checkpointed_at_its_last_step_keeps_what_its_training_measured(checkpointed, monkeypatch):
    import layercard.train.loop as loop

    out, cfg, first = checkpointed
    saved = json.loads((out / "checkpoints" / "step-4" / "state.json").read_text())["memory"]
    assert saved["steps"] == [1, 4] and saved["peak_mib"] > 0
    # this session's own peak, were it taken: a session that trains no step must not record it
    monkeypatch.setattr(loop, "peak_memory", lambda _device: (1.0, "process_peak_rss"))
    m = _resume(out, cfg)
    assert m["resumed_from"] == 4 and m["steps"] == 4 and m["peak_memory_steps"] == [1, 4]
    assert m["peak_memory_mib"] == saved["peak_mib"] and m["peak_memory_start_mib"] == round(
        saved["start_mib"], 1
    )
    for key in ("loss_curve", "val_curve", "s_per_step", "s_per_step_spread", "tokens_seen"):
        assert m[key] == first[key], key
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_last_step_checkpoint_without_its_peak_is_refused(checkpointed):
    out, cfg, _ = checkpointed
    state_file = out / "checkpoints" / "step-4" / "state.json"
    state = json.loads(state_file.read_text())
    del state["memory"]  # as checkpoints were written before they kept one
    state_file.write_text(json.dumps(state))
    with pytest.raises(LayercardError, match="step-4: the run's last step is checkpointed, but") as e:
        _resume(out, cfg)
    assert "\n" not in str(e.value)
    assert not (out / "adapter").exists() and not (out / "train_metrics.json").exists()


def test_a_resumed_session_that_trains_records_its_own_peak(checkpointed):
    out, cfg, _ = checkpointed
    m = _resume(out, dataclasses.replace(cfg, steps=5))  # a constant schedule may go on
    assert m["resumed_from"] == 4 and m["peak_memory_steps"] == [5, 5]


def test_resuming_past_the_runs_steps_is_refused(tmp_path: Path):
    cfg = TrainConfig(steps=4, **CKPT)
    loaded = _loaded()
    out = tmp_path / "run"
    train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, cfg, out, progress=False)
    written = _files(out)
    with pytest.raises(LayercardError, match=r"step-4: cannot resume: the checkpoint is at step 4, past this "
                       r"run's 3 steps; give 4 steps or more") as e:  # fmt: skip
        _resume(out, dataclasses.replace(cfg, steps=3))
    assert "\n" not in str(e.value)
    assert _files(out) == written  # the finished adapter and its metrics stay


# ---------------------------------------------------------------------------------------------------------
# Settings a resume may not change
# ---------------------------------------------------------------------------------------------------------


def test_a_resume_refuses_another_validation_set(checkpointed):
    out, cfg, _ = checkpointed
    more = dataclasses.replace(cfg, steps=6)
    with pytest.raises(LayercardError, match=r"val_data was '4 examples, sha256 \w+', now '2 examples"):
        _resume(out, dataclasses.replace(more, eval_examples=2))
    other = TRAIN.subset(8, seed=3)
    with pytest.raises(LayercardError, match=r"val_data was '4 examples, sha256 (\w+)', now '4 examples"):
        _resume(out, more, val=other)
    with pytest.raises(LayercardError, match=r"val_data was '4 examples, sha256 \w+', now 'none'"):
        _resume(out, more, val=None)


def test_a_resume_refuses_other_base_weights_dtype(checkpointed):
    out, cfg, _ = checkpointed
    loaded = _loaded()
    half = dataclasses.replace(loaded, model=loaded.model.to(torch.bfloat16))  # the same weights' hash
    with pytest.raises(LayercardError, match="weights_dtype was 'float32', now 'bfloat16'"):
        _resume(out, dataclasses.replace(cfg, steps=6), loaded=half)


def test_a_resume_compares_load_in_4bit_where_the_checkpoint_records_it(checkpointed):
    out, _, _ = checkpointed
    ckpt = latest_checkpoint(out)
    fingerprint = json.loads((ckpt / "state.json").read_text())["fingerprint"]
    assert fingerprint["load_in_4bit"] is False
    with pytest.raises(LayercardError, match="cannot resume: load_in_4bit was False, now True"):
        check_resumable(ckpt, {**fingerprint, "load_in_4bit": True})
    # a checkpoint written before these were fingerprinted says nothing of them: not compared
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("load_in_4bit", "weights_dtype", "val_data"):
        del state["fingerprint"][key]
    (ckpt / "state.json").write_text(json.dumps(state))
    check_resumable(ckpt, {**fingerprint, "load_in_4bit": True, "val_data": "none"})


def test_a_checkpoint_from_before_init_was_recorded_resumes_only_a_default_init(checkpointed):
    """A fingerprint written before ``init`` was recorded meant the default init by its absence: a resume
    with EVA is refused as a change of init, one with the default goes on."""
    out, _, _ = checkpointed
    ckpt = latest_checkpoint(out)
    state = json.loads((ckpt / "state.json").read_text())
    fingerprint = dict(state["fingerprint"])
    assert fingerprint["init"] == "default"
    del state["fingerprint"]["init"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(LayercardError, match="cannot resume: init was 'default', now 'eva'"):
        check_resumable(ckpt, {**fingerprint, "init": "eva"})
    assert check_resumable(ckpt, fingerprint)["step"] == 4


# ---------------------------------------------------------------------------------------------------------
# Which checkpoints are the newest and are kept
# ---------------------------------------------------------------------------------------------------------


def test_checkpoints_are_ordered_by_step_number_not_by_folder_name(tmp_path: Path):
    """step-10 is newer than step-9 though its name sorts first; a save keeps the two highest steps."""
    for step in (9, 10):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-10"
    out = tmp_path / "run"
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for step in (8, 10, 12):
        save_checkpoint(out, step, {"w": weight}, optimizer, scheduler, {"step": step})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-12"]
    assert latest_checkpoint(out) == out / "checkpoints" / "step-12"


# ---------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------------------


def _damage_state(text: str):
    return lambda ckpt: (ckpt / "state.json").write_text(text)


def _edit_state(edit):
    def damage(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        edit(state)
        (ckpt / "state.json").write_text(json.dumps(state))

    return damage


def _truncate(name: str):
    def damage(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:100])

    return damage


@pytest.mark.parametrize(
    ("damage", "file", "says"),
    [
        (_damage_state("{bad"), "state.json", "JSONDecodeError"),
        (_damage_state("[1, 2]"), "state.json", "state: must be a mapping"),
        (_edit_state(lambda s: s.update(step="four")), "state.json", "step: must be an integer"),
        (_edit_state(lambda s: s.pop("loss_curve")), "state.json", "loss_curve: missing"),
        (_edit_state(lambda s: s.update(step=3)), "state.json", "must be the step its folder step-4 names"),
        (_edit_state(lambda s: s.update(memory={"peak_mib": "x"})), "state.json", "memory.peak_mib"),
        (_truncate("trainable.safetensors"), "trainable.safetensors", "SafetensorError"),
        (lambda c: (c / "trainable.safetensors").unlink(), "trainable.safetensors", "damaged checkpoint"),
        (_truncate("trainer_state.pt"), "trainer_state.pt", "damaged checkpoint"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_its_file(checkpointed, damage, file: str, says: str):
    out, cfg, _ = checkpointed
    damage(out / "checkpoints" / "step-4")
    with pytest.raises(LayercardError) as e:
        _resume(out, dataclasses.replace(cfg, steps=6))
    text = str(e.value)
    assert text.startswith(str(out / "checkpoints" / "step-4" / file)) and says in text, text
    assert "\n" not in text and "damaged checkpoint" in text
    assert not (out / "adapter").exists() and not (out / "train_metrics.json").exists()


def test_a_damaged_checkpoint_of_an_eva_run_names_its_file(tmp_path: Path):
    cfg = TrainConfig(steps=2, init="eva", **{**CKPT, "eval_examples": 0})
    loaded = _loaded()
    out = tmp_path / "run"
    train(loaded, make_plan(loaded, [1, 2]), TRAIN, None, cfg, out, progress=False)
    _killed_before_the_adapter(out)
    _truncate("trainable.safetensors")(out / "checkpoints" / "step-2")
    with pytest.raises(
        LayercardError, match=r"step-2/trainable.safetensors: damaged checkpoint \(Safetensor"
    ):
        _resume(out, dataclasses.replace(cfg, steps=3), val=None)


# ---------------------------------------------------------------------------------------------------------
# The first and last losses; what the README and the metrics say was trained
# ---------------------------------------------------------------------------------------------------------


def test_the_first_and_last_losses_are_those_steps_whatever_log_every(tmp_path: Path):
    losses: dict[int, float] = {}
    loaded = _loaded()
    cfg = TrainConfig(steps=7, log_every=3, **{**FAST, "eval_examples": 0})

    def callback(step: int, loss: float, _model: torch.nn.Module) -> None:
        losses[step] = loss

    m = train(loaded, make_plan(loaded, [1]), TRAIN, None, cfg, tmp_path, progress=False, callback=callback)
    assert [s for s, _ in m["loss_curve"]] == [1, 3, 6, 7]
    assert m["first_train_loss"] == losses[1] and m["final_train_loss"] == losses[7]
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert f"{losses[1]:.4f} at the first step, {losses[7]:.4f} at the last" in readme


def test_a_bottleneck_adapter_on_a_lora_plan_is_described_as_trained(tmp_path: Path):
    loaded = _loaded()
    cfg = TrainConfig(steps=1, bottleneck=3, **{**FAST, "eval_examples": 0})
    m = train(loaded, make_plan(loaded, [1, 2]), TRAIN, None, cfg, tmp_path, kind="houlsby", progress=False)
    readme = (tmp_path / "adapter" / "README.md").read_text()
    front = readme.split("\n---\n", 1)[0]
    assert "library_name: peft" not in front and "- lora" not in front
    assert "- houlsby" in front and "- layercard" in front
    assert "# Houlsby bottleneck adapter for tiny-llama-0" in readme
    assert "houlsby bottleneck adapters of width 3 on layers 1–2 (2 layers)" in readme
    assert "LoRA" not in readme and "lora_alpha" not in readme
    # the plan's placement stays the plan's, labelled so; what was trained is beside it
    assert m["plan"]["kind"] == "lora" and m["plan"]["units"] == ["1.q", "1.v", "2.q", "2.v"]
    assert m["plan"]["bottleneck"] is None
    assert m["adapted"] == {
        "kind": "houlsby", "layers": [1, 2], "modules": 4, "ranks": None, "lora_alpha": None, "bottleneck": 3,
    }  # fmt: skip
    # a trimmed bottleneck adapter is no PEFT adapter either
    kw = dict(model_id="m", base_source="/x", parent_readme=readme, keep_upto=1, kept_layers=[1])
    row = {"n_adapted_layers": 2, "adapted_modules": 4, "s_per_example": 0.1, "loss": 1.0, "metrics": {}}
    trimmed = trimmed_readme(
        **kw, parent=str(tmp_path / "adapter"), metric="loss", before=row, after=row, examples="2",
        adapter_dir=str(tmp_path / "trimmed"),
    )  # fmt: skip
    assert "library_name: peft" not in trimmed.split("\n---\n", 1)[0] and "- houlsby" in trimmed
    # the trimmed figure was measured on the examples the boundary was chosen on, and says so
    assert "The boundary was chosen on these same examples" in trimmed


def test_a_lora_readme_and_metrics_say_what_was_trained():
    loaded = _loaded()
    plan = make_plan(loaded, [1, 2])
    names = [u.name for u in plan.units]
    ranks = dict(zip(names, [2, 6, 0, 8], strict=True))  # as EVA may move them, one module dropped
    kept = {n: r for n, r in ranks.items() if r}
    adapted = {
        "kind": "lora", "layers": [1, 2], "modules": 3, "ranks": kept,
        "lora_alpha": {n: 2.0 * r for n, r in kept.items()}, "bottleneck": None,
    }  # fmt: skip
    text = _placement(plan, SimpleNamespace(adapted=adapted, eva_ranks=ranks))
    assert text.startswith("3 LoRA modules: q, v of layers 1–2 (2 layers), ranks 2 (1 module), 6 (1 module)")
    assert "lora_alpha 2 × rank; EVA set these ranks from the plan's 4 LoRA modules" in text
    assert text.endswith("rank 4, lora_alpha 8 (1 of its modules dropped at rank 0)")


# ---------------------------------------------------------------------------------------------------------
# Plan settings training reads
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "kind", "says"),
    [
        (lambda d: d["lora_config"].update(lora_dropout=2.0), "lora", "lora_config.lora_dropout: must be a "
         "probability below 1, got 2.0"),
        (lambda d: d.update(adapter_config={"kind": "houlsby", "bottleneck": "abc", "layers": [1, 2]}),
         "houlsby", "adapter_config.bottleneck: must be an integer >= 1, got 'abc' (text)"),
        (lambda d: d.update(adapter_config={"kind": "houlsby", "bottleneck": 0, "layers": [1, 2]}),
         "houlsby", "adapter_config.bottleneck: must be an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_plan_settings_training_reads_are_checked(tmp_path: Path, monkeypatch, edit, kind: str, says: str):
    from typer.testing import CliRunner

    from layercard.cli import app

    loaded = _loaded()
    d = plan_dict(loaded, [1, 2])
    edit(d)
    d["adapter_kind"] = kind
    with pytest.raises(LayercardError, match=f"^plan: {re.escape(says)}$"):
        Plan.from_dict(d)  # refused where a plan is read
    # the command names the plan's file, before it loads any model
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    args = ["train", "--plan", str(path), "--task", "synthetic:facts", "--model", "nowhere-model"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2 and res.output.strip() == f"error: {path}: {says}", res.output


# ---------------------------------------------------------------------------------------------------------
# Divergence, and a second run in the same process
# ---------------------------------------------------------------------------------------------------------


def test_a_learning_rate_that_overflows_the_update_is_a_divergence(tmp_path: Path):
    loaded = _loaded()
    cfg = TrainConfig(steps=2, lr=1e38, **{**FAST, "eval_examples": 0})
    with pytest.raises(
        LayercardError, match=r"^train: step 1 of 2: the update .* is infinite; training diverged"
    ):
        train(loaded, make_plan(loaded, [1]), TRAIN, None, cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "adapter").exists() and not (tmp_path / "o" / "train_metrics.json").exists()


def test_runs_of_other_compute_precisions_follow_each_other_in_one_process(tmp_path: Path):
    for i, dtype in enumerate(("bfloat16", "float32", "bfloat16")):
        loaded = _loaded()
        plan = make_plan(loaded, [1])
        cfg = TrainConfig(steps=1, dtype=dtype, **{**FAST, "eval_examples": 0})
        m = train(loaded, plan, TRAIN, None, cfg, tmp_path / str(i), progress=False)
        assert m["config"]["dtype"] == dtype and m["steps"] == 1


def test_examples_longer_than_the_model_reads_are_refused(tmp_path: Path):
    loaded = _loaded()
    loaded.model.config.max_position_embeddings = 16  # a model that reads 16 positions at most
    plan = make_plan(loaded, [1, 2])
    with pytest.raises(LayercardError, match=r"^--max-length 64: the model reads at most 16 positions"):
        train(loaded, plan, TRAIN, None, TrainConfig(steps=1, **FAST), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


# ---------------------------------------------------------------------------------------------------------
# A launch that shards the weights (FSDP, DeepSpeed)
# ---------------------------------------------------------------------------------------------------------


def test_a_sharded_launch_writes_the_gathered_adapter_and_no_checkpoints(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    import layercard.train.loop as loop

    loaded = _loaded()
    cfg = TrainConfig(steps=2, **FAST)
    plain = tmp_path / "plain"
    train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, cfg, plain, progress=False)
    # One process stands in for a sharded launch: the adapter must come from the gathered weights.
    gathered = []
    from accelerate import Accelerator

    def get_state_dict(self, model, unwrap=True):
        gathered.append(True)
        return {k: v.clone() for k, v in self.unwrap_model(model).state_dict().items()}

    monkeypatch.setattr(loop, "sharded", lambda _acc: True)
    monkeypatch.setattr(Accelerator, "get_state_dict", get_state_dict)
    with pytest.raises(LayercardError, match=r"--resume: under .*no checkpoints are written"):
        train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, cfg, tmp_path / "c", resume=True)
    m = train(
        loaded,
        make_plan(loaded, [1, 2]),
        TRAIN,
        VAL,
        TrainConfig(steps=2, **CKPT),
        tmp_path / "k",
        progress=True,
    )
    assert m["config"]["checkpoint_every"] == 0 and not (tmp_path / "k" / "checkpoints").exists()
    assert "checkpoints are not written" in capsys.readouterr().err
    with pytest.raises(LayercardError, match="--kind houlsby: under .*only LoRA adapters are saved"):
        train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, cfg, tmp_path / "h", kind="houlsby")
    sharded = tmp_path / "sharded"
    train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, cfg, sharded, progress=False)
    assert gathered == [True, True]  # the run at checkpoint_every 2, and this one
    a = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(sharded / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "c").exists() and not (tmp_path / "h").exists()
