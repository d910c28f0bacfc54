"""The exception the CLI turns into a one-line error, and how errors name arguments and settings."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar


class LayercardError(Exception):
    """A known failure with a one-line message naming the file, field or value at fault."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MissingSplit(LayercardError):
    """A task has no split of the name asked for (a held-out lookup then tries the next one)."""


def stop_as_interrupted(_signum: int, _frame: object) -> None:
    """The command line's SIGTERM handler: a job scheduler's stop or a ``kill`` unwinds as a Ctrl-C does
    (temporaries removed, locks released, one line); training holds it to the end of a step as it holds a
    Ctrl-C."""
    raise KeyboardInterrupt


def message_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name where it has none: a library's
    error quoted inside one of ours, which must stay one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def first_line(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def expect(
    where: str, name: str, value: object, kind: type | tuple[type, ...], hint: str = "", *, wanted: str = ""
) -> None:
    """Refuse an argument of a public function that is not of ``kind``, in one line naming the function,
    the argument, what it takes (``wanted``, else the types) and what it got: an attribute error deep
    inside the stage would name neither."""
    if isinstance(value, kind):
        return
    if not wanted:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        names = ["None" if k is type(None) else k.__name__ for k in kinds]
        wanted = " or ".join(n if n == "None" else ("an " if n[0] in "AEIOU" else "a ") + n for n in names)
    raise LayercardError(
        f"{where}: {name} must be {wanted}, got {type(value).__name__}" + (f"; {hint}" if hint else "")
    )


# The section of a run config whose settings the work in progress reads, within `layercard run`.
_RUN_SECTION: ContextVar[str | None] = ContextVar("layercard_run_section", default=None)


def setting_name(key: str, flag: str | None = None) -> str:
    """How a message names setting ``key`` (``max_length``) for the user to change: the command's flag
    (``flag``, else ``--max-length``), or within :func:`run_section` the key of the run config
    (``train.max_length``)."""
    section = _RUN_SECTION.get()
    if section is not None:
        return f"{section}.{key}"
    return flag if flag is not None else "--" + key.replace("_", "-")


def setting_text(key: str, value: object, flag: str | None = None) -> str:
    """How a message says to set ``key`` to ``value``: ```--depth all``` from a command, or within
    :func:`run_section` the run config's key and value (```placements[recommend].depth: all```)."""
    name = setting_name(key, flag)
    return f"`{name}: {value}`" if _RUN_SECTION.get() is not None else f"`{name} {value}`"


def card_setting_text(key: str, value: object = None) -> str:
    """How a message says to measure the card again with setting ``key`` (to ``value``; a switch where
    None): ```layercard card --roles q,v``` from a command, ```card.roles: q,v``` within a run, whose card
    stage reads it from the run config."""
    if _RUN_SECTION.get() is not None:
        return f"`card.{key}: {'true' if value is None else value}`"
    flag = "--" + key.replace("_", "-")
    return f"`layercard card {flag}`" if value is None else f"`layercard card {flag} {value}`"


@contextlib.contextmanager
def run_section(section: str) -> Iterator[None]:
    """Within it, messages name settings as keys of the run config's ``section`` (:func:`setting_name`):
    a run reads them from its YAML, where no flag was given."""
    token = _RUN_SECTION.set(section)
    try:
        yield
    finally:
        _RUN_SECTION.reset(token)
