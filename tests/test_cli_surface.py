"""The command line's own surface: usage errors, options given at their default, outputs that cannot be
written, the version, interruption, and the wording of what the commands print."""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import sys
from pathlib import Path

import pytest
import typer
from bad_world import CARD, FACTS, World, cli, one_error_line

from layercard import artifacts
from layercard.cli.app import guard
from layercard.errors import LayercardError

ON_PROC = sys.platform.startswith("linux") and Path("/proc/self").is_dir()
needs_proc = pytest.mark.skipif(not ON_PROC, reason="needs /proc, a folder that takes no new files")


# ---------------------------------------------------------------------------------------------------------
# Usage errors and --version
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, said",
    [
        (["card", "--examples", "abc"], "Invalid value for '--examples'"),
        (["card", "--bogus"], "No such option: --bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["plna"], "No such command 'plna'. Did you mean 'plan'?"),
        (["--bogus"], "No such option: --bogus"),
        (["plan"], "Missing option '--card'"),
    ],
)
def test_a_usage_error_is_one_line(args: list[str], said: str) -> None:
    line = one_error_line(cli(args))
    assert said in line and "--help" in line, line


def test_layercard_alone_still_shows_the_help() -> None:
    r = cli([])
    assert "Usage:" in r.output and "Commands" in r.output


def test_version() -> None:
    from layercard import __version__

    r = cli(["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"layercard {__version__}"


# ---------------------------------------------------------------------------------------------------------
# An option given at its default value is given
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["100", "50"])  # 100 is the default
def test_steps_with_epochs_fails_whatever_the_step_count(tmp_path: Path, steps: str) -> None:
    args = f"train -p {tmp_path / 'plan.json'} -t {FACTS} --dry-run --steps {steps} --epochs 1"
    line = one_error_line(cli(args))
    assert line.startswith("error: --steps: give exactly one of steps and epochs"), line


# ---------------------------------------------------------------------------------------------------------
# Output paths that cannot be written: refused before any work, in one line
# ---------------------------------------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize(
    "line, out",
    [
        ("plan --policy all -c {tmp}/card.json -o {out}", "/proc/x/plan.json"),
        ("export {tmp}/plan.json --to peft -o {out}", "/proc/x.json"),
        ("compare {tmp}/a.json {tmp}/b.json -o {out}", "/proc/nope.png"),
        ("report {tmp} -o {out}", "/proc/r.html"),
        ("card -m {tmp}/model -o {out}", "/proc/card"),
    ],
)
def test_an_out_that_cannot_be_written_is_refused_first(tmp_path: Path, line: str, out: str) -> None:
    # the inputs do not exist: the output is checked before any of them is read
    r = cli(line.format(tmp=tmp_path, out=out))
    assert one_error_line(r).startswith(f"error: --out {out}: cannot create files in /proc"), r.output


@needs_proc
def test_a_write_that_fails_after_the_work_is_one_line(world: World, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(artifacts, "_check_writable", lambda folder, shown: None)  # let it through
    r = cli(f"plan --policy all -c {world.card} -o /proc/x/plan.json")
    assert one_error_line(r).startswith("error: /proc/x/plan.json: cannot be written"), r.output


def test_a_full_disk_is_one_error_and_leaves_no_temporary(tmp_path: Path) -> None:
    with pytest.raises(LayercardError, match="f.json: cannot be written .No space left"):
        with artifacts.atomic_path(tmp_path / "f.json") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert not list(tmp_path.iterdir())


def test_a_failed_read_inside_a_write_keeps_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with artifacts.atomic_path(tmp_path / "f.json"):
            (tmp_path / "missing").read_text()


def test_a_suffix_hint_keeps_a_file_a_file(world: World, tmp_path: Path) -> None:
    out = tmp_path / "x8.txt"
    line = one_error_line(cli(f"plan --policy all -c {world.card} -o {out}"))
    assert line == f"error: --out {out}: give a file path ending in .json, such as {tmp_path / 'x8.json'}"


# ---------------------------------------------------------------------------------------------------------
# Interruption
# ---------------------------------------------------------------------------------------------------------


def test_an_interrupt_stops_the_bar_before_saying_so(monkeypatch) -> None:
    """The bar of an interrupted loop stays live until its generator is collected; the message must not be
    drawn over by it."""
    from rich.progress import Progress

    from layercard import progress

    app_module = importlib.import_module("layercard.cli.app")  # the package's `app` is the Typer app
    bars: list[Progress] = []
    start = Progress.start
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)  # a bar, as on a terminal
    monkeypatch.setattr(Progress, "start", lambda self: (bars.append(self), start(self))[1])
    live_when_said: list[bool] = []
    said = lambda *a, **k: live_when_said.append(bars[0].live.is_started)  # noqa: E731
    monkeypatch.setattr(app_module.console, "print", said)

    @guard
    def work() -> None:
        it = progress.track(range(5), "work", enabled=True)  # held, as the card probe holds its loop
        for i in it:
            if i == 2:
                raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        work()
    assert e.value.exit_code == 130 and live_when_said == [False]


