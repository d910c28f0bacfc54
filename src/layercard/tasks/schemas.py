"""Record schemas: how one row of a data file becomes an :class:`Example`.

Four schemas, detected from the fields of the first record (after the field map):

============  =====================================  ===================================================
schema        fields (optional in brackets)          example
============  =====================================  ===================================================
chat          messages: [{role, content}, ...]       loss on every assistant turn; input = last user
                                                     turn, target = final assistant turn
alpaca        instruction, output, [input]           input = instruction, blank line, input
input_target  input, target, [references]            as is
text          text                                   plain-text completion: the loss covers the text
============  =====================================  ===================================================

When several fit, the first in this order wins. Every schema reads an optional ``id``; other fields go
to ``Example.meta``. A conversation in ShareGPT's layout (``conversations: [{from, value}, ...]``, roles
``human`` and ``gpt``, an optional ``system`` field) is chat data: where the first record has one and the
field map names no schema's fields, :func:`detected_map` reads it through the field map
``messages=conversations, role=from, content=value, system=system`` (a ``conversations`` list of
``{role, content}`` turns: ``messages=conversations``). Chat roles ``human``, ``gpt``,
``function_call`` and ``observation`` are read as ``user``, ``assistant``, ``assistant`` and ``tool``; a
tool turn is context, like a user turn. A chat record's ``tools`` field (the tool definitions: a list
of JSON objects, or its JSON text) is checked, kept in ``Example.meta`` as given, and handed to the chat
template when the example is encoded. A turn in OpenAI's layout may carry more fields
(:func:`_turn_fields`): an assistant turn's ``tool_calls`` (its content then null or empty; where the
last turn calls tools, the calls as text are the target) and ``weight`` (0: context, no loss; never on
the last turn), a tool turn's ``tool_call_id`` and ``name``; they go to ``Example.turn_fields``.
A field map names the column of a field:
``{"input": "question"}`` reads ``input`` from ``question`` (``role``/``content`` rename the keys inside
chat messages, ``system`` names a column holding the conversation's system prompt). Fields the map names
also choose the schema: mapping ``target`` says the data is ``input_target`` even before its first row
is read. Two fields read one column only where the map says so (:func:`schema_columns`). Errors start
with ``where`` (``FILE:LINE``, or ``SOURCE:ROW`` for tables).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from layercard.errors import LayercardError
from layercard.tasks.chat import tool_calls, tool_definitions, with_calls
from layercard.tasks.example import ROLES, Example

__all__ = [
    "FIELDS",
    "ROLE_NAMES",
    "SCHEMAS",
    "check_field_map",
    "detect_schema",
    "detected_map",
    "record_to_example",
    "schema_columns",
]

SCHEMAS = ("chat", "alpaca", "input_target", "text")
FIELDS = ("id", "input", "target", "references", "instruction", "output", "messages", "text")
FIELDS += ("role", "content", "system")  # the keys inside chat messages; a conversation's system prompt
_REQUIRED = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "input_target": ("input", "target"),
    "text": ("text",),
}
# Fields that belong to one schema alone: naming one in the field map chooses that schema.
_DISTINCT = {
    "chat": ("messages", "role", "content", "system"),
    "alpaca": ("instruction", "output"),
    "input_target": ("target",),
    "text": ("text",),
}
# Role names chat data may use (ShareGPT's), read as the roles they stand for: a function call is the
# assistant's turn (its text trained on like any reply), what the function returned is a tool turn.
ROLE_NAMES = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
# ShareGPT's columns: the conversation, the keys of each turn, and the system prompt beside them.
_SHAREGPT = {"messages": "conversations", "role": "from", "content": "value", "system": "system"}
_DESCRIBE = "messages (chat), instruction + output (Alpaca), input + target, or text"


def check_field_map(field_map: Mapping[str, str] | None) -> dict[str, str]:
    """The field map as a dict, its keys checked against :data:`FIELDS`."""
    fmap = dict(field_map or {})
    for key, column in fmap.items():
        if key not in FIELDS:
            raise LayercardError(f"field_map: unknown key {key!r}; valid: {', '.join(FIELDS)}")
        if not isinstance(column, str) or not column:
            raise LayercardError(f"field_map: {key!r} must name a column, got {column!r}")
    return fmap


def _col(fmap: Mapping[str, str | None], name: str) -> Any:
    # None: a field not read (:func:`schema_columns`); no record has that key
    return fmap.get(name, name)


def _present(rec: Mapping[str, Any], column: str) -> bool:
    # present even when empty: the row's own check then says "field 'target' missing (empty string)"
    return rec.get(column) is not None


# Every field a schema reads, each from a column (role and content: a key of a message) of its own; the
# optional ones in the second tuple.
_READS = {
    "chat": ((("id", "messages", "system"), ("id", "system")), (("role", "content"), ())),
    "alpaca": ((("id", "instruction", "input", "output", "references"), ("id", "input", "references")),),
    "input_target": ((("id", "input", "target", "references"), ("id", "references")),),
    "text": ((("id", "text"), ("id",)),),
}


def schema_columns(schema: str, fmap: Mapping[str, str]) -> dict[str, str | None]:
    """The column each field of ``schema`` is read from under the field map ``fmap``; None: not read.

    A field mapped onto the column another field reads by its own name, that field left unmapped
    (``input=target``: the answer in the prompt, unsaid), is refused; mapping both to one column says it
    is meant (an echo task: ``input=text,target=text``). An optional field left so is not read instead:
    with ``instruction=input`` an Alpaca record has no separate input, rather than its instruction twice.
    """
    columns: dict[str, str | None] = dict(fmap)
    for fields, optional in _READS[schema]:
        taken = {fmap[f]: f for f in fields if f in fmap}
        for field in fields:
            if field in fmap or field not in taken:
                continue
            if field in optional:
                columns[field] = None
            else:
                raise LayercardError(
                    f"field_map: {taken[field]} would be read from {field!r}, the column {field} is read "
                    f"from too; map {field} to a column of its own (or to {field!r} as well, if both are "
                    "meant to read it)"
                )
    return columns


def detected_map(rec: Any, fmap: Mapping[str, str]) -> dict[str, str]:
    """``fmap`` with ShareGPT's columns added where ``rec`` is a conversation in its layout (a non-empty
    ``conversations`` list whose first turn has ``from`` and ``value``, and no ``messages``) and the map
    names no schema's fields, or with ``messages=conversations`` where that list's turns have ``role``
    and ``content``; else ``fmap`` as it is."""
    if (
        not isinstance(rec, Mapping)
        or "messages" in rec
        or any(f in fmap for fs in _DISTINCT.values() for f in fs)
    ):
        return dict(fmap)
    turns = rec.get("conversations")
    if isinstance(turns, str):  # a table cell holding the conversation as JSON
        turns = _json_cell(turns)
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        return dict(fmap)
    first = turns[0]
    if isinstance(first, Mapping) and "from" in first and "value" in first:
        return {**fmap, **_SHAREGPT}
    if isinstance(first, Mapping) and "role" in first and "content" in first:
        return {**fmap, "messages": "conversations"}  # chat messages under ShareGPT's column name
    return dict(fmap)


def detect_schema(rec: Any, fmap: Mapping[str, str], where: str) -> str:
    """The schema of a record: the one the field map names, else the first whose fields it has."""
    named = [s for s in SCHEMAS if any(f in fmap for f in _DISTINCT[s])]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise LayercardError(
            f"field_map: names fields of several schemas ({', '.join(named)}); map the fields of one"
        )
    if not isinstance(rec, Mapping):
        raise LayercardError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for schema in SCHEMAS:
        if all(_present(rec, _col(fmap, f)) for f in _REQUIRED[schema]):
            return schema
    for schema in SCHEMAS:  # the fields are there, one null: the row's own check names it
        if all(_col(fmap, f) in rec for f in _REQUIRED[schema]):
            return schema
    found = ", ".join(map(str, rec)) or "none"
    absent = [f"{key}={column}" for key, column in fmap.items() if column not in rec]
    if absent:  # the map itself is what does not fit: say so, not "use a field map"
        raise LayercardError(
            f"{where}: field map {', '.join(absent)}: no such column (the fields found: {found})"
        )
    raise LayercardError(
        f"{where}: no known schema fits the fields found ({found}); expected {_DESCRIBE}; "
        "name the columns with a field map (--field input=COLUMN; task.fields in a run config)"
    )


def _text(rec: Mapping[str, Any], column: str, where: str, *, required: bool = True) -> str:
    value = rec.get(column)
    if value is None:
        if required:
            raise LayercardError(f"{where}: field {column!r} missing")
        return ""
    if not isinstance(value, str):
        raise LayercardError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        # an empty target trains on nothing but the end token; an empty input has no prompt
        raise LayercardError(f"{where}: field {column!r} missing (empty string)")
    return _whole_characters(value, f"{where}: field {column!r}")


def _whole_characters(text: str, at: str) -> str:
    """``text``, refused where it holds half of a character (an unpaired surrogate, as a JSON "\\ud83d"
    an exporter cut from its pair writes): no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LayercardError(
            f"{at}: character {e.start} is half of a character (U+{ord(text[e.start]):04X}, an unpaired "
            "surrogate); the text was cut inside a character"
        ) from None
    return text


