"""What `layercard train --dry-run` says against what the same run then measures.

Plans the recommendation from a card on its own (`layercard plan`, priced at the card's calibration batch),
asks `layercard train --dry-run` what a run of it would compute and cost, trains that run in a process of
its own, and writes both side by side.

    .venv/bin/python benchmarks/dry_run.py --card runs/planning_cost_facts_400_params0.2x_r28/card/card.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dry_run"


def _layercard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layercard", *args], check=True, capture_output=True, text=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--card", required=True, help="card.json of the task (the demo's facts card)")
    ap.add_argument("--task", default="synthetic:facts")
    ap.add_argument("--budget", default="params=0.2x")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(HERE.parent / "runs" / "dry_run"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = out / "plan.json"
    _layercard("plan", "--card", args.card, "--budget", args.budget, "--out", str(plan))
    # the demo's training settings, validation and checkpoints at the end only
    train = ["--plan", str(plan), "--task", args.task, "--steps", str(args.steps), "--batch-size", "4"]
    train += ["--max-length", "96", "--eval-examples", "16", "--lr", "2e-3", "--eval-every", "0"]
    train += ["--checkpoint-every", "0"]
    t0 = time.perf_counter()
    est = json.loads(_layercard("train", *train, "--dry-run", "--json").stdout)
    dry_s = time.perf_counter() - t0
    run = out / f"train_{args.steps}"
    if (run / "train_metrics.json").exists():
        m = json.loads((run / "train_metrics.json").read_text())
    else:
        m = json.loads(_layercard("train", *train, "--out", str(run), "--json").stdout)

    from layercard.artifacts import machine_info, package_versions

    pairs = {
        "positions per step": (est["positions_per_step"], m["batch_positions_per_step"]),
        "largest micro-batch's positions": (est["max_positions"], m["max_batch_positions"]),
        "s/step (measured: median)": (est["step_time_at_run_s"], m["s_per_step"]),
        "peak memory MiB": (est["peak_memory_at_run_mib"], m["peak_memory_mib"]),
        "optimizer steps s (measured: the run's wall time)": (est["steps_s"], m["wall_time_s"]),
    }
    res = {
        "card": args.card,
        "task": args.task,
        "budget": args.budget,
        "steps": args.steps,
        "dry_run_s": dry_s,
        "dry_run": est,
        "measured": {
            k: m.get(k)
            for k in (
                "batch_positions_per_step",
                "max_batch_positions",
                "s_per_step",
                "s_per_step_spread",
                "peak_memory_mib",
                "peak_memory_kind",
                "predicted_memory_figure",
                "wall_time_s",
                "budget_notes",
            )
        },  # fmt: skip
        "machine": machine_info(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dry_run.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# `layercard train --dry-run` against the run it describes",
        "",
        f"smollm2, `{args.task}`, the recommendation at {args.budget} planned on its own from `{args.card}` "
        f"(priced at the card's calibration batch), {args.steps} steps of batch 4, each command in a process "
        f"of its own. Machine: {res['machine'].get('processor')} · {res['machine'].get('cpu_count')} cores · "
        f"{res['date']}. The dry run took {dry_s:.1f} s, model loading included.",
        "",
        "| | dry run | measured | measured / dry run |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {a:,.3f} | {b:,.3f} | ×{b / a:.3f} |" for k, (a, b) in pairs.items()),
        "",
        "The run's wall time also holds its final validation, its unmerged forward timing and the adapter's "
        "writing, which the dry run's time of the optimizer steps leaves out.",
    ]
    (RESULTS / "dry_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
