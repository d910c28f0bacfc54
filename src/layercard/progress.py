"""Progress bars on long loops (rich), silent when not wanted (tests, --json)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# Where stderr is no terminal (a log file, CI), a bar is drawn once, at its end: a plain line every this
# many seconds says how far a long loop has come instead.
PLAIN_EVERY_S = 30.0

# The bars drawing now. An interrupted loop leaves its bar live until its generator is collected, which is
# after the interruption is reported: :func:`stop_bars` ends them first.
_LIVE: list[Any] = []


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one (``1 pass``, ``3 passes``, ``2 modules``)."""
    if n == 1:
        return f"{n:,} {noun}"
    return f"{n:,} {noun}" + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def layers_text(layers: Iterable[int]) -> str:
    """Layer indices as a reader takes them in: runs of three or more as ranges (``0–3, 10, 12``), so that
    a 126-layer model's every layer is ``0–125``."""
    s = sorted(set(layers))
    parts: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts += [f"{s[i]}–{s[j]}"] if j - i >= 2 else [str(x) for x in s[i : j + 1]]
        i = j + 1
    return ", ".join(parts)


def fewer_examples(setting: str, asked: int, have: int) -> str:
    """That ``setting`` asked for more examples than the task has, and that all were used."""
    return f"{setting}{asked}: the task has {count(have, 'example')}; all {have} were used"


# `layercard --quiet`: no bars and no progress lines for this command; notes and warnings still show.
_BARS = {"off": False}


def bars_are_off() -> bool:
    """Whether progress bars and progress lines are off for this process (:func:`bars_off`)."""
    return _BARS["off"]


def bars_off(off: bool) -> None:
    """Turn progress bars and progress lines off (or on again) for what follows in this process."""
    _BARS["off"] = off


# C0 and C1 controls but tab and line feed: shown as escapes, so that a name holding a terminal's escape
# sequence (colours, a window title) is printed, not obeyed.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: str) -> str:
    """``text`` with its control characters (tab and line feed aside) written as ``\\xNN`` escapes."""
    return text.translate(_CONTROLS)


# A library deprecation that says nothing to a user of layercard (:func:`hide_library_deprecations`).
HIDDEN_DEPRECATION = ".*is_gradient_checkpointing.*"


def hide_library_deprecations() -> None:
    """Hide the library deprecation warnings that say nothing to a user of layercard: PEFT still reads a
    transformers attribute deprecated in its v5. Run by the command line and by each process it starts."""
    warnings.filterwarnings("ignore", message=HIDDEN_DEPRECATION, category=FutureWarning)


def enabled_default() -> bool:
    return os.environ.get("LAYERCARD_PROGRESS", "1") != "0"


def track(
    items: Iterable[T],
    description: str,
    *,
    total: int | None = None,
    enabled: bool | None = None,
    start: int = 0,
) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr when enabled; ``start``: how many of ``total`` were done
    before these items (a resumed run's steps)."""
    if enabled is None:
        enabled = enabled_default()
    if not enabled or _BARS["off"]:
        yield from items
        return
    if not stderr_is_terminal():
        yield from _plain(items, description, total, start)
        return
    from rich.console import Console
    from rich.markup import escape
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
            # the description is text (a task or file name), not markup for the bold column around it
            tid = prog.add_task(escape(printable(description)), total=total, completed=start)
            for item in items:
                yield item
                prog.advance(tid)
        finally:
            if prog in _LIVE:  # else stop_bars took it
                _LIVE.remove(prog)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal or a notebook (as rich judges them), where a bar is redrawn in place."""
    from rich.console import Console

    console = Console(stderr=True)
    return console.is_terminal or console.is_jupyter


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _plain(items: Iterable[T], description: str, total: int | None, start: int = 0) -> Iterator[T]:
    """The loop, with a line on stderr at its start, every :data:`PLAIN_EVERY_S` seconds and at its end."""
    t0 = last = time.monotonic()
    of = f"/{total}" if total is not None else ""
    say(f"{description}: {start}{of}", enabled=True)
    done = start
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S and (total is None or done < total):
            last = now
            left = ""
            if total:
                left = f", about {_elapsed((now - t0) / (done - start) * (total - done))} left"
            say(f"{description}: {done}{of} ({_elapsed(now - t0)}{left})", enabled=True)
    say(f"{description}: {done}{of} ({_elapsed(time.monotonic() - t0)})", enabled=True)


def stop_bars() -> None:
    """Stop every live bar, each leaving its last state and a line break, so that what is printed next
    starts a line of its own and stays put."""
    while _LIVE:
        _LIVE.pop().stop()


def say_progress(text: str, *, enabled: bool | None = None) -> None:
    """A progress line of a step that has no bar: as :func:`say`, and off under ``--quiet`` as bars are."""
    if not _BARS["off"]:
        say(text, enabled=enabled)


def say(text: str, *, enabled: bool | None = None) -> None:
    """One line on stderr about a step that has no bar, under the same switch as :func:`track`."""
    if enabled is None:
        enabled = enabled_default()
    if enabled:
        from rich.console import Console

        # text, not markup: a path such as runs/[a]/x must print as it is, and one with [/x] not fail
        Console(stderr=True, emoji=False).print(
            printable(text), highlight=False, soft_wrap=True, markup=False
        )
