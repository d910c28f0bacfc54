"""A full or size-limited disk, a read-only or homeless cache, odd output paths, a console that cannot
print every character, an output that refuses writes: one line each, nothing half-written."""

from __future__ import annotations

import ast
import errno
import importlib
import io
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
import typer.main

from layercard import artifacts
from layercard.errors import LayercardError
from layercard.models import loading

cli_app = importlib.import_module("layercard.cli.app")  # the module; `layercard.cli.app` is the Typer app

SRC = Path(__file__).resolve().parents[1] / "src" / "layercard"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        OSError(errno.EFBIG, "File too large"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["torch-zip", "torch-stream", "efbig", "enospc"],
)
def test_a_write_the_disk_refuses_is_one_line_naming_the_artifact(tmp_path: Path, error: Exception):
    final = tmp_path / "run" / "adapter"
    with pytest.raises(LayercardError, match=r"run/adapter: cannot be written \(.*\); nothing was written"):
        with artifacts.atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "part.bin").write_bytes(b"x")
            raise error
    assert not final.exists() and list(tmp_path.rglob("*")) == []


def test_a_failed_write_inside_a_folder_write_names_where_it_would_have_been(tmp_path: Path):
    """The card folder's figure written inside its temporary folder: the message named the temporary,
    which is gone by the time it is read."""
    final = tmp_path / "card"
    with pytest.raises(LayercardError) as failed:
        with artifacts.atomic_path(final) as tmp:
            tmp.mkdir()
            raise LayercardError(f"{tmp / 'card_heatmap.png'}: cannot be written (No space left on device)")
    assert str(failed.value).startswith(f"{final / 'card_heatmap.png'}: cannot be written")
    assert ".tmp" not in str(failed.value)


def test_a_library_error_that_is_not_a_write_failure_keeps_its_own(tmp_path: Path):
    with pytest.raises(RuntimeError, match="shapes do not match"):
        with artifacts.atomic_path(tmp_path / "x.json"):
            raise RuntimeError("shapes do not match")


def test_a_folder_that_cannot_be_moved_aside_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "train" / "all"
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("kept", encoding="utf-8")

    def refuse(self, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(self), str(target))

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(LayercardError, match=r"train/all: cannot be removed to make it again \(Permission"):
        artifacts.remove_folder(folder)
    assert (folder / "keep.txt").read_text(encoding="utf-8") == "kept"


def test_a_cache_that_takes_no_writes_only_costs_a_recomputation(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")

    def refuse(path, obj):
        raise LayercardError(f"{path}: cannot be written (Permission denied); nothing was written there")

    monkeypatch.setattr(loading, "write_json", refuse)
    first = loading._memo_hash([weights], with_names=False)
    assert first == loading._memo_hash([weights], with_names=False) == artifacts.hash_file(weights)


def test_no_home_folder_asks_for_layercard_cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LAYERCARD_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(LayercardError, match="set LAYERCARD_CACHE"):
        loading.cache_dir()


@pytest.mark.parametrize("check", [artifacts.check_out_folder, artifacts.check_out_file])
def test_an_output_through_a_link_to_nothing_or_empty_is_refused_before_any_work(tmp_path: Path, check):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("loop", "dangling", "loop/x.json", "dangling/x.json"):
        with pytest.raises(LayercardError, match="is a symbolic link to nothing"):
            check(tmp_path / name)
    with pytest.raises(LayercardError, match="--out: is empty"):
        check("")  # as the Python API passes it (the command line's Path("") is already ".")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    check(tmp_path / "link" / ("sub" if check is artifacts.check_out_folder else "x.json"))


@pytest.mark.parametrize(
    ("columns", "terminal", "width"),
    [(None, False, 200), ("0", False, 200), ("-5", False, 200), ("wide", False, 200), ("100", False, None),
     ("0", True, 80), ("7", True, 80), (None, True, None), ("120", True, None), ("wide", True, None),
     ("", True, None)],
)  # fmt: skip
def test_a_columns_value_that_would_hide_every_line_is_passed_over(monkeypatch, columns, terminal, width):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    stream = io.StringIO()
    stream.isatty = lambda: terminal  # type: ignore[method-assign]
    assert cli_app._width(stream) == width


def test_a_console_without_a_character_prints_a_stand_in(monkeypatch: pytest.MonkeyPatch):
    raw = io.BytesIO()
    latin = io.TextIOWrapper(raw, encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", latin)
    cli_app._printable_anywhere()
    latin.write("ρ ± ▶\n")
    latin.flush()
    assert raw.getvalue() == "? ± ?\n".encode("latin-1")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), 141),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
    ],
    ids=["reader-left", "output-full"],
)
def test_an_output_that_refuses_writes_is_no_internal_error(monkeypatch, capsys, error, code):
    monkeypatch.setattr(cli_app, "_output_gone", lambda: None)  # the test's own stdout stays

    @cli_app.guard
    def command() -> None:
        raise error

    with pytest.raises(typer.Exit) as exit_:
        command()
    assert exit_.value.exit_code == code
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert ("the output cannot be written (No space left on device)" in err) == (code == 1)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory"),
        None,  # the CPU allocator's own, raised here
    ],
    ids=["python", "gpu", "cpu", "cpu-now"],
)
def test_running_out_of_memory_is_said_as_such(capsys, error):
    @cli_app.guard
    def command() -> None:
        if error is None:
            torch.empty(10**17)  # 400 PB: more than a process can address (128 PB at most)
        raise error

    with pytest.raises(typer.Exit) as exit_:
        command()
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.exit_code == 1 and err.startswith("error: out of memory (") and "internal" not in err
    assert "a smaller batch, max length or rank needs less" in err


