"""Bad state a one-line table row cannot hold: diverged training, leftovers of killed writes and locks,
one writer per folder, what a command says it used, and where a config's paths are read from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import NoReturn

import pytest
import torch
import yaml
from bad_world import (
    CARD,
    EVAL,
    FACTS,
    ONE_STEP,
    TRAIN,
    World,
    cli,
    dead_pid,
    lock_record,
    one_error_line,
    run_config,
    temp_name,
)
from conftest import REPO

from layercard import artifacts
from layercard.errors import LayercardError

# ---------------------------------------------------------------------------------------------------------
# point 1: diverged training
# ---------------------------------------------------------------------------------------------------------


def test_diverged_training_keeps_finite_checkpoints_and_says_so(world: World, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = one_error_line(cli(f"train -p {world.plan} -t {FACTS} -o {out} {TRAIN} --steps 3 --lr 1e30 "
                              "--checkpoint-every 1"))  # fmt: skip
    assert line.startswith("error: train: step 2 of 3: ")
    assert line.endswith(
        f"; the checkpoints of earlier, finite steps stay in {out / 'checkpoints'} (latest step-1)"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert not (out / "adapter").exists() and not (out / "train_metrics.json").exists()


def test_nan_loss_stops_before_the_first_update(world: World, tmp_path: Path) -> None:
    """A NaN loss (here forced by a hook on the head) stops step 1 before the optimizer touches a weight."""
    from layercard.models import load_model
    from layercard.plan import Plan
    from layercard.tasks import load_task
    from layercard.train import TrainConfig, train

    loaded = load_model(str(world.model))
    hook = loaded.model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    cfg = TrainConfig(steps=2, batch_size=4, max_length=64, train_examples=8, eval_examples=0)
    with pytest.raises(
        LayercardError, match=r"^train: step 1 of 2: the training loss is NaN; training diverged"
    ):
        train(loaded, Plan.load(world.plan), load_task(FACTS, split="train"), None, cfg, tmp_path / "o")
    hook.remove()
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())  # restored, untouched
    assert not (tmp_path / "o" / "adapter").exists() and not (tmp_path / "o" / "train_metrics.json").exists()


# ---------------------------------------------------------------------------------------------------------
# point 2: no artifact holds NaN or Infinity; artifacts are read as editors save them
# ---------------------------------------------------------------------------------------------------------


def test_write_json_refuses_non_finite_numbers(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "a.json"
    with pytest.raises(LayercardError) as e:
        artifacts.write_json(path, {"units": [{"grad_norm": 1.0}, {"grad_norm": math.nan}]})
    assert str(e.value).startswith(f"{path}: refusing to write a non-finite number at units[1].grad_norm")
    with pytest.raises(LayercardError, match=r"at curve\[0\]\[1\]"):
        artifacts.write_json(path, {"curve": [[1, np.float64(np.inf)]]})
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"kind": "plan", "schema_version": true}', "schema_version=True, this layercard reads 1"),
        ('{"kind": "plan", "schema_version": 1.0}', "schema_version=1.0, this layercard reads 1"),
        ('{"kind": "plan", "schema_version": 2}', "schema_version=2 (a newer layercard wrote it)"),
        ('{"kind": "plan", "schema_version": 0}', "schema_version=0 (an older layercard wrote it)"),
        ('{"kind": "plan"}', "schema_version: missing; this layercard reads 1"),
        ('{"kind": "plan", "schema_version": 1, "kind": "card"}', "key 'kind' appears twice in one object"),
        ('{"kind": "plan", "schema_version": 1, "n": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the"),
        ('{"kind": "eval", "schema_version": 1}', "expected an evaluation artifact, found kind='eval'"),
    ],
)
def test_an_artifacts_kind_version_and_keys_are_read_strictly(tmp_path: Path, text: str, said: str) -> None:
    from layercard.artifacts import read_json

    path = tmp_path / "a.json"
    path.write_text(text)
    kind = "evaluation" if "evaluation" in said else "plan"
    with pytest.raises(LayercardError) as e:
        read_json(path, kind=kind)
    assert str(e.value).startswith(f"{path}: ") and said in str(e.value) and "\n" not in str(e.value)


def test_a_seed_past_the_generators_range_is_refused_in_one_line(tmp_path: Path) -> None:
    from layercard.config import TrainConfig
    from layercard.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"seed: must be an integer in 0\.\.4294967295, got 4294967296"):
        TrainConfig(seed=2**32)
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1


def test_artifacts_with_a_byte_order_mark_are_read(world: World, tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    card.write_bytes(b"\xef\xbb\xbf" + world.card.read_bytes())  # as some editors save it
    r = cli(f"plan --policy all -c {card} -o {tmp_path / 'p.json'}")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["kind"] == "plan"


def test_a_card_folder_reads_as_its_card(world: World, tmp_path: Path) -> None:
    r = cli(f"plan --policy all -c {world.card.parent} -o {tmp_path / 'p.json'}")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------------------
# point 5: leftovers of killed writes
# ---------------------------------------------------------------------------------------------------------


def test_the_next_write_removes_stale_temps_of_its_name(tmp_path: Path) -> None:
    dead = tmp_path / temp_name("card.json", dead_pid())
    dead.mkdir()
    (dead / "card.json").write_text("{half")
    mine = tmp_path / temp_name("card.json", os.getpid())  # a live owner (this process)
    mine.mkdir()
    other = tmp_path / temp_name("plan.json", dead_pid())  # another name: left to its own next write
    other.mkdir()
    legacy = tmp_path / ".card.json.k3j9x_2a.tmp"  # an older layercard's, an hour old
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    artifacts.write_json(tmp_path / "card.json", {"ok": 1})
    assert not dead.exists() and not legacy.exists()
    assert mine.exists() and other.exists()
    assert json.loads((tmp_path / "card.json").read_text()) == {"ok": 1}
    # a sweep of every name leaves a file of the older form alone: it may be the user's own
    own = tmp_path / ".notes.ab12cd34.tmp"
    own.write_text("mine")
    os.utime(own, (time.time() - 7200, time.time() - 7200))
    removed = artifacts.remove_stale_temps(tmp_path)
    assert own.exists() and removed == [other]  # the dead owner's temp of another name goes


def test_card_command_clears_what_a_killed_card_left(world: World, tmp_path: Path) -> None:
    out = tmp_path / "card"
    out.mkdir()
    stale = [out / temp_name("card_heatmap.png", dead_pid()), out / temp_name("card.md", dead_pid())]
    for p in stale:
        p.mkdir()
        (p / "half").write_text("half")
    artifacts.lock_path(out).write_text(lock_record(dead_pid()))  # the killed command's lock
    r = cli(f"card -m {world.model} -t {FACTS} -o {out} {CARD} --examples 4 --no-calibrate")
    assert r.exit_code == 0, r.output
    assert not [p for p in stale if p.exists()] and not artifacts.lock_path(out).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_card_folder_write_clears_the_temporary_a_killed_one_left(world: World, tmp_path: Path) -> None:
    # the card stage of `layercard run` sweeps nothing in the card folder itself: the write does
    from layercard.card import Card, write_card_folder

    out = tmp_path / "card"
    stale = out / temp_name("card", dead_pid())
    stale.mkdir(parents=True)
    (stale / "card.json").write_text("{}")
    write_card_folder(Card.load(world.card), out)
    assert not stale.exists() and (out / "card.json").is_file()


def test_a_run_killed_while_writing_its_first_records_goes_on(world: World, tmp_path: Path) -> None:
    # killed while run.json, or card/stage.json, was half-written: its temporary alone is left
    from layercard.pipeline import load_config, run_pipeline

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(run_config(world)))
    cfg = load_config(tmp_path / "c.yaml")
    for n, left in enumerate(["run.json", "card/stage.json"]):
        run = tmp_path / f"run{n}"
        folder, name = (run / left).parent, (run / left).name
        if folder != run:
            run_pipeline(cfg, run, progress=False, until="card")
            shutil.rmtree(folder)
        temp = folder / temp_name(name, dead_pid())
        temp.mkdir(parents=True)
        (temp / name).write_text('{"kind": ')
        summary = run_pipeline(cfg, run, progress=False, until="card")
        assert [s["status"] for s in summary["stages"]] == ["ran"] and not temp.exists()
    (run / "card" / "stage.json").unlink()
    with pytest.raises(LayercardError, match="holds files but no stage.json"):  # real content: refused
        run_pipeline(cfg, run, progress=False, until="card")


def test_a_run_whose_evaluation_would_fail_says_so_before_training(world: World, tmp_path: Path) -> None:
    from layercard.pipeline import load_config, run_pipeline

    raw = run_config(world)
    raw["eval"]["max_new_tokens"] = 100_000  # past the tiny model's context
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    said = (
        r"train:all: eval \(checked before training\): a prompt of \d+ tokens and eval\.max_new_tokens 100000"
    )
    with pytest.raises(LayercardError, match=said):
        run_pipeline(load_config(tmp_path / "c.yaml"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "train" / "all" / "adapter").exists()
    # a call that stops before evaluating trains as asked
    summary = run_pipeline(load_config(tmp_path / "c.yaml"), tmp_path / "run", progress=False, until="train")
    assert summary["stages"][-1]["status"] in ("ran", "resumed")  # the failed record is gone on from
    assert (tmp_path / "run" / "train" / "all" / "adapter").is_dir()


def test_a_stale_checkpoint_temp_is_no_checkpoint_and_goes(world: World, tmp_path: Path) -> None:
    out = tmp_path / "run"
    stale = out / "checkpoints" / temp_name("step-1", dead_pid())
    (stale / "step-1").mkdir(parents=True)
    (stale / "step-1" / "state.json").write_text("{}")
    r = cli(f"train -p {world.plan} -t {FACTS} -o {out} {TRAIN} {ONE_STEP}")
    assert r.exit_code == 0, r.output  # not "holds checkpoints of an earlier run"
    assert not stale.exists() and (out / "adapter").is_dir()
    assert json.loads((out / "train_metrics.json").read_text())["resumed_from"] is None


def test_model_cache_takes_over_a_stale_lock_and_drops_dead_index_entries(tmp_path, monkeypatch) -> None:
    from layercard.models import loading as ML

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-one")
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(b"GGUF-gone")
    ML._memo_hash([gone], with_names=False)
    gone.unlink()
    folder = ML._gguf_folder(gguf.resolve(), artifacts.hash_file(gguf))
    lock = artifacts.lock_path(folder)
    lock.parent.mkdir(parents=True)
    lock.write_text(lock_record(dead_pid()))  # a conversion that was killed
    half = folder.parent / temp_name(folder.name, dead_pid())
    half.mkdir()

    def fake_convert(src: Path, dst: Path, digest: str) -> None:
        with artifacts.atomic_path(dst) as tmp:
            tmp.mkdir()
            (tmp / "layercard_source.json").write_text(json.dumps({"gguf": str(src), "gguf_sha256": digest}))

    monkeypatch.setattr(ML, "_convert_gguf", fake_convert)
    assert ML._gguf_cache(gguf) == folder
    assert (folder / "layercard_source.json").is_file() and not lock.exists() and not half.exists()
    index = json.loads((tmp_path / "cache" / "hash_index.json").read_text())
    assert not [k for k in index if "gone.gguf" in k] and [k for k in index if "m.gguf" in k]


# ---------------------------------------------------------------------------------------------------------
# point 6: one writer per folder
# ---------------------------------------------------------------------------------------------------------


def test_a_lock_held_from_another_pid_namespace_is_not_taken_over(tmp_path: Path) -> None:
    """A writer in a container on the same machine (same host name, another pid namespace) records a pid
    that names another process, or none, here: the lock file's flock, which its writer holds however it
    was started, says it is live. Once that writer is gone, its lock is taken over."""
    fcntl = pytest.importorskip("fcntl")
    target = tmp_path / "out"
    lock = artifacts.lock_path(target)
    for record in (
        lock_record(1, pid_start=-1, pid_ns="pid:[1]"),  # pid 1 there is not this machine's pid 1
        lock_record(dead_pid()),
        "",  # an exclusive create whose record is not written yet (no hard links on the file system)
    ):
        lock.write_text(record)
        fd = os.open(lock, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the writer holds while it writes
        try:
            with pytest.raises(LayercardError, match="another layercard process is writing"):
                with artifacts.writer_lock(target):
                    pass
            assert artifacts.lock_held(target) and lock.read_text() == record
        finally:
            os.close(fd)  # the writer ends
        with artifacts.writer_lock(target) as held:
            assert json.loads(held.read_text())["pid"] == os.getpid()
            assert artifacts._flocked(held)  # and this process holds it the same way
        assert not lock.exists()


def test_writer_lock_takes_over_stale_locks_and_waits_for_live_ones(
    world: World, tmp_path: Path, capsys
) -> None:
    target = tmp_path / "out"
    lock = artifacts.lock_path(target)
    lock.write_text(lock_record(dead_pid()))
    with artifacts.writer_lock(target) as held_lock:
        assert json.loads(held_lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    if (
        artifacts._boot_id() is not None
    ):  # a lock from before this machine's last boot is stale, whatever its pid
        lock.write_text(lock_record(world.live.pid, boot_id="an-earlier-boot"))
        with artifacts.writer_lock(target):
            pass
    if artifacts._pid_start(world.live.pid) is not None:  # a live pid that another process had before
        lock.write_text(lock_record(world.live.pid, pid_start=artifacts._pid_start(world.live.pid) - 1))
        with artifacts.writer_lock(target):
            pass
        lock.write_text(lock_record(world.live.pid))
        with pytest.raises(LayercardError, match=r"pid \d+ on .*layercard run other\.yaml"):
            with artifacts.writer_lock(target):
                pass
    lock.write_text(lock_record(world.live.pid, host="elsewhere", host_tag="elsewhere"))
    for wait in (0.0, None):  # never waited for without end: nothing here can tell whether it is alive
        with pytest.raises(
            LayercardError, match=r"pid \d+ on elsewhere.*another machine: if it is gone, delete"
        ):
            with artifacts.writer_lock(target, wait=wait):
                pass
    lock.unlink()
    waited: list[float] = []
    with artifacts.writer_lock(target):
        t = threading.Thread(target=_second_writer, args=(target, waited))
        t.start()
        time.sleep(0.3)
    t.join()
    assert waited and waited[0] >= 0.2  # the second writer waited for the first to finish, and said so once
    said = " ".join(capsys.readouterr().err.split())
    assert said.count(f"note: waiting for another layercard process writing {target} (pid {os.getpid()}") == 1


def test_one_folder_reached_by_a_link_has_one_lock(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (tmp_path / "run_link").symlink_to(target)
    assert artifacts.lock_path(tmp_path / "run_link") == artifacts.lock_path(target)
    assert artifacts.lock_path(tmp_path / "not-yet") == tmp_path / ".not-yet.lock"


def _second_writer(target: Path, waited: list[float]) -> None:
    t0 = time.monotonic()
    with artifacts.writer_lock(target, wait=10):
        waited.append(time.monotonic() - t0)


def test_folder_replacement_uses_its_own_old_name(tmp_path: Path) -> None:
    """Replacing a folder moves the old one aside under a name of its own write, never a fixed one."""
    final = tmp_path / "adapter"
    for version in ("one", "two"):
        with artifacts.atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "w").write_text(version)
        if version == "one":  # the fixed name an older layercard moved the old folder to (and deleted)
            (tmp_path / ".adapter.old").mkdir()
            (tmp_path / ".adapter.old" / "keep").write_text("theirs")
    assert (final / "w").read_text() == "two"
    assert (tmp_path / ".adapter.old" / "keep").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.old", "adapter"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_folder_replace_cut_between_its_steps_keeps_the_old_folder(
    tmp_path: Path, monkeypatch, exchange: bool
) -> None:
    """An interrupt where the old folder has been moved aside and the new one not yet moved in."""
    final = tmp_path / "figures"
    final.mkdir()
    (final / "a.png").write_text("old")
    if not exchange:  # a system without an atomic exchange: two renames
        monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    else:
        assert artifacts._exchange(tmp_path / "figures", tmp_path / "figures")  # Linux has the call
    renames: list[Path] = []
    rename = Path.rename

    def cut_second(self: Path, to: Path) -> Path:
        renames.append(self)
        if len(renames) == 2 and to == final:
            raise KeyboardInterrupt
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", cut_second)
    with pytest.raises(KeyboardInterrupt) if not exchange else contextlib.nullcontext():
        with artifacts.atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "a.png").write_text("new")
    assert (final / "a.png").read_text() == ("new" if exchange else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]


# ---------------------------------------------------------------------------------------------------------
# point 7: what was used, and where a config's paths are read from
# ---------------------------------------------------------------------------------------------------------


def test_more_examples_than_the_data_says_how_many_were_used(world: World, tmp_path: Path) -> None:
    note = "note: --examples 1000: the task has 4 examples; all 4 were used"
    r = cli(f"eval -m {world.model} -t {world.data} -o {tmp_path / 'e'} {EVAL} --examples 1000")
    assert r.exit_code == 0 and note in r.output, r.output
    r = cli(
        f"card -m {world.model} -t {world.data} -o {tmp_path / 'c'} {CARD} --examples 1000 --no-calibrate"
    )
    assert r.exit_code == 0 and note in r.output, r.output


def test_train_on_a_file_says_validation_is_off(world: World, tmp_path: Path) -> None:
    r = cli(f"train -p {world.plan} -t {world.data} -o {tmp_path / 'run'} {TRAIN} {ONE_STEP}")
    assert r.exit_code == 0, r.output
    assert f"note: --task {world.data} is one file, with no other split: validation is off" in r.output
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["val_task"] is None
    # a train.jsonl with a test.jsonl beside it: the note names the folder, which holds the test split out
    folder = tmp_path / "calls"
    folder.mkdir()
    for split in ("train", "test"):
        shutil.copy(world.data, folder / f"{split}.jsonl")
    r = cli(f"train -p {world.plan} -t {folder / 'train.jsonl'} {TRAIN} {ONE_STEP} --dry-run")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"or --task {folder} to hold out its test split, test.jsonl)" in said, r.output
    # the folder's test split is a copy of its train split: refused, as a --val-split of it would be
    r = cli(f"train -p {world.plan} -t {folder} {TRAIN} {ONE_STEP} --dry-run")
    said = " ".join(r.output.split())
    assert r.exit_code != 0 and f"--task {folder}: its test split holds the same examples as" in said, said
    lines = (folder / "test.jsonl").read_text().splitlines()
    (folder / "test.jsonl").write_text("\n".join([*lines[:1], json.dumps({"input": "new", "target": "x"})]))
    r = cli(f"train -p {world.plan} -t {folder} {TRAIN} {ONE_STEP} --dry-run")
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "validation is off" not in said, said
    assert f"--task {folder}: its test split: 1 of 2 validation examples are also training examples" in said


def test_relative_paths_in_a_config_are_read_from_its_folder(
    world: World, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    from layercard.pipeline import load_config

    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(world.data, folder / "train.jsonl")
    shutil.copy(world.data, folder / "eval.jsonl")
    (folder / "prompt.txt").write_text("Q: {input}")
    raw = run_config(world, task={"train": "train.jsonl", "eval": "eval.jsonl", "prompt": "@prompt.txt"})
    raw["model"] = os.path.relpath(world.model, folder)  # ../../bad0/tiny, from the config's folder
    (folder / "c.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "project" / "c.yaml")
    assert cfg.task.train == str((folder / "train.jsonl").resolve())
    assert cfg.task.eval == str((folder / "eval.jsonl").resolve())
    assert Path(cfg.model).resolve() == world.model.resolve()
    assert cfg.task.prompt == "@" + str((folder / "prompt.txt").resolve())  # a prompt file too
    # a value given with --set is a command-line path: read from the current folder
    cfg = load_config(Path("..") / "project" / "c.yaml", ["task.train=other.jsonl"])
    assert cfg.task.train == "other.jsonl"


def test_only_the_first_launched_process_holds_the_training_lock(world: World, tmp_path, monkeypatch) -> None:
    """Under `accelerate launch` every process trains into one folder: only rank 0 takes its lock."""
    out = tmp_path / "run"
    planted = lock_record(world.live.pid)
    artifacts.lock_path(out).write_text(planted)  # as rank 0 would hold it
    monkeypatch.setenv("RANK", "1")
    r = cli(f"train -p {world.plan} -t {FACTS} -o {out} {TRAIN} {ONE_STEP}")
    assert r.exit_code == 0, r.output
    assert artifacts.lock_path(out).read_text() == planted


def test_a_run_says_when_a_stage_used_fewer_examples_than_asked(world: World, tmp_path: Path) -> None:
    from layercard.pipeline import load_config, run_pipeline

    raw = run_config(world)
    raw["card"]["examples"] = 100_000
    raw["train"]["steps"] = 1
    raw["eval"]["examples"] = 100_000
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    notes: dict[str, str] = {}
    cut: dict[str, list[str]] = {}

    def on_stage(event: str, name: str, result) -> None:
        for key, value in result.rows if result is not None else ():
            if key == "note" and (" were cut to " in value or " as cut there " in value):  # cut counts
                cut.setdefault(name, []).append(value)
            elif key == "note":
                notes[name] = value

    cfg = load_config(tmp_path / "c.yaml")
    summary = run_pipeline(cfg, tmp_path / "run", progress=False, on_stage=on_stage)
    n_train = summary["stages"][0]["summary"]["probe"].split()[0]
    assert notes["card"] == f"card.examples=100000: the task has {n_train} examples; all {n_train} were used"
    assert notes["eval:all"].startswith("eval.examples=100000: the task has ")
    said = cut["eval:all"]  # the world's examples outgrow its tiny format: every one is cut, and said
    assert said[0].startswith("400 of 400 eval prompts are longer than the task format's limit of 96")
    assert " of 400 generations reached max_new_tokens 2 before an end token" in said[1]  # the tiny model's
    assert said[-1].startswith("400 of 400 eval loss examples exceed the task format's limits")
    assert "train:all" not in notes  # train_examples is unset: all examples, as asked


def test_what_an_atomic_write_leaves_has_the_usual_modes(tmp_path: Path) -> None:
    """A writer that makes its file owner-only (safetensors does) leaves an artifact as readable as a
    plain write would: the mode the process's umask gives."""
    import os

    mask = os.umask(0o022)
    try:
        with artifacts.atomic_path(tmp_path / "adapter") as tmp:
            tmp.mkdir()
            (tmp / "weights").write_bytes(b"x")
            (tmp / "weights").chmod(0o600)
        assert (tmp_path / "adapter" / "weights").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
        with artifacts.atomic_path(tmp_path / "one.json") as tmp:
            tmp.write_text("{}")
            tmp.chmod(0o600)
        assert (tmp_path / "one.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_an_atomic_write_reads_the_umask_without_setting_it(tmp_path: Path, monkeypatch) -> None:
    """Setting the umask to learn it would leave other threads a moment with no mask: where the system
    reports it (Linux), it is read, and the modes follow it (0o027 here)."""
    import os

    if not Path("/proc/self/status").is_file() or "Umask:" not in Path("/proc/self/status").read_text():
        pytest.skip("this system does not report the umask in /proc/self/status")
    mask = os.umask(0o027)
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
    try:
        with artifacts.atomic_path(tmp_path / "one.json") as tmp:
            tmp.write_text("{}")
            tmp.chmod(0o600)
        assert (tmp_path / "one.json").stat().st_mode & 0o777 == 0o640 and calls == []
    finally:
        real(mask)


def test_an_atomic_write_reaches_the_disk_before_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file and folder a write leaves is flushed before the rename that names it, and the folder
    that receives it after, so that a power cut leaves the old artifact or the whole new one."""
    import os

    events: list[str] = []
    flush, rename = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        flush(fd)

    def replace(a: os.PathLike[str], b: os.PathLike[str]) -> None:
        events.append(f"rename {Path(b).name}")
        rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with artifacts.atomic_path(tmp_path / "step.json") as tmp:
        tmp.write_text("{}")
    assert events == ["fsync step.json", "rename step.json", f"fsync {tmp_path.name}"]
    events.clear()
    with artifacts.atomic_path(tmp_path / "step-3") as tmp:
        (tmp / "inner").mkdir(parents=True)
        (tmp / "inner" / "weights").write_bytes(b"x")
        (tmp / "state.json").write_text("{}")
    flushed = {e.split()[1] for e in events if e.startswith("fsync")}
    assert {"weights", "inner", "state.json"} <= flushed
    assert events[-1] == f"fsync {tmp_path.name}"
    assert (tmp_path / "step-3" / "inner" / "weights").read_bytes() == b"x"


def test_a_failed_write_removes_the_folders_it_made(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper" / "report.html"
    with pytest.raises(RuntimeError), artifacts.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("a figure failed to draw")
    # the folders the write made go again; the one that was there stays
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
    # one that something else filled meanwhile stays too
    with pytest.raises(RuntimeError), artifacts.atomic_path(target) as tmp:
        (tmp_path / "kept" / "new" / "other.txt").write_text("someone else's")
        raise RuntimeError("again")
    assert (tmp_path / "kept" / "new" / "other.txt").is_file() and not target.parent.exists()
    with artifacts.atomic_path(target) as tmp:  # a write that succeeds keeps them
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_other_weights_of_the_same_size_and_mtime_are_hashed_again(tmp_path: Path) -> None:
    """The weights hash is memoised by file; a copy that keeps size and mtime (`cp -p`, `rsync -t`, an
    archive) must not keep the old digest for new bytes."""
    import os

    from layercard.models import loading as ML

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    first = ML.weights_folder_hash(tmp_path)
    st = weights.stat()
    other = tmp_path / "other"
    other.write_bytes(b"b" * 64)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, weights)  # same name, size and mtime; new bytes
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert ML.weights_folder_hash(tmp_path) != first


def test_an_adapters_identity_skips_hidden_files_and_separates_files(tmp_path: Path) -> None:
    """What a file browser leaves in an adapter folder does not change its identity; one file holding
    another's name and bytes after its own does not pass for the two files."""
    from layercard.artifacts import hash_folder

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    (one / "a").write_bytes(b"1b\n2")  # "a\n" + "1b\n2": what files a (1) and b (2) once hashed as
    (two / "a").write_bytes(b"1")
    (two / "b").write_bytes(b"2")
    assert hash_folder(one) != hash_folder(two)
    before = hash_folder(two)
    (two / ".DS_Store").write_bytes(b"x")
    (two / ".ipynb_checkpoints").mkdir()
    (two / ".ipynb_checkpoints" / "a").write_bytes(b"y")
    assert hash_folder(two) == before
    (two / "sub").mkdir()
    (two / "sub" / "c").write_bytes(b"")  # an empty file is part of the identity
    assert hash_folder(two) != before


def test_provenance_names_the_source_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source checkout reports one package version for every commit: provenance adds the commit, and
    leaves it out where git cannot tell."""
    import subprocess

    artifacts.source_commit.cache_clear()
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0 or artifacts.source_commit() is None:
            pytest.skip("layercard does not run from this git checkout")
        recorded = artifacts.package_versions()["layercard_commit"]
        assert recorded.removesuffix("+modified") == head.stdout.strip()
        artifacts.source_commit.cache_clear()

        def no_git(*a: object, **k: object) -> NoReturn:
            raise FileNotFoundError("git")

        monkeypatch.setattr(artifacts.subprocess, "run", no_git)
        assert "layercard_commit" not in artifacts.package_versions()
    finally:
        artifacts.source_commit.cache_clear()


def test_a_command_does_not_write_into_a_run_another_process_is_running(world: World, tmp_path: Path) -> None:
    """A run's stages read what lies in its folder as their own: a command writing there while the run
    goes on (a plan into its plan folder, an eval into its eval folder) is refused before any work."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "run_config"}))
    artifacts.lock_path(run).write_text(lock_record(world.live.pid))  # the run, still running
    plan = f"plan --card {world.card} --policy all --out {run / 'plan' / 'x' / 'plan.json'}"
    evaluate = f"eval -m {world.model} -t synthetic:facts -o {run / 'eval' / 'x'} {EVAL}"
    merged = (
        f"trim -m {world.model} --adapter {world.adapter} -t synthetic:facts --out {tmp_path / 'trim'} "
        f"--export-merged {run / 'merged'}"
    )
    for line in (plan, evaluate, merged):
        said = one_error_line(cli(line))
        assert f"lies inside the run folder {run}, which another layercard process is running" in said
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]
    artifacts.lock_path(run).unlink()  # the run ended: its folder is the user's to write in
    r = cli(plan)
    assert r.exit_code == 0, r.output


