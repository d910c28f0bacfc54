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
segment sees them as the template writes them. A template that does not write them (SmolLM2's leaves
them out) would train a model that never sees the tools it calls, so there, and without a chat template,
the definitions are written into the system turn as text, one JSON object a line after any system
prompt (a system turn of their own where the conversation has none).

An assistant turn's ``tool_calls`` go to the template in the message, as tool-calling templates take
them, and are trained on as the template writes them. A template that does not write them (SmolLM2's
writes the content alone) would train an empty reply, so there, and without a chat template, each call
is written into the turn's text as a JSON object ``{"name": ..., "arguments": {...}}`` on a line of its
own after the content: the text a ShareGPT ``function_call`` turn holds. An assistant turn of weight 0
is context: rendered like any reply, trained on not at all; so is every reply but the final one where
the format trains the last turn only (``TaskFormat.train_turns``).
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


def _json(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise LayercardError(f"{where}: not JSON ({e.msg} at character {e.pos})") from None


def tool_definitions(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A chat record's ``tools`` as chat templates take them: a list of tool definitions (JSON objects),
    given as such or as the JSON text of one (ShareGPT keeps them as text); None where it has none
    (absent, null, blank, an empty list). Anything else is an error that starts with ``where``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _json(value, where)
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise LayercardError(f"{where}: must be a list of tool definitions (JSON objects), got {value!r:.80}")
    return [dict(t) for t in value] or None


def tool_calls(value: Any, where: str) -> list[dict[str, Any]] | None:
    """An assistant turn's ``tool_calls`` in the layout chat templates take:
    ``[{"type": "function", "function": {"name": ..., "arguments": {...}}, "id": ...}]``. Each call is
    OpenAI's ``{"function": {"name", "arguments"}}`` (arguments a JSON object or its text, as OpenAI
    writes them) or the bare ``{"name", "arguments"}``; the list may be JSON text. None where there are
    none; anything else is an error that starts with ``where``."""
    value = _json(value, where)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, Mapping) for c in value):
        raise LayercardError(f"{where}: must be a list of tool calls (JSON objects), got {value!r:.80}")
    calls = []
    for k, call in enumerate(value):
        fn = call.get("function", call)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name.strip():
            raise LayercardError(f"{where}[{k}]: a tool call needs the function's name, got {call!r:.80}")
        args = _json(fn.get("arguments", {}), f"{where}[{k}].arguments")
        if not isinstance(args, Mapping):
            raise LayercardError(f"{where}[{k}].arguments: must be a JSON object, got {args!r:.80}")
        out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": dict(args)}}
        if call.get("id") is not None:
            out["id"] = str(call["id"])
        calls.append(out)
    return calls or None


def calls_text(calls: list[Mapping[str, Any]]) -> str:
    """Tool calls as text, one JSON object ``{"name": ..., "arguments": ...}`` a line."""
    return "\n".join(
        json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
        )
        for c in calls
    )


