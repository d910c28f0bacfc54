"""Options shared by every command that loads a task: the field map and the prompt settings.

:func:`task_options` gives a command ``--field``, ``--prompt``, ``--system``,
``--chat-template/--no-chat-template`` and ``--train-turns`` and hands it ``task_kw``: the keywords of
``layercard.tasks.load_task`` they stand for, checked before anything loads::

    @app.command("card")
    @guard
    @task_options
    def card_cmd(task: str, ..., task_kw: dict | None = None) -> None:
        t = load_task(task, split=split, seed=seed, **task_kw)

In ``--prompt`` and ``--system`` text, ``\\n`` and ``\\t`` stand for a newline and a tab (a shell
passes them literally); text read from ``@FILE`` is taken as it is.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from layercard.config.run import parse_fields
from layercard.config.schema import ConfigError
from layercard.tasks.presets import TRAIN_TURNS

__all__ = [
    "SPLIT_HELP",
    "TASK_HELP",
    "ChatTemplateOpt",
    "FieldOpt",
    "PromptOpt",
    "SystemOpt",
    "TaskOpt",
    "TrainTurnsOpt",
    "task_kwargs",
    "task_options",
]

F = TypeVar("F", bound=Callable[..., Any])

# Every form load_task reads (layercard.tasks.data), so that --help is where a user learns them.
TASK_HELP = (
    "Data file (JSONL, JSON, CSV, TSV or Parquet), folder of one such file a split (train.jsonl, "
    "test.jsonl) or saved by datasets' save_to_disk (FOLDER[:SPLIT]), "
    "PRESET[:SPLIT] (e2e_nlg, gsm8k, samsum, sst2; e2e_nlg:validation), synthetic:facts / "
    "synthetic:format, or hf:NAME[:CONFIG] (from the local Hugging Face cache)."
)
# The part of every --split help that a file's user needs: a file is one split, and another is refused.
SPLIT_HELP = "A single file has no splits: give the other split's file instead."
TaskOpt = Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)]

FieldOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--field",
        help="Read a field from another column: NAME=COLUMN (input=question, target=answer, "
        "instruction=..., output=..., messages=..., text=...); repeat for several.",
    ),
]
PromptOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt", help="Prompt template with {input}, or @FILE (\\n is a newline); default: the preset's."
    ),
]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System prompt, or @FILE.")]
ChatTemplateOpt = Annotated[
    bool | None,
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Render prompts with the model's chat template (default: on; off for plain-text data).",
    ),
]

TrainTurnsOpt = Annotated[
    str | None,
    typer.Option(
        "--train-turns",
        help="Chat data: the assistant turns that carry loss, all or last (the final reply alone; "
        "the earlier ones are context). Default: all.",
    ),
]

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _unescape(text: str) -> str:
    if text.startswith("@"):
        return text
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def task_kwargs(
    field: list[str] | None = None,
    prompt: str | None = None,
    system: str | None = None,
    chat_template: bool | None = None,
    train_turns: str | None = None,
) -> dict[str, Any]:
    """The ``load_task`` keywords of the task options (unset ones left out); a bad ``--field`` fails here."""
    kw: dict[str, Any] = {}
    if field:
        try:
            kw["field_map"] = parse_fields(list(field), "--field")
        except ConfigError as e:
            raise ConfigError("--field", e.problem) from None
    if prompt is not None:
        kw["prompt"] = _unescape(prompt)
    if system is not None:
        kw["system"] = _unescape(system)
    if chat_template is not None:
        kw["chat_template"] = chat_template
    if train_turns is not None:
        if train_turns not in TRAIN_TURNS:
            choices = ", ".join(TRAIN_TURNS)
            raise ConfigError("--train-turns", f"must be one of {choices}, got {train_turns!r}")
        kw["train_turns"] = train_turns
    return kw


_OPTIONS = {
    "field": FieldOpt,
    "prompt": PromptOpt,
    "system": SystemOpt,
    "chat_template": ChatTemplateOpt,
    "train_turns": TrainTurnsOpt,
}


def task_options(fn: F) -> F:
    """Decorate a command so it takes the task options and receives them as ``task_kw`` (a dict)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "task_kw"]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in _OPTIONS.items()
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in _OPTIONS}
        return fn(**kwargs, task_kw=task_kwargs(**values))

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]
