"""Small text helpers shared by the console output and the markdown report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def fmt(x: Any, spec: str = ".4g") -> str:
    """``x`` formatted with ``spec``; – for a missing or non-finite number."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def layers_text(layers: Sequence[int]) -> str:
    """``3–7`` for a contiguous range of more than two layers, else ``0,4,8``; ``-`` for none."""
    layers = sorted(int(x) for x in layers)
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]}"
    return ",".join(map(str, layers))


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    vals = [x for x in xs if x is not None]
    return float(statistics.fmean(vals)) if vals else None


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A markdown table (``align``: one l or r per column; default first left, the rest right)."""
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(sep) + " |",
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
        "",
    ]
