"""`layercard run`: messages name the config's keys, a trim window is checked before the run, the default
run folder belongs to one config file, and the JSON summary's paths are absolute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import make_model_dir, tiny_config, write_config
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard.cli import app
from layercard.errors import LayercardError, run_section, setting_name
from layercard.pipeline import load_config, parse_config, run_pipeline


def small_config(model_dir: Path) -> dict[str, Any]:
    """The tiny config with one placement, no trim, no coupling and no calibration: seconds to run."""
    cfg = tiny_config(model_dir)
    cfg["placements"] = [{"name": "all", "policy": "all", "rank": 4}]
    cfg["card"].update(coupling=False, calibrate=False)
    cfg["trim"] = False
    return cfg


# ---------------------------------------------------------------- messages name the config's keys


def test_setting_names_are_flags_outside_a_run_and_keys_inside():
    assert setting_name("max_length") == "--max-length"
    assert setting_name("max_length", flag="the card's --max-length") == "the card's --max-length"
    with run_section("eval"):
        assert setting_name("max_new_tokens") == "eval.max_new_tokens"
        with run_section("train"):
            assert setting_name("max_length", flag="--x") == "train.max_length"
        assert setting_name("max_length") == "eval.max_length"
    assert setting_name("max_length") == "--max-length"


def test_run_messages_name_the_config_keys(tmp_path, capsys):
    # a model that reads 100 positions: the facts examples are 100 to 109 tokens, their prompts 96
    model = tmp_path / "short"
    tiny_model("llama", max_position_embeddings=100).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    cfg = small_config(model)
    cfg["card"]["max_length"] = 128
    cfg["train"]["max_length"] = 128
    cfg["placements"].append({"name": "low", "policy": "all", "rank": 2})  # two trainings on one data
    path = write_config(tmp_path, cfg)
    out = tmp_path / "run"

    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(path), out, progress=False)
    msg = str(e.value)
    assert "train.max_length 128: the model reads at most 100 positions" in msg, msg
    assert msg.endswith("give a length it reads") and "--max-length" not in msg, msg
    err = capsys.readouterr().err
    assert "so card.max_length 128 acts as 100" in err and "--max-length" not in err, err

    rows: dict[str, list[tuple[str, str]]] = {}
    sets = ["train.max_length=64", "eval.max_length=8"]
    run_pipeline(
        load_config(path, sets),
        out,
        progress=True,  # training says its cut note under progress
        on_stage=lambda ev, name, r: rows.update({name: r.rows}) if ev == "end" else None,
    )
    notes = [v for k, v in rows["eval:base"] if k == "note"]
    assert any("longer than max_length 8 tokens" in n and "raise eval.max_length" in n for n in notes), notes
    err = capsys.readouterr().err
    assert err.count("raise train.max_length to keep them whole") == 1 and "--max-length" not in err, err

    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(path, ["train.max_length=64", "eval.max_length=200"]), out, progress=False)
    assert "stage eval:base: eval.max_length 200: the model reads at most 100 positions" in str(e.value)
    with pytest.raises(LayercardError) as e:
        run_pipeline(
            load_config(path, ["train.max_length=64", "eval.max_new_tokens=40"]), out, progress=False
        )
    assert "tokens and eval.max_new_tokens 40: the model reads at most 100" in str(e.value), str(e.value)


def test_set_errors_name_the_set_that_gave_the_value(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path / "model"))

    def error(*sets: str) -> str:
        with pytest.raises(LayercardError) as e:
            load_config(path, list(sets))
        return str(e.value)

    assert error("train.steps=-3") == (
        "--set 'train.steps=-3': train.steps: must be a positive integer, got -3"
    )
    # the last --set of the key, by index or name, or of a section holding it
    assert error("train.steps=2", "train.steps=0").startswith("--set 'train.steps=0': train.steps:")
    assert error("placements.0.rank=0").startswith("--set 'placements.0.rank=0': placements[card-2].rank:")
    assert error("placements.all.policy=no").startswith("--set 'placements.all.policy=no': placements[all]")
    assert error("train={steps: -1}").startswith("--set 'train={steps: -1}': train.steps:")
    assert error("trim.placement=nope").startswith("--set 'trim.placement=nope': trim.placement:")
    # a bad value in the file still names the file, whatever else --set gave
    bad = write_config(tmp_path, {**tiny_config(tmp_path / "model"), "seed": -1}, "bad.yaml")
    with pytest.raises(LayercardError, match=rf"^{bad}: seed: must be"):
        load_config(bad, ["train.steps=2"])
    # and values read when the run opens: the model, the task
    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(path, [f"model={tmp_path / 'none'}"]), tmp_path / "run", progress=False)
    assert str(e.value).startswith(f"--set 'model={tmp_path / 'none'}': model: ")
    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(path, ["task.train=nope"]), tmp_path / "run", progress=False)
    # a task setting changed by --set is named with the file: a load can fail on either
    assert str(e.value).startswith(f"{path} with --set 'task.train=nope': task.train: unknown task 'nope'")
    fields = write_config(
        tmp_path, {**tiny_config(tmp_path / "model"), "task": {"train": "synthetic:facts"}}, "f.yaml"
    )
    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(fields, ["task.train_split=test"]), tmp_path / "run", progress=False)
    assert str(e.value).startswith(f"{fields} with --set 'task.train_split=test': task.")
    # a section the file lacks, given by --set: the file is named with it
    assert error("trian.steps=3").startswith(f"{path} with --set 'trian.steps=3': trian")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the trim window


def test_a_trim_window_past_the_model_fails_before_the_run(tmp_path):
    cfg = small_config(make_model_dir(tmp_path))  # 4 layers
    cfg["trim"] = {"window": "2:9", "examples": 4, "batch_size": 4}
    path = write_config(tmp_path, cfg)
    out = tmp_path / "run"
    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(path), out, progress=False)
    assert str(e.value) == f"{path}: trim.window: 2:9 lies past the model's layers 0..3"
    assert not out.exists()  # nothing ran: no card, no training
    with pytest.raises(LayercardError, match=r"^--set 'trim.window=1:4': trim.window: 1:4 lies past"):
        run_pipeline(load_config(path, ["trim.window=1:4"]), out, progress=False)
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert r.exit_code == 2 and "trim.window: 2:9 lies past the model's layers 0..3" in r.output
    assert not out.exists()
    # switched off, the window is read by nothing
    cfg["trim"]["enabled"] = False
    summary = run_pipeline(load_config(write_config(tmp_path, cfg)), out, progress=False, until="card")
    assert summary["ran"] == ["card"]


# ---------------------------------------------------------------- the default run folder


def test_the_default_folder_holds_the_run_of_one_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = small_config(make_model_dir(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = write_config(tmp_path / "a", cfg), write_config(tmp_path / "b", cfg)
    first = run_pipeline(load_config(Path("a/config.yaml")), progress=False, until="card")
    run_dir = tmp_path / "runs" / "config"
    assert first["run_dir"] == str(run_dir) and first["ran"] == ["card"]
    assert json.loads((run_dir / "run.json").read_text())["config_path"] == str(a.resolve())
    before = sorted(p.stat().st_mtime_ns for p in run_dir.rglob("*"))
    with pytest.raises(LayercardError) as e:
        run_pipeline(load_config(b), progress=False, until="card")
    assert str(e.value) == (
        f"run folder runs/config: holds the run of {a.resolve()}, not of {b.resolve()}; give this config a "
        "folder of its own with --out, or go on with that run with --out runs/config (nothing was written)"
    )
    assert sorted(p.stat().st_mtime_ns for p in run_dir.rglob("*")) == before
    # the same config file, however it is named, goes on in its folder
    again = run_pipeline(load_config(tmp_path / "b/../a/config.yaml"), progress=False, until="card")
    assert again["skipped"] == ["card"]
    # a folder given is the user's choice: another config runs there, redoing what its inputs change
    given = run_pipeline(load_config(b), run_dir, progress=False, until="card")
    assert given["skipped"] == ["card"]
    assert json.loads((run_dir / "run.json").read_text())["config_path"] == str(b.resolve())
    # a config built in memory is named "config" too, and is no more the file's than another file is
    with pytest.raises(LayercardError) as e:
        run_pipeline(parse_config(cfg), progress=False, until="card")
    assert str(e.value).startswith(
        f"run folder runs/config: holds the run of {b.resolve()}, not of a config built in memory; "
    )


def test_a_moved_project_goes_on_with_its_run(tmp_path, monkeypatch, capsys):
    """A project moved (or copied) with its run folder keeps its run under the config's new path: the
    config the folder names is gone, so there is no other config's run to keep apart."""
    first_home, moved = tmp_path / "p1", tmp_path / "p2"
    first_home.mkdir()
    path = write_config(first_home, small_config(make_model_dir(tmp_path)))
    monkeypatch.chdir(first_home)
    assert run_pipeline(load_config(path), progress=False, until="card")["ran"] == ["card"]
    first_home.rename(moved)
    monkeypatch.chdir(moved)
    again = run_pipeline(load_config(moved / "config.yaml"), progress=False, until="card")
    assert again["skipped"] == ["card"]
    err = " ".join(capsys.readouterr().err.split())
    assert f"holds the run of {path.resolve()}, which no longer exists; going on with it" in err
    run_json = json.loads((moved / "runs/config/run.json").read_text())
    assert run_json["config_path"] == str((moved / "config.yaml").resolve())


