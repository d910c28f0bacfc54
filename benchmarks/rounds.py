"""Benchmarks measured in rounds, one fresh process per round (a process's allocator history moves a CPU's
resident peak): the subcommands ``run`` (every round not yet written, then the report), ``one`` (a round in
this process; ``run`` calls it) and ``report``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def round_path(runs: Path, i: int, mode: str) -> Path:
    return runs / f"round{i}_{mode}.json"


def main(
    argv: list[str] | None,
    *,
    doc: str,
    script: str,
    rounds: Sequence[str],
    runs: Path,
    one: Callable[[str, int, Path], None],
    report: Callable[[], Any],
    written: Path,
) -> int:
    """Parse the subcommands and run them: ``one`` measures a round in this process, ``run`` starts a fresh
    process for every round whose JSON is not yet under ``runs`` and then reports, as ``report`` does."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every round not yet measured (resumable), then the report")
    r.add_argument("--threads", type=int, default=2)
    o = sub.add_parser("one", help="one round in this process (run calls it)")
    o.add_argument("mode", choices=sorted(set(rounds)))
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--path", type=Path, required=True)
    sub.add_parser("report", help="the report from the rounds written")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        one(args.mode, args.threads, args.path)
        return 0
    if args.cmd == "run":
        runs.mkdir(parents=True, exist_ok=True)
        for i, mode in enumerate(rounds):
            path = round_path(runs, i, mode)
            if not path.is_file():
                cmd = [
                    sys.executable,
                    script,
                    "one",
                    mode,
                    "--threads",
                    str(args.threads),
                    "--path",
                    str(path),
                ]
                subprocess.run(cmd, check=True)
    report()
    print(f"wrote {written}")
    return 0
