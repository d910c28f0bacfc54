"""YAML text to values (a key given twice is an error), and ``--set KEY=VALUE`` overrides on a parsed
config, before it is validated (docs/design.md §1)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from layercard.errors import LayercardError, message_line

__all__ = ["apply_overrides", "origin_text", "override_of", "parse_yaml"]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not "last wins",
    and that ``1:2`` is text (YAML 1.1 reads it as the base-60 number 62; layer windows are written so)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if (
            kind is yaml.ScalarNode
            and implicit[0]
            and isinstance(value, str)
            and _SEXAGESIMAL.fullmatch(value)
        ):
            return "tag:yaml.org,2002:str"
        return super().resolve(kind, value, implicit)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; it names no key
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep)


# The most values a config may hold once its aliases are expanded: a config is a few hundred; nested
# aliases can make a few hundred bytes stand for billions, which every later walk of it would expand.
MAX_VALUES = 100_000


def expanded_size(value: Any) -> int:
    """How many values ``value`` holds with every shared mapping or list counted each time it is reached
    (as YAML aliases are read), computed without expanding them."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) not in sizes:
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            sizes[id(v)] = 1 + sum(size(x) for x in items)
        return sizes[id(v)]

    return size(value)


def parse_yaml(text: str, source: str) -> Any:
    """The value of YAML ``text``; errors (a duplicate key names both lines) start with ``source``."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        if (n := expanded_size(value)) > MAX_VALUES:
            raise LayercardError(
                f"{source}: holds {n:,} values once its aliases are expanded, more than the {MAX_VALUES:,} "
                "a config may; write the settings out rather than nesting aliases"
            )
        return value
    except _DuplicateKey as e:
        raise LayercardError(
            f"{source}: line {e.second}: duplicate key {e.key!r} (first at line {e.first}); "
            "each key may appear once per section"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or message_line(e)
        raise LayercardError(f"{source}: not valid YAML{where} ({problem})") from None


def _set_path(raw: dict[str, Any], dotted: str, value: Any, text: str) -> None:
    """Set ``a.b.c`` in nested mappings; a list (placements) is indexed by position or by ``name``."""
    parts = dotted.split(".")
    if not all(parts):
        raise LayercardError(f"--set {text!r}: empty key segment in {dotted!r}")
    if len(parts) > 1 and parts[0] == "task" and isinstance(raw.get("task"), str):
        raw["task"] = {"train": raw["task"]}  # the shorthand `task: NAME` is the mapping {train: NAME}
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                idx = int(part)
            else:
                idx = next(
                    (j for j, x in enumerate(node) if isinstance(x, Mapping) and x.get("name") == part), None
                )
            if idx is None:
                names = [str(x.get("name")) for x in node if isinstance(x, Mapping)]
                raise LayercardError(
                    f"--set {text!r}: {here}: no such list entry (give an index 0..{len(node) - 1} or a "
                    f"name: {', '.join(names)})"
                )
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise LayercardError(f"--set {text!r}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            elif node.get(part) is False:  # `trim: false` stays off when one of its keys is set
                node[part] = {"enabled": False}
            node = node[part]


# Text settings whose YAML may also be a mapping or a list (`fields: {input: q}`): typed by YAML as given.
_STRUCTURED = {("task", "fields")}
_NULLS = ("null", "Null", "NULL", "~")


def _text_setting(dotted: str) -> bool:
    """Whether ``dotted`` names a setting whose value is text (a path, a prompt, a split, a name)."""
    from layercard.config.run import SECTIONS, RunSettings
    from layercard.config.schema import spec_of

    parts = dotted.split(".")
    if len(parts) == 1:
        section, key, schemas = "", parts[0], [RunSettings]
    else:
        section, key = parts[0], parts[-1]
        # a placement's key is placements.<index or name>.<key>
        if len(parts) != (3 if section == "placements" else 2):
            return False
        schemas = [s for sec, run, stage, _ in SECTIONS if sec == section for s in (run, stage)]
    if (section, key) in _STRUCTURED:
        return False
    for schema in schemas:
        for f in schema.settings(yaml_only=True) if schema is not None else ():
            spec = spec_of(f)
            if f.name == key and spec is not None:
                return spec.kind == "str"
    return False


def _value(key: str, value: str, text: str) -> Any:
    """The value of ``--set KEY=VALUE``: typed by YAML, except that a text setting takes the text as
    given where YAML reads something else (``{input}`` a mapping, ``a: b`` a mapping, ``#x`` a comment,
    ``@file`` an error); the literal ``null`` is null there too."""
    if not value.strip():
        return None
    if not _text_setting(key):
        return parse_yaml(value, f"--set {text!r}: the value")
    if value.strip() in _NULLS:
        return None
    try:
        parsed = parse_yaml(value, f"--set {text!r}: the value")
    except LayercardError:
        return value
    return parsed if isinstance(parsed, str) else value


def apply_overrides(raw: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides on a parsed config (a deep copy); values are typed by YAML parsing, text
    settings' values taken as given where YAML would read them as something else."""
    import copy

    out = copy.deepcopy(raw) if raw is not None else {}
    for text in sets:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise LayercardError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=10")
        _set_path(out, key.strip(), _value(key.strip(), value, text), text)
    return out


_PLACEMENT_KEY = re.compile(r"placements\[([^\]]*)\](?:\.(.*))?")


def _key_parts(dotted: str, placements: Sequence[str | None]) -> tuple[str, ...]:
    """A dotted key as its parts, a placement given by index named as the placement given by name."""
    m = _PLACEMENT_KEY.fullmatch(dotted)
    if m is not None:
        return ("placements", m.group(1), *(m.group(2).split(".") if m.group(2) else ()))
    out = dotted.split(".")
    if len(out) > 1 and out[0] == "placements" and out[1].isdigit() and int(out[1]) < len(placements):
        out[1] = placements[int(out[1])] or out[1]
    return tuple(out)


def override_of(keys: Sequence[str], sets: Sequence[str], placements: Sequence[str | None]) -> str | None:
    """``--set 'KEY=VALUE'`` of the last of ``sets`` that gave one of ``keys`` (``train.steps``, a
    placement's ``placements[NAME].rank``) its value, by the key itself or a section holding it; None where
    the config file gave them. ``placements``: each placement's name (None where it has none), so that a
    placement given by index or by name is the same placement."""
    wanted = [_key_parts(k, placements) for k in keys]
    for text in reversed(sets):
        given = _key_parts(text.partition("=")[0].strip(), placements)
        if any(want[: len(given)] == given for want in wanted):
            return f"--set {text!r}"
    return None


def origin_text(
    keys: Sequence[str], sets: Sequence[str], placements: Sequence[str | None], source: str
) -> str:
    """Where the value of ``keys`` came from, to start a message with: the ``--set`` that gave one of them
    whole (:func:`override_of`), else ``source`` (the config file), with each ``--set`` that changed a
    setting inside them (``task.train_split`` within ``task``): which of the two is at fault is unknown."""
    whole = override_of(keys, sets, placements)
    if whole is not None:
        return whole
    wanted = [_key_parts(k, placements) for k in keys]
    inside = [
        f"--set {text!r}"
        for text in sets
        if any(_key_parts(text.partition("=")[0].strip(), placements)[: len(w)] == w for w in wanted)
    ]
    return source + (f" with {', '.join(inside)}" if inside else "")
