"""Benchmark scripts imported by tests: the scripts import their siblings from their own folder."""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported with its folder on the path; afterwards the folder leaves the path
    and every module loaded from it is forgotten, so another test file imports its own copy."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
        for key, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if path and Path(path).resolve().is_relative_to(BENCHMARKS):
                sys.modules.pop(key)


def same_numbers(got: Any, want: Any, rel: float = 1e-9, at: str = "") -> None:
    """Assert that two JSON trees are equal, floats to ``rel``: a table recomputed from committed runs
    matches the committed one to its last printed digit, while least-squares fits can differ in the last
    bits between builds of the numerical libraries."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{at or '/'}: keys differ"
        for k in want:
            same_numbers(got[k], want[k], rel, f"{at}/{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{at or '/'}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same_numbers(g, w, rel, f"{at}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, int | float):
        assert math.isclose(got, want, rel_tol=rel, abs_tol=rel), f"{at}: {got} against {want}"
    else:
        assert got == want, f"{at}: {got!r} against {want!r}"
