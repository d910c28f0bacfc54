"""The Typer app and what every command shares: one-line errors, JSON output, model loading."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer import _click  # typer's own copy of click
from typer._click import exceptions as _click_exceptions
from typer._click import globals as _click_globals

from layercard.errors import LayercardError, first_line
from layercard.progress import bars_off, fewer_examples, hide_library_deprecations, printable

# click before 8.2 shows the help of `layercard` alone without an exception (an empty tuple catches nothing)
_NO_ARGS_HELP = getattr(_click_exceptions, "NoArgsIsHelpError", ())


class _UsageLine(_click.ClickException):
    """A usage error (an unknown option or command, a value of the wrong type) shown as one line."""

    exit_code = 2

    def __init__(self, error: Exception, command_path: str | None) -> None:
        text = " ".join(error.format_message().split())  # click's message, its suggestion included
        if command_path:
            text += f" (see {command_path} --help)"
        super().__init__(text)

    def show(self, file: Any = None) -> None:
        console.print(f"[bold red]error:[/] {plain(self.message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _one_line_usage(ctx: Any) -> Iterator[None]:
    try:
        yield
    except _NO_ARGS_HELP:
        raise  # `layercard` alone: the help screen
    except _click_exceptions.UsageError as e:
        where = e.ctx if e.ctx is not None else ctx
        raise _UsageLine(e, where.command_path if where is not None else None) from None


def _empty_path(command: Any, args: list[str]) -> str | None:
    """The path option (or argument) given as an empty string in ``args``, if any: the command would read
    it as ``.``, the current folder, and write there."""

    def is_path(p: Any) -> bool:
        return getattr(getattr(p, "type_descriptor", None), "annotation", None) is Path

    def takes_value(p: Any) -> bool:
        return not (getattr(p, "is_flag", False) or getattr(p, "count", False))

    options = [p for p in command.params if any(o.startswith("-") for o in p.opts)]
    path_opts = {o for p in options if is_path(p) for o in p.opts}
    value_opts = {o for p in options if takes_value(p) for o in p.opts}
    path_args = [p.name for p in command.params if is_path(p) and p not in options]
    before = ""
    for i, a in enumerate(args):
        if a == "--":
            rest = args[i + 1 :]
            return path_args[0] if path_args and "" in rest else None
        opt, eq, value = a.partition("=")
        if eq and opt in path_opts and not value:
            return opt
        if a == "" and before in path_opts:
            return before
        if a == "" and before not in value_opts and path_args:
            return path_args[0]
        before = a
    return None


class _Group(typer.core.TyperGroup):
    """The command group, taking ``--debug`` after the command too (``layercard card ... --debug``), and
    saying a usage error in one line, as every other error is said."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]
        name = next((a for a in args if not a.startswith("-")), None)
        command = self.get_command(ctx, name) if name else None
        if command is not None:
            empty = _empty_path(command, args[args.index(name) + 1 :])
            if empty:
                where = f"{ctx.command_path} {name}"
                raise _click_exceptions.UsageError(
                    f"{name} {empty}: is empty; give a path (see {where} --help)"
                )
        return super().parse_args(ctx, args)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _one_line_usage(parent):  # the group's own options
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage(ctx):  # an unknown command; a command's options
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="layercard",
    help="Decide where parameter-efficient adapters go in an LLM, and prove the choice with measurements.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


# Errors, notes, warnings and progress go to stderr; what a command found or wrote goes to stdout, so that
# `layercard plan ... > plan.txt` keeps it (with --json, stdout carries the JSON alone).
# Where the stream is no terminal (a file, a pipe) and COLUMNS says no width, rich would wrap at 80 columns,
# splitting paths and table cells: such output is laid out 200 wide instead.
def _width(stream: Any) -> int | None:
    """The width to lay out at: the terminal's, or ``$COLUMNS`` where it gives one (rich reads both), else
    200 for a file or pipe. rich takes a ``$COLUMNS`` of digits as it is, and 0 hides every line: one under
    20 is passed over; one that is not a number rich passes over itself."""
    tty = getattr(stream, "isatty", None)
    terminal = tty is not None and tty()
    columns = os.environ.get("COLUMNS") or ""
    width = int(columns) if columns.isdigit() else None
    if width is not None and width < 20:
        return 80 if terminal else 200
    return None if terminal or width is not None else 200


