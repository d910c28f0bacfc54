"""The command line of benchmarks/placement.py: options, profiles, folders and the phases in order."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

from .estimate import estimate, print_estimate, token_stats
from .measure import fix_malloc
from .phases import phase_cards, phase_confirm, phase_policies, phase_select, phase_single, phase_trim
from .report import report
from .runner import Bench, StopBench
from .settings import (
    DRY_ROOT,
    FROZEN_FILE,
    FULL_POLICIES,
    GPU_ROOT,
    PHASES,
    REPO,
    RESULTS,
    ROOT,
    Settings,
    gpu_settings,
    real_settings,
    tiny_settings,
)
from .tiny import build_tiny_model

ALL_PHASES = ["cards", "single", "select", "confirm", "policies", "trim", "report"]


def parse_args(argv: list[str] | None = None, doc: str | None = None) -> argparse.Namespace:
    """The options; ``doc`` (the script's docstring) is the help's epilog."""
    ap = argparse.ArgumentParser(
        description="Placement benchmark (resumable; see the module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
    ap.add_argument("phase", nargs="?", choices=PHASES, help="what to run (default with --estimate: nothing)")
    ap.add_argument("--tasks", help="comma-separated subset of e2e_nlg,sst2,gsm8k,samsum")
    ap.add_argument("--only", help="policies phase: only these policies (comma-separated; 'all' = all-30)")
    ap.add_argument("--groups", help="policies phase: only these job groups (grid, repeat; comma-separated)")
    ap.add_argument("--limit-runs", type=int, help="stop after this many new runs (train+eval, base or trim)")
    ap.add_argument("--refreeze", action="store_true", help="select: replace the frozen default score")
    ap.add_argument("--reason", help="select --refreeze: why (recorded with the before/after numbers)")
    ap.add_argument("--estimate", action="store_true", help="print the planned runs and expected hours")
    ap.add_argument(
        "--dry-run-tiny", action="store_true", help="tiny random model + synthetic tasks, 2 steps"
    )
    ap.add_argument(
        "--profile",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the 2-core grid (default); gpu: 120 steps, more examples (results/gpu-DEVICE)",
    )
    ap.add_argument(
        "--root", type=Path, help="run cache folder (default runs/placement or runs/placement-dry)"
    )
    ap.add_argument(
        "--results", type=Path, help="results folder (default benchmarks/results, dry run: ROOT/results)"
    )
    args = ap.parse_args(argv)
    if args.phase is None and not args.estimate:
        ap.error("give a phase, or --estimate")
    return args


def _selection(args: argparse.Namespace, settings: Settings) -> tuple[list[str], set | None, set | None]:
    """--tasks, --only and --groups, checked; unknown names end the script with the valid ones."""
    names = [t.name for t in settings.tasks]
    tasks = names if not args.tasks else [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        settings.task(t)
    only = {p.strip() for p in args.only.split(",")} if args.only else None
    if only:
        bad = only - set(FULL_POLICIES) - {"all"}
        if bad:
            raise SystemExit(
                f"--only: unknown policies {sorted(bad)}; valid: {', '.join(FULL_POLICIES)}, all"
            )
    groups = {g.strip() for g in args.groups.split(",") if g.strip()} if args.groups else None
    if groups and groups - {"grid", "repeat"}:
        raise SystemExit(f"--groups: unknown {sorted(groups - {'grid', 'repeat'})}; valid: grid, repeat")
    return tasks, only, groups


def main(argv: list[str] | None = None, doc: str | None = None) -> None:
    """Run the phase (or ``all`` of them, skipping what is recorded); see the script's docstring."""
    args = parse_args(argv, doc)
    gpu = args.profile == "gpu" and not args.dry_run_tiny
    settings = tiny_settings() if args.dry_run_tiny else gpu_settings() if gpu else real_settings()
    root = args.root or (DRY_ROOT if args.dry_run_tiny else GPU_ROOT if gpu else ROOT)
    results = args.results or (root / "results" if args.dry_run_tiny else _gpu_results() if gpu else RESULTS)
    if gpu:
        _adopt_frozen(results)
    tasks, only, groups = _selection(args, settings)
    os.environ.setdefault("LAYERCARD_PROGRESS", "0")
    shared = REPO.parent / "shared" / "data"
    if shared.is_dir():  # PRESET:SPLIT specs resolve from any working directory
        os.environ.setdefault("LAYERCARD_DATA", str(shared))
    if args.phase is not None:
        fix_malloc()
    bench = Bench(settings, root, results, tasks=tasks, only=only, groups=groups, limit_runs=args.limit_runs)

    est = None
    if args.estimate or (args.phase in ("report", "all") and not gpu):  # the cost model is the CPU's
        tok = bench.loaded.tokenizer if args.phase else _tokenizer(settings, root)
        est = estimate(settings, token_stats(settings, tok))
        if args.estimate:
            print_estimate(est)
    if args.phase is None:
        return
    t0 = time.perf_counter()
    try:
        for ph in ALL_PHASES if args.phase == "all" else [args.phase]:
            print(f"== {ph} ==", flush=True)
            _run_phase(bench, ph, args, est, [t.name for t in settings.tasks])
    except StopBench as e:
        print(
            f"stopped: {e}; {bench.new_runs} new runs this sitting. Re-run the same command to continue, "
            "then `report`."
        )
    print(
        f"done in {(time.perf_counter() - t0) / 60:.1f} min; {bench.new_runs} new runs; base-model checks "
        f"{bench.checks['cheap']} cheap + {bench.checks['full']} full, all equal"
    )


def _run_phase(bench: Bench, ph: str, args: argparse.Namespace, est: Any, names: list[str]) -> None:
    if ph == "cards":
        phase_cards(bench)
    elif ph == "single":
        phase_single(bench)
    elif ph == "select":
        frozen = bench.frozen()
        if args.phase == "all" and frozen is not None:
            print(f"select: frozen default {frozen['variant']['name']} kept")
        else:
            phase_select(bench, refreeze=args.refreeze, reason=args.reason)
    elif ph == "confirm":
        phase_confirm(bench)
    elif ph == "policies":
        phase_policies(bench)
    elif ph == "trim":
        phase_trim(bench)
    elif ph == "report":
        bench.task_names = tuple(names)  # the report always covers every task's recorded results
        report(bench, est)


def _gpu_results() -> Path:
    """RESULTS/gpu-<device>, e.g. gpu-h100-80gb-hbm3: results are labelled by the GPU they ran on."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--profile gpu: no CUDA device here; pass --results DIR to name the results folder")
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return RESULTS / f"gpu-{name.removeprefix('nvidia-')}"


def _adopt_frozen(results: Path) -> None:
    """The GPU profile reports the score the CPU profile froze; it never selects one of its own."""
    from layercard.artifacts import read_json, write_json

    mine, cpu = results / FROZEN_FILE, RESULTS / FROZEN_FILE
    if mine.is_file():
        return
    if not cpu.is_file():
        raise SystemExit(f"--profile gpu: {cpu} is missing; run the CPU profile's `select` first")
    frozen = read_json(cpu)
    frozen["frozen_by"] = "the CPU profile's select (benchmarks/results/placement_default_score.json)"
    write_json(mine, frozen)
    print(f"adopted the CPU profile's frozen default score {frozen['variant']['name']} → {mine}")


def _tokenizer(settings: Settings, root: Path) -> Any:
    """The model's tokenizer without loading its weights (for --estimate)."""
    from transformers import AutoTokenizer

    if settings.dry_run:
        return AutoTokenizer.from_pretrained(build_tiny_model(root / "tiny-model", settings.n_layers))
    from layercard.models import builtin_path

    return AutoTokenizer.from_pretrained(builtin_path(settings.model))
