"""Conversations as text segments: what the chat template writes around each assistant turn.

A multi-turn example is encoded segment by segment (``layercard.tasks.encode``): the text between
assistant replies carries no loss, each reply's content does, followed by the turn-end token. The
segments are cut out of the template's own renderings of the growing conversation: the text before
reply *i* is ``render(turns[:i], add_generation_prompt=True)``, the reply is what
``render(turns[:i+1])`` adds up to the turn-end token. This needs a template that renders earlier
turns the same whether or not later turns follow; one that does not is an error, never a wrong mask.

Without a chat template (switched off, or a tokenizer without one) the layout is the single-turn one
repeated: ``system\\n\\n`` once, each user turn and ``\\n``, each reply and the end token.

A chat record's ``tools`` (tool definitions) go to the chat template with every rendering, so each
segment sees them as the template writes them; without a chat template they are not written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from layercard.errors import LayercardError
from layercard.tasks.example import Example
from layercard.tasks.presets import TaskFormat

__all__ = [
    "chat_segments",
    "conversation",
    "has_chat_template",
    "render_chat",
    "tool_definitions",
    "uses_chat_template",
]

Turn = tuple[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, fmt: TaskFormat) -> bool:
    """Whether prompts are rendered with the chat template: the format wants it and the tokenizer has one."""
    return fmt.chat_template and has_chat_template(tokenizer)


def tool_definitions(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A chat record's ``tools`` as chat templates take them: a list of tool definitions (JSON objects),
    given as such or as the JSON text of one (ShareGPT keeps them as text); None where it has none
    (absent, null, blank, an empty list). Anything else is an error that starts with ``where``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LayercardError(f"{where}: not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise LayercardError(f"{where}: must be a list of tool definitions (JSON objects), got {value!r:.80}")
    return [dict(t) for t in value] or None


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The chat template's text of ``messages``; ``tools`` go to the template, which writes them where
    its model expects them, or leaves them out."""
    kw = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **kw
    )
    if not isinstance(out, str):  # some versions return a list for batched input
        raise LayercardError(f"chat template returned {type(out).__name__}, expected a string")
    return out


def conversation(fmt: TaskFormat, ex: Example) -> list[Turn]:
    """The example's turns as the model sees them: the format's template around every user turn and
    its system prompt when the conversation brings none."""
    assert ex.messages is not None
    turns = [(r, fmt.render_instruction(c) if r == "user" else c) for r, c in ex.messages]
    if fmt.system and turns[0][0] != "system":
        turns.insert(0, ("system", fmt.system))
    return turns


def _messages(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def _accepted(
    tokenizer: Any, turns: list[Turn], ex_id: str, tools: list[dict[str, Any]] | None
) -> list[Turn]:
    """``turns``, with a system turn folded into the first user turn if the template refuses one."""
    try:
        render_chat(tokenizer, _messages(turns), generation_prompt=False, tools=tools)
        return turns
    except Exception as e:  # e.g. Gemma's template refuses a system turn, as build_prompt handles it
        if turns[0][0] != "system":
            raise LayercardError(f"example {ex_id!r}: chat template failed: {e}") from None
    folded = [(turns[1][0], f"{turns[0][1]}\n\n{turns[1][1]}"), *turns[2:]]
    try:
        render_chat(tokenizer, _messages(folded), generation_prompt=False, tools=tools)
    except Exception as e:
        raise LayercardError(f"example {ex_id!r}: chat template failed: {e}") from None
    return folded


def _plain_segments(turns: list[Turn]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    pending = ""
    for role, content in turns:
        if role == "assistant":
            segments += [(pending, False), (content, True)]
            pending = ""
        else:
            pending += content + ("\n\n" if role == "system" else "\n")
    return segments


def chat_segments(tokenizer: Any, fmt: TaskFormat, ex: Example, end_token: str) -> list[tuple[str, bool]]:
    """The conversation of ``ex`` as ``(text, is_reply)`` segments, alternating context and reply and
    ending with the final reply; a reply's text excludes the turn-end token ``end_token``."""
    turns = conversation(fmt, ex)
    if not uses_chat_template(tokenizer, fmt):
        return _plain_segments(turns)
    tools = tool_definitions(ex.meta.get("tools"), f"example {ex.id!r}: field 'tools'")
    turns = _accepted(tokenizer, turns, ex.id, tools)
    segments: list[tuple[str, bool]] = []
    done = ""  # the rendered text the segments so far cover
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = render_chat(tokenizer, _messages(turns[:i]), generation_prompt=True, tools=tools)
        after = render_chat(tokenizer, _messages(turns[: i + 1]), generation_prompt=False, tools=tools)
        if not before.startswith(done) or not after.startswith(before):
            raise LayercardError(
                f"example {ex.id!r}: the chat template renders earlier turns differently once later turns "
                "follow, so the assistant turns cannot be masked exactly; use --no-chat-template"
            )
        reply = after[len(before) :]
        cut = reply.rfind(end_token)
        segments += [(before[len(done) :], False), (reply[:cut] if cut >= 0 else reply, True)]
        done = after[: len(before) + cut + len(end_token)] if cut >= 0 else after
    return segments