# ---------------------------------------------------------------------------------------------------------
# What the commands print
# ---------------------------------------------------------------------------------------------------------


def test_plan_json_counts_units_as_n_units(world: World, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    r = cli(f"plan --policy all -c {world.card} -o {out} --json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert "units" not in summary
    assert summary["n_units"] == len(json.loads(out.read_text())["units"]) > 0


def test_frontier_costs_carry_their_units(world: World, tmp_path: Path) -> None:
    r = cli(f"plan -c {world.card} --budget step_time=2x,memory=2x -o {tmp_path / 'p.json'}")
    assert r.exit_code == 0, r.output
    headers = [line for line in r.output.splitlines() if line.startswith("┃")]
    assert any("s/step" in h for h in headers) and any("peak MiB" in h for h in headers), r.output


def test_plan_says_model_options_need_check_model(world: World, tmp_path: Path) -> None:
    r = cli(f"plan --policy all -c {world.card} -o {tmp_path / 'p.json'} --device cuda --json")
    assert r.exit_code == 0, r.output
    assert "note: --device has no effect without --check-model" in r.stderr
    quiet = cli(f"plan --policy all -c {world.card} -o {tmp_path / 'q.json'} --json")
    assert "note:" not in quiet.stderr


def test_results_go_to_stdout_and_notes_to_stderr(world: World, tmp_path: Path) -> None:
    # `layercard plan ... > plan.txt` must keep the plan; a note is no result
    r = cli(f"plan --policy all -c {world.card} -o {tmp_path / 'p.json'} --device cuda")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and "note: --device has no effect" in r.stderr
    assert "note:" not in r.stdout and "wrote" not in r.stderr
    c = cli(["compare", str(world.card), str(world.card)])
    assert c.exit_code == 0, c.output
    assert "Spearman ρ of per-layer resnorm" in c.stdout and not c.stderr.strip()


def test_models_prints_whole_paths_in_a_narrow_pipe(monkeypatch) -> None:
    import layercard.models

    path = "/a/rather/long/cache/folder/of/models/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f"
    row = {"name": "m", "kind": "builtin", "description": "d", "path": path}
    monkeypatch.setattr(layercard.models, "list_models", lambda: [row])
    from typer.testing import CliRunner

    from layercard.cli import app

    r = CliRunner().invoke(app, ["models"], env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.startswith("┃"))
    col = [c.strip() for c in header.split("┃")].index("path")
    cells = [line.split("│")[col].strip() for line in r.output.splitlines() if line.startswith("│")]
    assert "".join(cells) == path, r.output


def test_help_names_what_is_taken_and_written() -> None:
    assert "hub id" in " ".join(cli(["card", "--help"]).output.split())
    assert "trim.png" in " ".join(cli(["trim", "--help"]).output.split())
    plan_help = " ".join(cli(["plan", "--help"]).output.split())
    assert "Device for --check-model" in plan_help and "[default: auto]" in plan_help


def test_trim_says_it_wrote_its_figure(world: World, tmp_path: Path) -> None:
    out = tmp_path / "t"
    r = cli(
        f"trim -m {world.model} -a {world.adapter} -t {FACTS} -o {out} --all-layers --metric loss "
        "--examples 2 --batch-size 2 --device cpu"
    )
    assert r.exit_code == 0, r.output
    assert f"{out / 'trim.png'}" in " ".join(r.output.split()) and (out / "trim.png").is_file()


def test_trim_and_trace_refuse_an_out_inside_the_adapter(world: World, tmp_path: Path) -> None:
    # their files would change the adapter they measure, and be copied into its trimmed export
    for out in (world.adapter, world.adapter / "sub"):
        r = cli(f"trim -m {world.model} -a {world.adapter} -t {FACTS} -o {out} --all-layers --device cpu")
        assert one_error_line(r).startswith(f"error: --out {out}: is the adapter folder"), r.output
        r = cli(f"trace -m {world.model} -a {world.adapter} -t {FACTS} -o {out} --device cpu")
        assert one_error_line(r).startswith(f"error: --out {out}: is the adapter folder"), r.output
    assert not (world.adapter / "sub").exists() and not (world.adapter / "trim.json").exists()


def test_eval_names_the_adapter_option(world: World, tmp_path: Path) -> None:
    empty = tmp_path / "t1"
    empty.mkdir()
    r = cli(f"eval -m {world.model} -t {FACTS} -o {tmp_path / 'e'} -a {empty}")
    assert one_error_line(r).startswith(f"error: --adapter {empty}: not an adapter folder")
    assert not (tmp_path / "e").exists()


def test_count_says_one_without_a_plural() -> None:
    from layercard.progress import count

    assert [count(1, "pass"), count(3, "pass"), count(1, "step"), count(1200, "step")] == [
        "1 pass",
        "3 passes",
        "1 step",
        "1,200 steps",
    ]


def test_progress_without_a_terminal_is_plain_lines_as_it_goes(monkeypatch, capsys) -> None:
    from layercard import progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)  # a log file
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line at every step
    seen = []
    for i in progress.track(range(3), "work", total=3, enabled=True):
        seen.append((i, capsys.readouterr().err.splitlines()))  # said before the loop's next step
    lines = [line.split(" (")[0] for _, out in seen for line in out] + capsys.readouterr().err.splitlines()
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [line.split(" (")[0] for line in lines] == ["work: 0/3", "work: 1/3", "work: 2/3", "work: 3/3"]
    assert "\x1b" not in "".join(lines)  # no control codes in the log


def test_quiet_turns_progress_off_for_the_command(world: World, tmp_path: Path, monkeypatch) -> None:
    from layercard import progress

    monkeypatch.setenv("LAYERCARD_PROGRESS", "1")
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)  # plain progress lines
    # the switch --quiet sets lasts for the process: the test's own copy, so that later tests keep theirs
    monkeypatch.setattr(progress, "_BARS", {"off": False})
    shown = cli(f"card -m {world.model} -t {FACTS} --examples 4 {CARD} -o {tmp_path / 'a'}")
    assert shown.exit_code == 0 and "card pass" in shown.output
    quiet = cli(f"--quiet card -m {world.model} -t {FACTS} --examples 4 {CARD} -o {tmp_path / 'b'}")
    assert quiet.exit_code == 0 and "card pass" not in quiet.output, quiet.output
    assert "wrote" in quiet.output  # what the command wrote still says so
    # --quiet turns off bars and progress lines alone: a warning said under the same switch still shows
    monkeypatch.setattr(progress, "_BARS", {"off": True})
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert list(progress.track(range(2), "work", total=2, enabled=True)) == [0, 1]
        progress.say_progress("work: statistics", enabled=True)
        progress.say("warning: kept", enabled=True)
    assert err.getvalue().strip() == "warning: kept"


