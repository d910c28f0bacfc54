"""One task example: an input, its target, and every acceptable reference.

The lowest module of the tasks package: data, metrics and encoding all speak of examples.
A chat example also carries its whole conversation (``messages``): training puts loss on every
assistant turn, while ``input``/``target`` (the last user turn and the final assistant turn) serve
generation and scoring like any other example. A turn may carry fields beyond its role and content
(``Example.turn_fields``): an assistant turn's tool calls and loss weight, a tool turn's call id and name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layercard.errors import LayercardError

__all__ = ["ROLES", "Example"]

# a tool turn (what a called function returned) is context, like a user turn: no loss on it
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One input/target pair; ``references`` holds the outputs scored as correct (the ``target`` alone
    when the data gives none; data that gives them need not list the target).

    ``messages``: for chat data, the conversation as ``(role, content)`` pairs ending with the
    assistant turn ``target``; ``None`` for everything else. ``turn_fields``: per turn of ``messages``,
    its fields beyond role and content (``tool_calls``, ``weight``, ``tool_call_id``, ``name``), as
    :mod:`layercard.tasks.schemas` checked them; ``None`` where no turn has any.
    """

    id: str
    input: str
    target: str
    references: tuple[str, ...] = ()
    # left out of the hash (a dict is unhashable) but not of equality, so examples can go in sets
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    messages: tuple[tuple[str, str], ...] | None = None
    turn_fields: tuple[Mapping[str, Any], ...] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        for name in ("id", "input", "target"):
            if not isinstance(getattr(self, name), str):
                raise LayercardError(f"Example.{name}: must be a string, got {getattr(self, name)!r}")
        refs = tuple(self.references) if self.references else (self.target,)
        if not all(isinstance(r, str) for r in refs):
            raise LayercardError(f"Example {self.id!r}: references must be strings")
        object.__setattr__(self, "references", refs)
        if self.messages is not None:
            turns = tuple((str(r), str(c)) for r, c in self.messages)
            if not turns or turns[-1][0] != "assistant" or any(r not in ROLES for r, _ in turns):
                raise LayercardError(
                    f"Example {self.id!r}: messages must be (role, content) pairs with roles in "
                    f"{', '.join(ROLES)}, ending with an assistant turn"
                )
            object.__setattr__(self, "messages", turns)
        if self.turn_fields is not None:
            if (
                self.messages is None
                or len(self.turn_fields) != len(self.messages)
                or not all(isinstance(f, Mapping) for f in self.turn_fields)
            ):
                raise LayercardError(f"Example {self.id!r}: turn_fields must hold one mapping per message")
            object.__setattr__(self, "turn_fields", tuple(dict(f) for f in self.turn_fields))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "input": self.input,
            "target": self.target,
            "references": list(self.references),
            "meta": dict(self.meta),
        }
        if self.messages is not None:  # only then: the data hash of every other example stays as it was
            fields = self.turn_fields or [{}] * len(self.messages)
            # a turn's other fields only where it has them: the data hash of plain turns stays as it was
            d["messages"] = [
                {"role": r, "content": c, **f} for (r, c), f in zip(self.messages, fields, strict=True)
            ]
        return d