def test_an_adapter_on_a_base_with_other_tokenizer_files_is_said(world: World, tmp_path: Path) -> None:
    """The weights' hash names a base; its tokenizer files and config.json are recorded beside it, and a
    base with the same weights but other files takes the adapter with a note: the tokens it reads, or
    what its layers compute, are not those the adapter was trained on."""
    from layercard.models import config_folder_hash, tokenizer_folder_hash

    out = tmp_path / "t"
    r = cli(f"train -p {world.plan} -m {world.model} -t synthetic:facts -o {out} {ONE_STEP}")
    assert r.exit_code == 0, r.output
    base = json.loads((out / "adapter" / "layercard_base.json").read_text())
    assert base["tokenizer_hash"] == tokenizer_folder_hash(world.model)
    assert base["config_hash"] == config_folder_hash(world.model)
    other = tmp_path / "other"
    shutil.copytree(world.model, other)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": "{{ messages }}"}))
    for model, said in ((world.model, False), (other, True)):
        r = cli(
            f"eval -m {model} --adapter {out / 'adapter'} -t synthetic:facts -o {tmp_path / str(said)} {EVAL}"
        )
        assert r.exit_code == 0, r.output
        note = "trained on a base with these weights but other tokenizer or chat-template files than this"
        assert (note in " ".join(r.output.split())) == said, r.output