def test_the_model_defaults_to_the_base_the_adapter_records(world: World, tmp_path: Path) -> None:
    import shutil

    from bad_world import EVAL

    from layercard.adapters import BASE_FILE
    from layercard.models import load_model

    adapter = tmp_path / "adapter"
    shutil.copytree(world.adapter, adapter)
    base = {"model_id": str(world.model), "model_hash": load_model(str(world.model)).model_hash}
    (adapter / BASE_FILE).write_text(json.dumps(base))
    r = cli(f"eval -a {adapter} -t {FACTS} -o {tmp_path / 'e'} {EVAL} --json")
    assert r.exit_code == 0, r.output
    evaluated = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert evaluated["provenance"]["model_id"] == str(world.model)
    again = cli(f"eval -m {world.model} -t {FACTS} -o {tmp_path / 'e'} {EVAL}")  # the base alone, same folder
    assert again.exit_code == 0 and f"note: {tmp_path / 'e' / 'eval.json'}: replaced the evaluation" in (
        again.output
    )
    # nothing to take it from: said, before anything loads or is written
    for line, why in (
        (f"eval -t {FACTS} -o {tmp_path / 'f'} {EVAL}", "no --adapter"),
        (f"trim -a {world.adapter} -t {FACTS} -o {tmp_path / 'g'}", "the adapter folder records no base"),
    ):
        assert one_error_line(cli(line)) == f"error: --model: required ({why})"
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
    # custom code runs only from a model named on the command line, not from one an artifact names
    said = "error: --trust-remote-code: runs the model folder's own code, so name the model with --model"
    r = cli(f"eval -a {adapter} -t {FACTS} -o {tmp_path / 'h'} {EVAL} --trust-remote-code")
    assert one_error_line(r) == f"{said} (the adapter folder names {str(world.model)!r})"
    assert not (tmp_path / "h").exists()
    r = cli(f"train -p {world.plan} -t {FACTS} -o {tmp_path / 'i'} --steps 1 --trust-remote-code")
    assert one_error_line(r).startswith(f"{said} ({world.plan} names ")
    assert not (tmp_path / "i").exists()


