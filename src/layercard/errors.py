"""The one exception type the CLI turns into a one-line error and a non-zero exit."""

from __future__ import annotations


class LayercardError(Exception):
    """A known failure with a one-line message naming the file, field or value at fault."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MissingSplit(LayercardError):
    """A task has no split of the name asked for (a held-out lookup then tries the next one)."""
