"""Prompt settings: a template with ``{input}``, a system prompt, the chat template on or off, and
which assistant turns of chat data carry loss.

They come from :func:`layercard.tasks.load_task` (``prompt=``, ``system=``, ``chat_template=``,
``train_turns=``), the command line (``--prompt``, ``--system``, ``--chat-template/--no-chat-template``,
``--train-turns``) or a run config (``task.prompt``, ``task.system``, ``task.chat_template``,
``task.train_turns``), and replace the preset's wording in the task's :class:`TaskFormat`. A value
starting with ``@`` is read from that file (UTF-8). Outer whitespace is dropped (a run config's text
settings drop it too, so both give the same prompt).
``Task.data_hash`` covers a prompt that differs from its preset's, so a card measured under one
prompt is never taken for one measured under another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError
from layercard.tasks.presets import TRAIN_TURNS, TaskFormat

__all__ = ["apply_prompt", "prompt_changes", "read_setting"]


def read_setting(value: str, what: str) -> str:
    """``value`` itself, or the text of the file it names as ``@PATH``; errors name ``what``."""
    if not isinstance(value, str):
        raise LayercardError(f"{what}: must be a string, got {type(value).__name__}")
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise LayercardError(f"{what}: {value!r}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LayercardError(f"{what}: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def apply_prompt(
    fmt: TaskFormat,
    *,
    prompt: str | None = None,
    system: str | None = None,
    chat_template: bool | None = None,
    train_turns: str | None = None,
) -> TaskFormat:
    """``fmt`` with the given prompt settings (``None`` keeps the format's own)."""
    if train_turns is not None and train_turns not in TRAIN_TURNS:
        raise LayercardError(f"train_turns: must be one of {', '.join(TRAIN_TURNS)}, got {train_turns!r}")
    if fmt.completion:
        given = [n for n, v in (("prompt", prompt), ("system", system)) if v is not None]
        given += ["train_turns"] if train_turns not in (None, "all") else []
        if given or chat_template:
            what = given[0] if given else "chat_template"
            raise LayercardError(
                f"{what}: plain-text data has no prompt (the loss covers the whole text); leave it out"
            )
        return fmt
    changes: dict[str, object] = {}
    if prompt is not None:
        template = read_setting(prompt, "prompt").strip()
        if "{input}" not in template:
            raise LayercardError(
                f"prompt: {_short(template)} has no {{input}} placeholder (where each example's input goes)"
            )
        changes["instruction"] = template
    if system is not None:
        text = read_setting(system, "system").strip()
        if not text:
            raise LayercardError("system: is empty; leave it out for no system prompt")
        changes["system"] = text
    if chat_template is not None:
        if not isinstance(chat_template, bool):
            raise LayercardError(f"chat_template: must be true or false, got {chat_template!r}")
        changes["chat_template"] = chat_template
    if train_turns is not None and train_turns != fmt.train_turns:
        changes["train_turns"] = train_turns
    return dataclasses.replace(fmt, **changes) if changes else fmt


def _setting(key: str, value: Any) -> str:
    if key == "chat_template":
        return "on" if value else "off"
    if key == "system" and not value:
        return "none"
    return _short(value) if key in ("template", "system") else str(value)


_SETTING_NAMES = {
    "template": "prompt template",
    "system": "system prompt",
    "chat_template": "chat template",
    "train_turns": "train_turns",
}


def prompt_changes(recorded: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """The prompt settings (``TaskFormat.prompt()``) in which ``now`` differs from ``recorded``, each as
    ``"<setting> <recorded value>, here <now's>"``; empty where they agree or nothing was recorded.

    A setting an older record lacks is not compared, except ``train_turns``, which a record leaves out
    where it is ``all``.
    """
    if not isinstance(recorded, Mapping):
        return []
    out = []
    for key, name in _SETTING_NAMES.items():
        default = "all" if key == "train_turns" else None
        if key not in recorded and default is None:
            continue
        there, here = recorded.get(key, default), now.get(key, default)
        if there != here:
            out.append(f"{name} {_setting(key, there)}, here {_setting(key, here)}")
    return out
