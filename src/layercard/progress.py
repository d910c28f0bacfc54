"""Progress bars on long loops (rich), silent when not wanted (tests, --json)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# The bars drawing now. An interrupted loop leaves its bar live until its generator is collected, which is
# after the interruption is reported: :func:`stop_bars` ends them first.
_LIVE: list[Any] = []


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one (``1 pass``, ``3 passes``, ``2 modules``)."""
    if n == 1:
        return f"{n:,} {noun}"
    return f"{n:,} {noun}" + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def fewer_examples(setting: str, asked: int, have: int) -> str:
    """That ``setting`` asked for more examples than the task has, and that all were used."""
    return f"{setting}{asked}: the task has {count(have, 'example')}; all {have} were used"


def enabled_default() -> bool:
    return os.environ.get("LAYERCARD_PROGRESS", "1") != "0"


def track(
    items: Iterable[T], description: str, *, total: int | None = None, enabled: bool | None = None
) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr when enabled."""
    if enabled is None:
        enabled = enabled_default()
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True, emoji=False),
        transient=False,
    ) as prog:
        _LIVE.append(prog)
        try:
            tid = prog.add_task(description, total=total)
            for item in items:
                yield item
                prog.advance(tid)
        finally:
            if prog in _LIVE:  # else stop_bars took it
                _LIVE.remove(prog)


def stop_bars() -> None:
    """Stop every live bar, each leaving its last state and a line break, so that what is printed next
    starts a line of its own and stays put."""
    while _LIVE:
        _LIVE.pop().stop()


def say(text: str, *, enabled: bool | None = None) -> None:
    """One line on stderr about a step that has no bar, under the same switch as :func:`track`."""
    if enabled is None:
        enabled = enabled_default()
    if enabled:
        from rich.console import Console

        Console(stderr=True, emoji=False).print(text, highlight=False, soft_wrap=True)