# ---------------------------------------------------------------- the JSON summary's paths


def test_the_json_summary_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, small_config(make_model_dir(tmp_path)))
    r = CliRunner().invoke(app, ["run", "config.yaml", "--out", "run", "--until", "plan", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["run_dir"] == str(tmp_path / "run") and d["summary"] == str(tmp_path / "run/summary.json")
    saved = json.loads((tmp_path / "run/summary.json").read_text())
    assert saved["run_dir"] == d["run_dir"] and saved["config"] == str(path)
    assert [s["folder"] for s in saved["stages"]] == [
        str(tmp_path / "run/card"),
        str(tmp_path / "run/plan/all"),
    ]
    # a run moved and resumed from elsewhere by an absolute path skips what it made
    shutil.move(tmp_path / "run", tmp_path / "moved")
    monkeypatch.chdir(tmp_path.parent)
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "moved"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["skipped"][:2] == ["card", "plan:all"] and Path(d["report"]["html"]).is_file()
    assert all(Path(p).is_absolute() for p in (d["run_dir"], d["summary"], *d["report"].values()))


# ---------------------------------------------------------------- records of other versions


def test_a_stage_of_another_layercard_version_is_said_or_kept(tmp_path, capsys):
    """A stage recorded by an older layercard is made again, saying why; one a newer layercard wrote is
    not deleted by this one (its work would be lost to an older environment run by mistake)."""
    from layercard.pipeline.stages import STAGE_VERSION, stage_fingerprint

    path = write_config(tmp_path, small_config(make_model_dir(tmp_path)))
    out = tmp_path / "run"
    assert run_pipeline(load_config(path), out, progress=False, until="card")["ran"] == ["card"]
    record = out / "card" / "stage.json"
    rec = json.loads(record.read_text())
    assert rec["stage_version"] == STAGE_VERSION
    capsys.readouterr()
    for newer in ({"stage_version": STAGE_VERSION + 1}, {"schema_version": rec["schema_version"] + 1}):
        record.write_text(json.dumps({**rec, **newer}))
        before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "card").iterdir())
        with pytest.raises(
            LayercardError, match=r"stage card: .*stage\.json was written by a newer layercard"
        ):
            run_pipeline(load_config(path), out, progress=False, until="card")
        assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "card").iterdir()) == before
    older = STAGE_VERSION - 1
    fp = stage_fingerprint("card", rec["config"], rec["inputs"], version=older)
    record.write_text(json.dumps({**rec, "fingerprint": fp, "stage_version": older}))
    assert run_pipeline(load_config(path), out, progress=False, until="card")["ran"] == ["card"]
    err = " ".join(capsys.readouterr().err.split())
    assert f"stage card: made again: it was made by a layercard of stage version {older}" in err
    rec.pop("stage_version")  # a record from before records named their version
    record.write_text(json.dumps({**rec, "fingerprint": fp}))
    assert run_pipeline(load_config(path), out, progress=False, until="card")["ran"] == ["card"]
    assert f"stage version {older}, whose outputs differ" in " ".join(capsys.readouterr().err.split())