def test_every_text_file_is_read_and_written_as_utf8():
    """A Latin-1 or ASCII locale made the default encoding refuse ρ and – in READMEs after the work."""
    unnamed = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node if isinstance(node, ast.Call) else None
            name = getattr(getattr(call, "func", None), "attr", None)
            if name in ("read_text", "write_text") and not any(k.arg == "encoding" for k in call.keywords):
                unnamed.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert unnamed == []


def test_a_file_os_error_keeps_its_name(monkeypatch, capsys):
    @cli_app.guard
    def command() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath("some/file"))

    with pytest.raises(typer.Exit):
        command()
    assert "the output cannot be written" not in capsys.readouterr().err  # a file's own, not the output's


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (["card", "-o", ""], "card -o"),
        (["card", "--out="], "card --out"),
        (["plan", "--card", "c.json", "--out", ""], "plan --out"),
        (["report", ""], "report run_dir"),
        (["report", "--", ""], "report run_dir"),
        (["trim", "-t", "sst2", "-a", ""], "trim -a"),
    ],
)
def test_an_empty_path_on_the_command_line_is_refused_not_read_as_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: list[str], named: str
):
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli_app.app, line)
    assert r.exit_code == 2
    assert f"{named}: is empty; give a path" in r.output
    assert list(tmp_path.iterdir()) == []


def test_an_empty_value_of_an_option_that_is_no_path_is_left_to_the_command(tmp_path: Path):
    cmd = typer.main.get_command(cli_app.app).get_command(None, "card")
    assert cli_app._empty_path(cmd, ["--task", "", "--out", str(tmp_path)]) is None
    assert cli_app._empty_path(cmd, ["--json", "--out", "x"]) is None


def test_folders_made_for_a_lock_are_removed_when_the_work_fails_before_writing(tmp_path: Path):
    target = tmp_path / "a" / "b" / "card"
    with pytest.raises(RuntimeError), artifacts.writer_lock(target):
        assert artifacts.lock_path(target).is_file()
        raise RuntimeError("the model could not be loaded")
    assert list(tmp_path.iterdir()) == []
    with artifacts.writer_lock(target):
        target.mkdir()
        (target / "card.json").write_text("{}", encoding="utf-8")
    assert (target / "card.json").is_file()
    assert not artifacts.lock_path(target).exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), artifacts.writer_lock(tmp_path / "kept" / "x"):
        raise RuntimeError
    assert (tmp_path / "kept").is_dir()  # it was there before


def test_a_ctrl_c_before_the_command_runs_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys):
    # while `layercard` still imports torch, no command's own guard is there yet
    import layercard.__main__ as entry
    import layercard.cli

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(layercard.cli, "app", interrupted)
    with pytest.raises(SystemExit) as exit_:
        entry.main()
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_sigterm_ends_a_command_as_a_ctrl_c_does(monkeypatch: pytest.MonkeyPatch, capsys):
    import signal

    import layercard.__main__ as entry
    import layercard.cli

    def stopped(**_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop, while the command runs
        time.sleep(5)  # not reached: the signal is handled first

    monkeypatch.setattr(layercard.cli, "app", stopped)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            entry.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"
