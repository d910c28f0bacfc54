"""Measuring helpers: peak memory, machine load, base-model integrity, the card code's hash, timestamps."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any


def now() -> str:
    """The current UTC time, as every record of the benchmark stamps it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fix_malloc(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold: large freed buffers are unmapped at once, so RSS tracks live memory."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, threshold))


class PeakRss:
    """Peak resident memory above the level at entry, sampled on a thread (Linux /proc; None elsewhere).

    The library's training metrics report the process-wide ru_maxrss, which never falls and so cannot
    tell the runs of one process apart; this measures each run's own rise.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._max = 0
        self._base = 0
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page
        except OSError:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = self._rss()
            if r is not None and r > self._max:
                self._max = r
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        base = self._rss()
        if base is not None:
            self._base = self._max = base
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (self._max - self._base) / 2**20


def load_avg() -> float:
    """The 1-minute load average (NaN where the platform has none): timings depend on it."""
    with contextlib.suppress(OSError):
        return round(os.getloadavg()[0], 2)
    return float("nan")


def cheap_hash(model: Any) -> str:
    """Structure (names, shapes, grad flags, mode) plus the bytes of the q/k/v/o weights LoRA touches."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.requires_grad}\n".encode())
        if any(r in name for r in ("q_proj", "k_proj", "v_proj", "o_proj")):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    h.update(f"training={model.training}|{type(model).__name__}".encode())
    return h.hexdigest()


# The planner's default-score declaration in the card package: which score the planner uses changes no
# number in a card, so it is left out of the card code hash (the benchmark itself sets that default).
_DEFAULT_DECL = re.compile(
    rb"^(?:# .*\n)*DEFAULT_SCORE = .*?\n(?:DEFAULT_SCORE_BASIS = \(\n(?:    .*\n)*?\)\n)?", re.M
)


def card_code_hash() -> str:
    """sha256 of the card package's source: a change to the card's definitions changes this."""
    import layercard.card as card_pkg

    h = hashlib.sha256()
    for f in sorted(Path(card_pkg.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\n" + _DEFAULT_DECL.sub(b"", f.read_bytes()))
    return h.hexdigest()
