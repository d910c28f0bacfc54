"""One task example: an input, its target, and every acceptable reference.

The lowest module of the tasks package: data, metrics and encoding all speak of examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layercard.errors import LayercardError

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One input/target pair; ``references`` holds every acceptable output (``target`` among them)."""

    id: str
    input: str
    target: str
    references: tuple[str, ...] = ()
    # left out of the hash (a dict is unhashable) but not of equality, so examples can go in sets
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("id", "input", "target"):
            if not isinstance(getattr(self, name), str):
                raise LayercardError(f"Example.{name}: must be a string, got {getattr(self, name)!r}")
        refs = tuple(self.references) if self.references else (self.target,)
        if not all(isinstance(r, str) for r in refs):
            raise LayercardError(f"Example {self.id!r}: references must be strings")
        object.__setattr__(self, "references", refs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "input": self.input,
            "target": self.target,
            "references": list(self.references),
            "meta": dict(self.meta),
        }