def _references(rec: Mapping[str, Any], column: str, target: str, where: str, cells: bool) -> tuple[str, ...]:
    refs = rec.get(column)
    if refs is None or (cells and refs == ""):
        return (target,)
    if cells and isinstance(refs, str):  # a table cell: a JSON list, else one reference
        parsed = _json_cell(refs) if refs.lstrip().startswith("[") else refs
        refs = [refs] if isinstance(parsed, str) else parsed  # "[name=A | age=3]" is not JSON: one
    if (
        isinstance(refs, str)
        or not isinstance(refs, Sequence)
        or not refs
        or not all(isinstance(r, str) and r.strip() for r in refs)
    ):
        # a blank reference would be matched by an empty answer
        raise LayercardError(f"{where}: field {column!r} must be a non-empty list of non-blank strings")
    return tuple(_whole_characters(r, f"{where}: field {column!r}[{k}]") for k, r in enumerate(refs))


def _json_cell(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _messages(
    rec: Mapping[str, Any], fmap: Mapping[str, str], where: str, cells: bool
) -> tuple[tuple[tuple[str, str], ...], tuple[dict[str, Any], ...] | None]:
    """The conversation as (role, content) pairs, checked: optional system turn first, then a user turn,
    ending with an assistant turn (its content, or its tool calls); and each turn's other fields
    (:func:`_turn_fields`), None where no turn has any."""
    column = _col(fmap, "messages")
    raw = rec.get(column)
    if raw is None:
        raise LayercardError(f"{where}: field {column!r} missing")
    if cells and isinstance(raw, str):
        raw = _json_cell(raw)
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw:
        raise LayercardError(f"{where}: field {column!r} must be a non-empty list of {{role, content}} items")
    role_key, content_key = _col(fmap, "role"), _col(fmap, "content")
    turns, fields = [], []
    for k, m in enumerate(raw):
        at = f"{where}: field {column!r}[{k}]"
        if not isinstance(m, Mapping):
            raise LayercardError(f"{at}: expected an object with {role_key!r} and {content_key!r}")
        role, content = m.get(role_key), m.get(content_key)
        for key in (role_key, content_key):
            if key not in m:  # a mapped key the items lack: say which keys they have
                raise LayercardError(f"{at}: no key {key!r} (the item's keys: {', '.join(map(str, m))})")
        role = ROLE_NAMES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            names = ", ".join((*ROLES, *ROLE_NAMES))
            raise LayercardError(f"{at}.{role_key}: {m.get(role_key)!r} is not one of {names}")
        extra = _turn_fields(m, role, at)
        if extra.get("tool_calls") and (content is None or content == ""):
            content = ""  # a turn that only calls tools: the calls are its text
        elif not isinstance(content, str) or not content.strip():
            raise LayercardError(f"{at}.{content_key}: must be a non-empty string, got {content!r}")
        if role == "system" and k > 0:
            raise LayercardError(f"{at}: a system turn may only come first")
        turns.append((role, _whole_characters(content, f"{at}.{content_key}")))
        fields.append(extra)
    system = _system(rec, fmap.get("system"), where, cells)
    if system is not None:
        if turns[0][0] == "system":
            raise LayercardError(
                f"{where}: field {fmap['system']!r} and the conversation's own system turn: give one of them"
            )
        turns.insert(0, ("system", system))
        fields.insert(0, {})
    rest = turns[1:] if turns[0][0] == "system" else turns
    if not rest or rest[0][0] != "user":
        raise LayercardError(f"{where}: field {column!r}: the conversation must start with a user turn")
    if turns[-1][0] != "assistant":
        raise LayercardError(f"{where}: field {column!r}: the last turn must be the assistant's (the target)")
    last = f"{where}: field {column!r}[{len(raw) - 1}]"
    if fields[-1].get("weight") == 0:
        raise LayercardError(
            f"{last}.weight: the last turn is the target, which training learns; it cannot be 0"
        )
    return tuple(turns), (tuple(fields) if any(fields) else None)


def _turn_fields(m: Mapping[str, Any], role: str, at: str) -> dict[str, Any]:
    """A turn's fields beyond role and content, checked: an assistant turn's ``tool_calls`` and
    ``weight`` (0: context, no loss; 1: trained, as without it), a tool turn's ``tool_call_id`` and
    ``name``. Other keys are not read."""
    out: dict[str, Any] = {}
    calls = tool_calls(m.get("tool_calls"), f"{at}.tool_calls")
    weight = m.get("weight")
    if (calls or weight is not None) and role != "assistant":
        key = "tool_calls" if calls else "weight"
        raise LayercardError(f"{at}.{key}: only an assistant turn has one (this turn is {role!r})")
    if calls:
        out["tool_calls"] = calls
    if weight is not None:
        if isinstance(weight, bool) or weight not in (0, 1):
            raise LayercardError(f"{at}.weight: must be 0 (no loss on this turn) or 1, got {weight!r}")
        if weight == 0:  # weight 1 is every turn's default: the same data, the same hash
            out["weight"] = 0
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise LayercardError(f"{at}.{key}: must be a string, got {m[key]!r}")
                out[key] = m[key]
    return out


def _system(rec: Mapping[str, Any], column: str | None, where: str, cells: bool) -> str | None:
    """The conversation's system prompt from its own column, where the field map names one; None where
    it has none (absent, null, or an empty cell)."""
    if column is None:
        return None
    value = rec.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise LayercardError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
    return _whole_characters(value, f"{where}: field {column!r}")


def _example_id(rec: Mapping[str, Any], column: str, default: str, where: str) -> str:
    ex_id = rec.get(column)
    if ex_id is None or ex_id == "":
        return default
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
        raise LayercardError(f"{where}: field {column!r} must be a string, got {type(ex_id).__name__}")
    return str(ex_id)


def record_to_example(
    rec: Any, schema: str, fmap: Mapping[str, str | None], where: str, default_id: str, *, cells: bool = False
) -> Example:
    """One record of ``schema`` as an Example; ``fmap``: the columns of :func:`schema_columns`; ``cells``:
    values are table cells (CSV: text, '' = empty)."""
    if not isinstance(rec, Mapping):
        raise LayercardError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    used = {_col(fmap, "id")}
    messages = turn_fields = None
    if schema == "chat":
        messages, turn_fields = _messages(rec, fmap, where, cells)
        # checked here, kept as given: the chat template reads them when the example is encoded
        tool_definitions(rec.get("tools"), f"{where}: field 'tools'")
        users = [c for r, c in messages if r == "user"]
        # a final turn that calls tools: its calls are the target, as text (the template's form is
        # what evaluation scores where it writes them otherwise: layercard.tasks.encode.scored_as_written)
        calls = (turn_fields or [{}])[-1].get("tool_calls")
        inp, target = users[-1], with_calls(messages[-1][1], calls) if calls else messages[-1][1]
        refs: tuple[str, ...] = (target,)
        used |= {_col(fmap, "messages"), fmap.get("system")}
    elif schema == "text":
        inp, target = "", _text(rec, _col(fmap, "text"), where)
        refs = (target,)
        used.add(_col(fmap, "text"))
    else:
        if schema == "alpaca":
            instruction = _text(rec, _col(fmap, "instruction"), where)
            extra = _text(rec, _col(fmap, "input"), where, required=False)
            inp = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            target = _text(rec, _col(fmap, "output"), where)
            used |= {_col(fmap, f) for f in ("instruction", "input", "output")}
        else:
            inp = _text(rec, _col(fmap, "input"), where)
            target = _text(rec, _col(fmap, "target"), where)
            used |= {_col(fmap, f) for f in ("input", "target")}
        refs = _references(rec, _col(fmap, "references"), target, where, cells)
        used.add(_col(fmap, "references"))
    ex_id = _example_id(rec, _col(fmap, "id"), default_id, where)
    meta = {k: v for k, v in rec.items() if k not in used}
    return Example(
        id=ex_id,
        input=inp,
        target=target,
        references=refs,
        meta=meta,
        messages=messages,
        turn_fields=turn_fields,
    )
