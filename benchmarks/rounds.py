"""Benchmarks measured in rounds, one fresh process per round (a process's allocator history moves a CPU's
resident peak): the subcommands ``run`` (every round not yet written, then the report), ``one`` (a round in
this process; ``run`` calls it) and ``report``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def round_path(runs: Path, i: int, mode: str) -> Path:
    return runs / f"round{i}_{mode}.json"


def main(script: ModuleType, argv: list[str] | None = None) -> int:
    """The subcommands of a rounds benchmark ``script``, which defines ``ROUNDS`` (the mode of each round),
    ``RUNS`` (their folder), ``WRITTEN`` (the report's path), ``one(mode, threads, path)`` and ``report()``:
    ``one`` measures a round in this process, ``run`` starts a fresh process for every round whose JSON is
    not yet written and then reports, as ``report`` does."""
    rounds: Sequence[str] = script.ROUNDS
    ap = argparse.ArgumentParser(description=(script.__doc__ or "").splitlines()[0])
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
        script.one(args.mode, args.threads, args.path)
        return 0
    if args.cmd == "run":
        script.RUNS.mkdir(parents=True, exist_ok=True)
        for i, mode in enumerate(rounds):
            path = round_path(script.RUNS, i, mode)
            if not path.is_file():
                cmd = [sys.executable, script.__file__, "one", mode, "--threads", str(args.threads)]
                subprocess.run([*cmd, "--path", str(path)], check=True)
    script.report()
    print(f"wrote {script.WRITTEN}")
    return 0