def render_chat(
    tokenizer: Any,
    messages: list[Turn],
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
    its system prompt when the conversation brings none; each turn with its other fields."""
    assert ex.messages is not None
    fields = ex.turn_fields or [{}] * len(ex.messages)
    turns = [
        {"role": r, "content": fmt.render_instruction(c) if r == "user" else c, **f}
        for (r, c), f in zip(ex.messages, fields, strict=True)
    ]
    if fmt.system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": fmt.system})
    return turns


def _trained(turn: Turn) -> bool:
    return turn["role"] == "assistant" and turn.get("weight", 1) != 0


def _messages(turns: list[Turn]) -> list[Turn]:
    # the loss weight is layercard's business, not the template's
    return [{k: v for k, v in t.items() if k != "weight"} for t in turns]


def with_calls(content: str, calls: list[Mapping[str, Any]]) -> str:
    """A turn's text with its tool calls written in: the content, then the calls (:func:`calls_text`)."""
    return f"{content}\n{calls_text(calls)}" if content else calls_text(calls)


def _calls_as_text(turns: list[Turn]) -> list[Turn]:
    """``turns`` with every tool call written into its turn's text (:func:`with_calls`)."""
    out = []
    for turn in turns:
        if turn.get("tool_calls"):
            text = with_calls(turn["content"], turn["tool_calls"])
            turn = {**{k: v for k, v in turn.items() if k != "tool_calls"}, "content": text}
        out.append(turn)
    return out


def _tools_as_text(turns: list[Turn], tools: list[dict[str, Any]]) -> list[Turn]:
    """``turns`` with the tool definitions written into the system turn as text, one JSON object a line,
    after its content; a system turn of their own where there is none."""
    text = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if turns and turns[0]["role"] == "system":
        content = turns[0]["content"]
        return [{**turns[0], "content": f"{content}\n\n{text}" if content else text}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def _drops_tools(tokenizer: Any, turns: list[Turn], tools: list[dict[str, Any]]) -> bool:
    """Whether the template renders ``turns`` the same without ``tools``: it leaves them out. A template
    that fails on the turns either way is left to the renderings that follow to report."""
    try:
        written = render_chat(tokenizer, _messages(turns), generation_prompt=False, tools=tools)
        return written == render_chat(tokenizer, _messages(turns), generation_prompt=False)
    except Exception:
        return False


def _accepted(
    tokenizer: Any, turns: list[Turn], ex_id: str, tools: list[dict[str, Any]] | None
) -> list[Turn]:
    """``turns``, with a system turn folded into the first user turn if the template refuses one."""
    try:
        render_chat(tokenizer, _messages(turns), generation_prompt=False, tools=tools)
        return turns
    except Exception as e:  # e.g. Gemma's template refuses a system turn, as build_prompt handles it
        if turns[0]["role"] != "system":
            raise LayercardError(f"example {ex_id!r}: chat template failed: {e}") from None
    folded = [{**turns[1], "content": f"{turns[0]['content']}\n\n{turns[1]['content']}"}, *turns[2:]]
    try:
        render_chat(tokenizer, _messages(folded), generation_prompt=False, tools=tools)
    except Exception as e:
        raise LayercardError(f"example {ex_id!r}: chat template failed: {e}") from None
    return folded


Segment = tuple[str, bool, bool]


def _plain_segments(turns: list[Turn]) -> list[Segment]:
    segments: list[Segment] = []
    pending = ""
    for turn in _calls_as_text(turns):
        role, content = turn["role"], turn["content"]
        if role == "assistant":
            segments += [(pending, False, False), (content, True, _trained(turn))]
            pending = ""
        else:
            pending += content + ("\n\n" if role == "system" else "\n")
    return segments


def _template_segments(
    tokenizer: Any, ex_id: str, turns: list[Turn], tools: list[dict[str, Any]] | None, end_token: str
) -> list[Segment] | None:
    """The segments as the chat template renders ``turns``; None where it leaves a turn's tool calls out
    (it renders the turn the same without them)."""
    segments: list[Segment] = []
    done = ""  # the rendered text the segments so far cover
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render_chat(tokenizer, _messages(turns[:i]), generation_prompt=True, tools=tools)
        after = render_chat(tokenizer, _messages(turns[: i + 1]), generation_prompt=False, tools=tools)
        if not before.startswith(done) or not after.startswith(before):
            raise LayercardError(
                f"example {ex_id!r}: the chat template renders earlier turns differently once later turns "
                "follow, so the assistant turns cannot be masked exactly; use --no-chat-template"
            )
        reply = after[len(before) :]
        cut = reply.rfind(end_token)
        text = reply[:cut] if cut >= 0 else reply
        if turn.get("tool_calls") and _drops_calls(tokenizer, turns[:i], turn, after, tools):
            return None
        segments += [(before[len(done) :], False, False), (text, True, _trained(turn))]
        done = after[: len(before) + cut + len(end_token)] if cut >= 0 else after
    return segments


def _drops_calls(
    tokenizer: Any, earlier: list[Turn], turn: Turn, rendered: str, tools: list[dict[str, Any]] | None
) -> bool:
    """Whether the template renders ``turn`` after ``earlier`` as ``rendered`` without its tool calls
    too: it leaves them out. A template that cannot render the turn without them writes them."""
    bare = {k: v for k, v in turn.items() if k != "tool_calls"}
    try:
        return (
            render_chat(tokenizer, _messages([*earlier, bare]), generation_prompt=False, tools=tools)
            == rendered
        )
    except Exception:  # e.g. a template that refuses an assistant turn with no content
        return False


def chat_segments(tokenizer: Any, fmt: TaskFormat, ex: Example, end_token: str) -> list[Segment]:
    """The conversation of ``ex`` as ``(text, is_reply, trained)`` segments, alternating context and
    reply and ending with the final reply; a reply's text excludes the turn-end token ``end_token``;
    ``trained``: the reply carries loss (weight 0 makes it context)."""
    turns = conversation(fmt, ex)
    tools = tool_definitions(ex.meta.get("tools"), f"example {ex.id!r}: field 'tools'")
    if not uses_chat_template(tokenizer, fmt):
        return _turns_trained(_plain_segments(_tools_as_text(turns, tools) if tools else turns), fmt)
    if tools and _drops_tools(tokenizer, turns, tools):  # written as text, as without a template
        turns, tools = _tools_as_text(turns, tools), None
    turns = _accepted(tokenizer, turns, ex.id, tools)
    segments = _template_segments(tokenizer, ex.id, turns, tools, end_token)
    if segments is None:  # the template drops tool calls: write them as text, as without a template
        segments = _template_segments(tokenizer, ex.id, _calls_as_text(turns), tools, end_token)
    assert segments is not None
    return _turns_trained(segments, fmt)


def _turns_trained(segments: list[Segment], fmt: TaskFormat) -> list[Segment]:
    """``segments`` with loss on the final reply alone where the format trains the last turn only."""
    if fmt.train_turns == "all":
        return segments
    last = len(segments) - 1
    return [(text, reply, trained and k == last) for k, (text, reply, trained) in enumerate(segments)]