console = Console(stderr=True, emoji=False, width=_width(sys.stderr))
result_console = Console(emoji=False, width=_width(sys.stdout))
_STATE = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: Python's, torch's on a GPU, or torch's CPU allocator's
    (a RuntimeError)."""
    torch = sys.modules.get("torch")  # loaded where a tensor was; not imported for this
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(e, MemoryError) or (oom is not None and isinstance(e, oom)):
        return True
    # torch's CPU allocator words it either way, by version and by where it failed
    return isinstance(e, RuntimeError) and any(
        said in str(e) for said in ("can't allocate memory", "not enough memory")
    )


def guard(fn: F) -> F:
    """Known failures become one line on stderr and a non-zero exit; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_system()
            return fn(*args, **kwargs)
        except LayercardError as e:
            if _STATE["debug"]:
                traceback.print_exc()
            console.print(f"[bold red]error:[/] {plain(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            from layercard.progress import stop_bars

            stop_bars()  # a live bar would print over the message, then draw itself again below it
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # an unexpected failure: still one line unless debugging
            if isinstance(e, BrokenPipeError):
                # the reader of the output left (`| head -1`): quietly, as a command killed by SIGPIPE
                # would, the output pointed elsewhere so that the flush at exit does not fail again
                _output_gone()
                raise typer.Exit(141) from None
            if isinstance(e, OSError) and e.filename is None and e.errno in (errno.ENOSPC, errno.EFBIG):
                # a write that names no file is the output itself (`> /dev/full`); files are named
                _output_gone()
                why = plain(e.strerror or str(e))
                console.print(f"[bold red]error:[/] the output cannot be written ({why})")
                raise typer.Exit(1) from None
            if _STATE["debug"]:
                traceback.print_exc()
            elif _out_of_memory(e):
                console.print(
                    f"[bold red]error:[/] out of memory ({plain(first_line(e))}); a smaller "
                    "batch, max length or rank needs less (a plan under --budget memory=… keeps to a figure)",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                console.print(
                    f"[bold red]internal error:[/] {plain(first_line(e))} "
                    "(run with --debug for the traceback)",
                    highlight=False,
                    soft_wrap=True,
                )
            raise typer.Exit(1) from None

    # The help screen keeps a docstring's line breaks; a paragraph should wrap to the terminal instead.
    wrapper.__doc__ = _reflow(fn.__doc__)
    return wrapper  # type: ignore[return-value]


def _on_windows() -> bool:
    return os.name == "nt"


def _check_system() -> None:
    """Refuse, before any work, a system layercard does not run on: on Windows its folder locks, atomic
    folder writes and the built-in model's link fail part-way through a command."""
    if _on_windows():
        raise LayercardError(
            "layercard runs on Linux and macOS, not on Windows: run it under WSL 2 (Windows Subsystem for "
            "Linux)"
        )


def _output_gone() -> None:
    """Point standard output at nothing, so that the interpreter's flush at exit raises no second error."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _reflow(doc: str | None) -> str | None:
    """``doc`` with each paragraph's lines joined into one."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in par.splitlines()) for par in paragraphs)


def _print_version(value: bool) -> None:
    if value:
        from layercard import __version__

        typer.echo(f"layercard {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress bars or progress lines; notes, warnings and errors still show.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    _STATE["debug"] = debug
    # The settings below are the command's: a process that runs commands in turn (a notebook, a sweep
    # calling the app) gets its own back when each ends, whether it succeeded or not.
    ctx.call_on_close(_restore_process_settings(_process_settings()))
    _printable_anywhere()
    bars_off(quiet)  # bars and progress lines only: notes and warnings that share their switch still show
    hide_library_deprecations()
    # layercard draws its own bars; the libraries' (a save's "Writing model shards") only add noise. Read
    # when transformers is imported, which the commands do after this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _process_settings() -> dict[str, Any]:
    """What a command changes of the process: the progress switch, the warning filters, the hub's
    progress-bar variable and the output streams' error handlers."""
    from layercard.progress import bars_are_off

    return {
        "bars_off": bars_are_off(),
        "filters": list(warnings.filters),
        "hub_bars": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"),
        "errors": [getattr(stream, "errors", None) for stream in (sys.stdout, sys.stderr)],
    }


def _restore_process_settings(saved: dict[str, Any]) -> Callable[[], None]:
    def restore() -> None:
        bars_off(saved["bars_off"])
        # the filter the command added, not those the libraries it imported added for themselves
        warnings.filters[:] = [f for f in warnings.filters if f in saved["filters"] or not _ours(f)]
        if saved["hub_bars"] is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved["hub_bars"]
        for stream, errors in zip((sys.stdout, sys.stderr), saved["errors"], strict=True):
            if (
                errors
                and getattr(stream, "errors", errors) != errors
                and callable(getattr(stream, "reconfigure", None))
            ):
                with contextlib.suppress(ValueError, OSError):
                    stream.reconfigure(errors=errors)

    return restore


def _ours(entry: tuple[Any, ...]) -> bool:
    """Whether a warning filter is the one :func:`layercard.progress.hide_library_deprecations` adds."""
    from layercard.progress import HIDDEN_DEPRECATION

    message = entry[1]
    return getattr(message, "pattern", message) == HIDDEN_DEPRECATION


def _printable_anywhere() -> None:
    """Let a console whose encoding lacks a character print a stand-in for it (a Latin-1 or ASCII locale
    and the tables' ρ, ±, ▶) rather than fail after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and callable(getattr(stream, "reconfigure", None)):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="replace")


# Options that every model-loading command shares.
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps (auto: cuda if present).")]
TrustOpt = Annotated[bool, typer.Option(help="Allow the model's own code from its folder (off by default).")]
AdapterModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Base model: built-in name (smollm2), local folder, .gguf file, or a hub id in the local "
        "Hugging Face cache (default: the base a LoRA adapter folder records).",
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Built-in name (smollm2), local folder, .gguf file, or a hub id already in the local Hugging "
        "Face cache.",
    ),
]


def plain(text: object) -> str:
    """``text`` for a rich string that also holds markup: its brackets read as text, its controls shown
    (:func:`printable`); for names and paths in titles and cells."""
    return escape(printable(str(text)))


def note(text: str) -> None:
    """One line on stderr about something the user may not expect (not an error)."""
    console.print(f"[yellow]note:[/] {plain(text)}", highlight=False, soft_wrap=True)


def warning(text: str) -> None:
    """One line on stderr about something that may make a result other than the user meant."""
    console.print(f"[yellow]warning:[/] {plain(text)}", highlight=False, soft_wrap=True)


def note_replaced(file: Path, what: str, earlier: bool) -> None:
    """Say that ``file`` replaced an ``earlier`` one (whether the folder held it before the work): perhaps
    the ``what`` of another model, adapter or task."""
    if earlier:
        note(f"{file}: replaced the {what} the folder held before")


def given(name: str) -> bool:
    """Whether the running command's option ``name`` (its parameter name) was given on the command line or
    through the environment, even at its default value."""
    ctx = _click_globals.get_current_context(silent=True)
    if ctx is None:
        return False
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def outside_live_runs(path: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output inside the folder of a run another process is running: its
    stages would read what this command writes as their own, or replace it."""
    from layercard.artifacts import lock_held
    from layercard.run_layout import RUN_FILE

    full = Path(os.path.realpath(path))
    for folder in (full, *full.parents):
        if (folder / RUN_FILE).is_file() and lock_held(folder):
            raise LayercardError(
                f"{what} {path}: lies inside the run folder {folder}, which another layercard process is "
                "running; wait for it to finish or choose another output (nothing was written)"
            )


def out_folder(path: Path, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be one or cannot be made
    (:func:`layercard.artifacts.check_out_folder`), or that lies inside a live run's folder
    (:func:`outside_live_runs`); the folder as a path."""
    from layercard.artifacts import check_out_folder

    folder = check_out_folder(path, what)
    outside_live_runs(folder, what)
    return folder


def check_adapter(adapter: Path) -> None:
    """Refuse, before anything loads, an ``--adapter`` that is no adapter folder, naming the option."""
    from layercard.adapters import CONFIG_FILE, PEFT_CONFIG_FILE

    if not adapter.is_dir():
        what = "is a file, not an adapter folder" if adapter.exists() else "no such folder"
        raise LayercardError(f"--adapter {adapter}: {what}")
    if not (adapter / PEFT_CONFIG_FILE).is_file() and not (adapter / CONFIG_FILE).is_file():
        raise LayercardError(
            f"--adapter {adapter}: not an adapter folder (no {PEFT_CONFIG_FILE} or {CONFIG_FILE})"
        )


def note_unused(option: str, why: str) -> None:
    """Say that ``option``, given, has no effect (``why``: the reason, e.g. "without --check-model")."""
    note(f"{option} has no effect {why}")


def note_task(task: Any) -> None:
    """Say so when a task's prompts give no instruction (:meth:`layercard.tasks.Task.prompt_note`), and
    when it is one shard of a split read alone (:meth:`layercard.tasks.Task.shard_note`)."""
    for text in (task.prompt_note(), task.shard_note()):
        if text:
            note(text)


def trained_task(adapter: Path) -> dict | None:
    """The task record of the training beside ``adapter`` (its ``train_metrics.json``), or None."""
    record = adapter.parent / "train_metrics.json"
    try:
        task = json.loads(record.read_text(encoding="utf-8"))["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no training record beside the adapter: nothing to compare
    return task if isinstance(task, dict) else None


def other_generation(trained: dict | None, source: str) -> str | None:
    """A note where the adapter whose training recorded the task ``trained`` (:func:`trained_task`) was
    trained on a synthetic task generated otherwise (another seed) than the one to be scored: its test
    split then asks about entities the training never saw."""
    if trained is None or "source" not in trained:
        return None
    trained = str(trained["source"])
    same_task = trained.split("(")[0] == source.split("(")[0]
    if not (source.startswith("synthetic:") and same_task and trained != source):
        return None
    return (
        f"the adapter was trained on {trained}, and this task is {source}: generated otherwise, it asks "
        "about other entities (pass the training's --seed)"
    )


def other_prompt(trained: dict | None, task: Any) -> str | None:
    """A note where the adapter whose training recorded the task ``trained`` (:func:`trained_task`) was
    trained on a task of the same format as ``task`` under other prompt settings (a ``--prompt``,
    ``--system``, ``--chat-template`` or ``--train-turns`` given to one command and not the other): the
    scores are then for prompts, or replies, other than the trained ones."""
    from layercard.tasks.prompt import prompt_changes  # light: no tokenizer or torch behind it

    fmt = trained.get("format") if trained is not None else None
    if not isinstance(fmt, dict) or fmt.get("name") != task.format.name:
        return None  # another kind of task: its prompts differ by design
    changed = prompt_changes(trained.get("prompt"), task.format.prompt())
    if not changed:
        return None
    return (
        f"the adapter was trained with other prompt settings than this task's ({'; '.join(changed)}); "
        "give the training's options to score it on what it was trained for"
    )


def trained_examples(trained: dict | None, task: Any) -> str | None:
    """A note where ``task`` holds the examples the adapter was trained on (its training recorded the task
    ``trained``, :func:`trained_task`): the same data, or the same split of the same source."""
    if trained is None:
        return None
    same_data = trained.get("data_hash") == task.data_hash
    same_split = (trained.get("source"), trained.get("split")) == (task.source, task.split)
    if not (same_data or same_split):
        return None
    return (
        f"the adapter was trained on this split ({task.split} of {task.name}): its scores on the examples "
        "it learned flatter it; score a split it did not train on"
    )


def note_generation(adapter: Path | None, task: Any) -> None:
    """Say so when ``adapter`` was trained on these examples, on another generation of the synthetic task
    to be scored, or under other prompt settings."""
    if adapter is None:
        return
    trained = trained_task(adapter)
    for said in (
        trained_examples(trained, task),
        other_generation(trained, task.source),
        other_prompt(trained, task),
    ):
        if said:
            note(said)


def note_examples(option: str, asked: int | None, used: int) -> None:
    """Say so when ``option`` asked for more examples than the task has (all of them were used)."""
    if asked is not None and used < asked:
        note(fewer_examples(f"{option} ", asked, used))


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


def resolve_device(device: str) -> str:
    """The torch device name for ``--device`` (``auto`` -> cuda when available, else cpu)."""
    from layercard import models  # imported here: torch makes `layercard --help` slow

    return str(models.resolve_device(device))


def adapter_model(model: str | None, adapter: Path | None, trust_remote_code: bool = False) -> str:
    """``--model``, else the base model ``adapter``'s folder records (its hash is checked when attached)."""
    if model is not None:
        return model
    from layercard.adapters import recorded_base

    base = recorded_base(adapter) if adapter is not None and adapter.is_dir() else None
    if base is None:
        where = "the adapter folder records no base" if adapter is not None else "no --adapter"
        raise LayercardError(f"--model: required ({where})")
    return named_for_code(base, "the adapter folder", trust_remote_code)


def named_for_code(model: str, source: str, trust_remote_code: bool) -> str:
    """``model``, taken from an artifact (``source`` names it), unless custom code is to run: the code of a
    model only an artifact names would run before its weights' hash could be checked."""
    if trust_remote_code:
        raise LayercardError(
            f"--trust-remote-code: runs the model folder's own code, so name the model with --model "
            f"({source} names {model!r})"
        )
    return model


def load_cli_model(model: str, dtype: str, device: str, trust_remote_code: bool):
    from layercard.models import load_model

    return load_model(model, dtype=dtype, device=resolve_device(device), trust_remote_code=trust_remote_code)


def progress_flag(json_out: bool) -> bool | None:
    """Whether a command shows progress: not under --json; else as LAYERCARD_PROGRESS says (--quiet turns
    the bars off in :mod:`layercard.progress` itself)."""
    return False if json_out else None
