"""``--set KEY=VALUE`` overrides on a parsed YAML config, before it is validated (docs/design.md §1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layercard.errors import LayercardError

__all__ = ["apply_overrides"]


def _set_path(raw: dict[str, Any], dotted: str, value: Any, text: str) -> None:
    """Set ``a.b.c`` in nested mappings; a list (placements) is indexed by position or by ``name``."""
    parts = dotted.split(".")
    if not all(parts):
        raise LayercardError(f"--set {text!r}: empty key segment in {dotted!r}")
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
            if node.get(part) is None or node.get(part) is False:
                node[part] = {}
            node = node[part]


def apply_overrides(raw: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides on a parsed config (a deep copy); values are typed by YAML parsing."""
    import copy

    import yaml

    out = copy.deepcopy(raw) if raw is not None else {}
    for text in sets:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise LayercardError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=10")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise LayercardError(
                f"--set {text!r}: the value is not valid YAML ({e})".splitlines()[0]
            ) from None
        _set_path(out, key.strip(), parsed, text)
    return out