def test_a_plan_another_process_is_writing_is_left_alone(world: World, tmp_path: Path) -> None:
    """plan.json and its frontier figure have one writer at a time: a second plan to the same file while
    the first is at work would leave one's plan beside the other's figure."""
    out = tmp_path / "plan.json"
    artifacts.lock_path(out).write_text(lock_record(world.live.pid))  # another plan, at work
    said = one_error_line(cli(f"plan --card {world.card} --policy all --out {out}"))
    assert "another layercard process is writing this plan file" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{out.name}.lock"]
    artifacts.lock_path(out).unlink()
    r = cli(f"plan --card {world.card} --policy all --out {out}")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # and no lock left behind


def test_training_on_another_task_than_the_cards_is_said(world: World, tmp_path: Path) -> None:
    """A plan's predictions are for the task its card measured: training it on another says so."""
    said = "the plan's card was measured on task 'facts', and this run trains on 'format'"
    for task, other in ((FACTS, False), ("synthetic:format", True)):
        r = cli(f"train -p {world.plan} -m {world.model} -t {task} -o {tmp_path / task[10:]} {ONE_STEP}")
        assert r.exit_code == 0, r.output
        assert (said in " ".join(r.output.split())) == other, r.output


def test_other_prompt_settings_than_the_cards_and_the_trainings_are_said(
    world: World, tmp_path: Path
) -> None:
    """A --system (or --prompt, --chat-template, --train-turns) given to one command and not the next is
    said: training after a card made without it, and scoring an adapter trained with it."""
    said = (
        "the plan's card was measured with other prompt settings than this run trains with "
        "(system prompt none, here 'Brief.')"
    )
    runs = {}
    for system in (None, "Brief."):
        out = tmp_path / f"run{system is not None}"
        opt = f" --system {system}" if system else ""
        r = cli(f"train -p {world.plan} -m {world.model} -t {FACTS} -o {out} {ONE_STEP}{opt}")
        assert r.exit_code == 0, r.output
        assert (said in " ".join(r.output.split())) == (system is not None), r.output
        runs[system] = out / "adapter"
        # a dry run, where one checks a run before it starts, says the same
        r = cli(f"train -p {world.plan} -m {world.model} -t {FACTS} --dry-run {ONE_STEP}{opt}")
        assert r.exit_code == 0, r.output
        assert (said in " ".join(r.output.split())) == (system is not None), r.output
    trained = (
        "the adapter was trained with other prompt settings than this task's "
        "(system prompt 'Brief.', here none)"
    )
    adapter = runs["Brief."]
    for opt, other in (("", True), (" --system Brief.", False)):
        r = cli(
            f"eval -m {world.model} --adapter {adapter} -t {FACTS} -o {tmp_path / str(other)} {EVAL}{opt}"
        )
        assert r.exit_code == 0, r.output
        assert (trained in " ".join(r.output.split())) == other, r.output