def test_eval_says_when_the_mapped_references_are_not_there(world: World, tmp_path: Path) -> None:
    from bad_world import EVAL

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(4)))
    line = f"eval -m {world.model} -t {data} --field input=q --field target=a --field references=refs"
    r = cli(f"{line} -o {tmp_path / 'e'} {EVAL}")
    assert r.exit_code == 0, r.output
    assert "note: --field references=refs: no evaluated record holds more than its target" in r.output
    data.write_text("".join(json.dumps({"q": "q", "a": "a", "refs": ["a", "b"]}) + "\n" for _ in range(4)))
    r = cli(f"{line} -o {tmp_path / 'f'} {EVAL}")
    assert r.exit_code == 0 and "--field references" not in r.output, r.output


def test_names_are_printed_as_text_not_markup_or_terminal_controls(capsys) -> None:
    """A path is printed as it is: brackets are no markup (``[/x]`` had ended the command), and a terminal
    escape sequence in a name is shown, not obeyed."""
    from layercard import progress

    odd = "runs/[bold]a/[/x]/\x1b]0;title\x07data.jsonl"
    progress.say(f"note: {odd}: cut", enabled=True)
    shown = "runs/[bold]a/[/x]/\\x1b]0;title\\x07data.jsonl"
    assert capsys.readouterr().err.strip() == f"note: {shown}: cut"

    @guard
    def command() -> None:
        raise LayercardError(f"{odd}: not found")

    with pytest.raises(typer.Exit):
        command()
    assert " ".join(capsys.readouterr().err.split()) == f"error: {shown}: not found"
    bar = progress.track(range(2), odd, enabled=True)
    assert list(bar) == [0, 1]  # piped: plain lines, as the terminal's bar takes the same text
    assert shown in capsys.readouterr().err
    from layercard.cli.app import note, warning

    note(f"{odd}: kept")  # export's notes and plan's warnings print through these
    warning(f"{odd}: kept")
    assert capsys.readouterr().err.split("\n")[:2] == [f"note: {shown}: kept", f"warning: {shown}: kept"]


def test_a_task_file_whose_name_looks_like_markup_is_shown_as_named(world: World, tmp_path: Path) -> None:
    from bad_world import EVAL

    data = tmp_path / "qa[bold][red].jsonl"  # as markup, it would print as qa.jsonl
    data.write_text("".join(json.dumps({"input": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(4)))
    r = cli(f"eval -m {world.model} -t {data} -o {tmp_path / 'e'} {EVAL}")
    assert r.exit_code == 0, r.output
    assert "qa[bold][red] (" in " ".join(r.output.split()), r.output  # the table's title: name (split)


def test_windows_is_refused_in_one_line_before_any_work(monkeypatch, tmp_path: Path) -> None:
    """On Windows layercard's locks and folder writes fail part-way: a command says so before any work,
    while its help still shows."""
    import importlib

    from typer.testing import CliRunner

    app_module = importlib.import_module("layercard.cli.app")  # the module: the package's `app` is the app
    monkeypatch.setattr(app_module, "_on_windows", lambda: True)
    r = CliRunner().invoke(app_module.app, ["plan", "--card", str(tmp_path / "card.json"), "--budget",
                                            "params=0.2x", "--out", str(tmp_path / "p.json")])  # fmt: skip
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: layercard runs on Linux and macOS, not on Windows: run it under WSL 2 (Windows Subsystem for "
        "Linux)"
    ]
    assert not list(tmp_path.iterdir())
    assert CliRunner().invoke(app_module.app, ["plan", "--help"]).exit_code == 0


def test_a_command_gives_the_process_its_settings_back(monkeypatch, tmp_path: Path) -> None:
    """A process that runs commands in turn (a notebook, a sweep) keeps its own settings: after --quiet
    progress shows again, and the command's warning filter, hub variable and stream error handlers go."""
    import importlib
    import os
    import warnings

    from typer.testing import CliRunner

    from layercard import progress

    app_module = importlib.import_module("layercard.cli.app")
    monkeypatch.setattr(progress, "_BARS", {"off": False})
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with warnings.catch_warnings():
        before = list(warnings.filters)
        seen = {}

        def probe() -> None:  # what the command itself runs under
            seen.update(off=progress.bars_are_off(), hub=os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))

        monkeypatch.setattr(app_module, "_check_system", probe)
        line = ["--quiet", "plan", "--card", str(tmp_path / "none.json"), "--budget", "params=0.2x",
                "--out", str(tmp_path / "p.json")]  # fmt: skip
        r = CliRunner().invoke(app_module.app, line)
        assert r.exit_code == 2  # a failed command gives them back too
        assert seen == {"off": True, "hub": "1"}
        assert not progress.bars_are_off()
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        assert [f for f in warnings.filters if app_module._ours(f)] == [
            f for f in before if app_module._ours(f)
        ]
