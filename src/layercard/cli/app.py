"""The Typer app and what every command shares: one-line errors, JSON output, model loading."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from layercard.errors import LayercardError


class _Group(typer.core.TyperGroup):
    """The command group, taking ``--debug`` after the command too (``layercard card ... --debug``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_Group,
    name="layercard",
    help="Decide where parameter-efficient adapters go in an LLM, and prove the choice with measurements.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
console = Console(stderr=True, emoji=False)
_STATE = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def guard(fn: F) -> F:
    """Known failures become one line on stderr and a non-zero exit; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LayercardError as e:
            if _STATE["debug"]:
                traceback.print_exc()
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # an unexpected failure: still one line unless debugging
            if _STATE["debug"]:
                traceback.print_exc()
            else:
                msg = str(e).splitlines()[0] if str(e) else ""
                console.print(
                    f"[bold red]internal error:[/] {type(e).__name__}: {escape(msg)} "
                    "(run with --debug for the traceback)",
                    highlight=False,
                    soft_wrap=True,
                )
            raise typer.Exit(1) from None

    # The help screen keeps a docstring's line breaks; a paragraph should wrap to the terminal instead.
    wrapper.__doc__ = _reflow(fn.__doc__)
    return wrapper  # type: ignore[return-value]


def _reflow(doc: str | None) -> str | None:
    """``doc`` with each paragraph's lines joined into one."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in par.splitlines()) for par in paragraphs)


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
) -> None:
    _STATE["debug"] = debug
    # PEFT still calls a transformers attribute deprecated in v5; the message says nothing to our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# Options that every model-loading command shares.
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps (auto: cuda if present).")]
TrustOpt = Annotated[bool, typer.Option(help="Allow the model's own code from its folder (off by default).")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Built-in name (smollm2), local folder, .gguf file.")
]


def note(text: str) -> None:
    """One line on stderr about something the user may not expect (not an error)."""
    console.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)


def note_task(task: Any) -> None:
    """Say so when a task's prompts give no instruction (:meth:`layercard.tasks.Task.prompt_note`)."""
    text = task.prompt_note()
    if text:
        note(text)


def other_generation(adapter: Path, source: str) -> str | None:
    """A note where ``adapter`` was trained on a synthetic task generated otherwise (another seed) than
    the one to be scored: its test split then asks about entities the training never saw."""
    import json

    record = adapter.parent / "train_metrics.json"
    try:
        trained = str(json.loads(record.read_text())["task"]["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no training record beside the adapter: nothing to compare
    same_task = trained.split("(")[0] == source.split("(")[0]
    if not (source.startswith("synthetic:") and same_task and trained != source):
        return None
    return (
        f"the adapter was trained on {trained}, and this task is {source}: generated otherwise, it asks "
        "about other entities (pass the training's --seed)"
    )


def note_generation(adapter: Path | None, source: str) -> None:
    """Say so when ``adapter`` was trained on another generation of the synthetic task to be scored."""
    if adapter is not None and (said := other_generation(adapter, source)):
        note(said)


def note_examples(option: str, asked: int | None, used: int) -> None:
    """Say so when ``option`` asked for more examples than the task has (all of them were used)."""
    if asked is not None and used < asked:
        note(f"{option} {asked}: the task has {used} examples; all {used} were used")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


def resolve_device(device: str) -> str:
    """The torch device name for ``--device`` (``auto`` -> cuda when available, else cpu)."""
    from layercard import models  # imported here: torch makes `layercard --help` slow

    return str(models.resolve_device(device))


def load_cli_model(model: str, dtype: str, device: str, trust_remote_code: bool):
    from layercard.models import load_model

    return load_model(model, dtype=dtype, device=resolve_device(device), trust_remote_code=trust_remote_code)


def progress_flag(json_out: bool) -> bool | None:
    return False if json_out else None
