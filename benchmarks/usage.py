"""Command-line handling shared by the benchmark scripts: those that take no options, and those that
run (train, resumably) or only summarize."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def no_options(doc: str | None) -> None:
    """``-h``/``--help`` prints ``doc`` and exits; any other argument is refused. A script that rewrites
    committed results must not run when it was only asked what it does."""
    argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()


def run_or_summary(doc: str | None, run: Callable[[], None], summary: Callable[[], dict[str, Any]]) -> None:
    """The command line of a benchmark whose ``run`` trains (resumably) and whose ``summary`` writes its
    results from the kept runs: ``run`` does both, ``summary`` the second alone; prints the per-task part."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("run", "summary"))
    if parser.parse_args().what == "run":
        run()
    print(json.dumps(summary()["tasks"], indent=1))
