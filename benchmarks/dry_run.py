"""What `layercard train --dry-run` says against what the same run then measures.

Plans from a card on its own (`layercard plan`, priced at the card's calibration batch), asks
`layercard train --dry-run` what a run of that plan would compute and cost, and trains that run in a
process of its own. With ``--replan`` it then plans again at the positions the dry run printed
(`--step-positions`, `--peak-positions`), and dry-runs and trains that plan too. With ``--processes N``
the dry run is asked for N processes and the run is trained under ``accelerate launch`` with the
package's ``ddp_cpu.yaml`` (N data-parallel CPU processes, each at ``--threads`` torch threads, 1 by
default there); ``--threads`` also sets the threads of every other command.

    .venv/bin/python benchmarks/dry_run.py --card runs/planning_cost_facts_400_params0.2x_r28/card/card.json
    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/dry_run.py \\
        --card runs/sst2b/out/card/card.json --name sst2 --task sst2:train --val-task sst2:validation \\
        --budget memory=2650 --batch-size 8 --max-length 128 --lr 1e-3 --steps 30 --replan
    OMP_NUM_THREADS=1 .venv/bin/layercard card --model smollm2 --task synthetic:facts --examples 16 \
        --batch-size 4 --out runs/facts_1thread/card
    .venv/bin/python benchmarks/dry_run.py --card runs/facts_1thread/card/card.json --name facts_2proc \
        --processes 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dry_run"


ENV: dict[str, str] = {}  # --threads: OMP_NUM_THREADS for every command


def _layercard(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launch: list[str] = []
    if processes > 1:
        from importlib.resources import files

        ddp = files("layercard") / "configs" / "accelerate" / "ddp_cpu.yaml"
        launch = [
            "accelerate.commands.launch",
            "--config_file",
            str(ddp),
            "--num_processes",
            str(processes),
            "-m",
        ]
    return subprocess.run(
        [sys.executable, "-m", *launch, "layercard", *args],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | ENV,
    )


def _case(args: argparse.Namespace, out: Path, label: str, plan_extra: list[str]) -> dict:
    """Plan, dry-run and train one plan; each command in a process of its own."""
    from layercard.cost import peak_of

    plan = out / f"{label}.plan.json"
    _layercard("plan", "--card", args.card, "--budget", args.budget, *plan_extra, "--out", str(plan))
    planned = json.loads(plan.read_text())
    train = ["--plan", str(plan), "--task", args.task, "--steps", str(args.steps)]
    train += [
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
    ]
    train += ["--eval-examples", "16", "--eval-every", "0", "--checkpoint-every", "0"]
    if args.val_task:
        train += ["--val-task", args.val_task]
    t0 = time.perf_counter()
    est = json.loads(
        _layercard("train", *train, "--dry-run", "--processes", str(args.processes), "--json").stdout
    )
    dry_s = time.perf_counter() - t0
    run = out / f"{label}_train"
    request = _request(args, planned)
    if (run / "train_metrics.json").exists():
        m = json.loads((run / "train_metrics.json").read_text())
        differ = _differ(run, m, request)
        if differ:
            raise SystemExit(
                f"{run} was trained with other settings ({', '.join(differ)}): remove it, or give "
                "another --out"
            )
    else:
        _layercard("train", *train, "--out", str(run), "--json", processes=args.processes)
        m = json.loads((run / "train_metrics.json").read_text())
        from layercard.artifacts import write_json

        write_json(run / REQUEST, request)
    keep = (
        "batch_positions_per_step", "max_batch_positions", "s_per_step", "s_per_step_spread",
        "peak_memory_mib", "peak_memory_kind", "predicted_memory_figure", "wall_time_s", "budget_notes",
        "trainable_params", "world_size", "predicted_step_time_scaled_s",
    )  # fmt: skip
    return {
        "plan_args": plan_extra,
        "placement": planned["predicted"].get("candidate"),
        # the figure the plan priced its peak by (that of a separate training process here)
        "plan_peak_mib": peak_of(
            planned["predicted"].get("memory"), planned["predicted"].get("memory_figure")
        ),
        "plan_memory_figure": planned["predicted"].get("memory_figure"),
        "plan_step_s": planned["predicted"].get("step_time_s"),
        "dry_run_s": dry_s,
        "dry_run": est,
        "measured": {k: m.get(k) for k in keep},
    }


REQUEST = "dry_run_request.json"  # beside a run's train_metrics.json: what this script asked it to train


def _request(args: argparse.Namespace, planned: dict) -> dict:
    """What a run's measured figures depend on, beyond the code: its settings and the plan's units."""
    return {
        "task": args.task,
        "val_task": args.val_task,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": float(args.lr),
        "processes": args.processes,
        "threads": args.threads,
        "units": [[u["key"], u["rank"]] for u in planned["units"]],
    }


def _differ(run: Path, metrics: dict, request: dict) -> list[str]:
    """The settings in which the run trained in ``run`` differs from ``request``. A run trained before the
    request was stored beside it is checked against what its train_metrics.json records (its threads and
    the units' ranks are not recorded there)."""
    path = run / REQUEST
    if path.is_file():
        stored = json.loads(path.read_text())
        return [k for k in request if stored.get(k) != request[k]]
    cfg, plan = metrics.get("config") or {}, metrics.get("plan") or {}
    recorded = {
        "steps": cfg.get("steps"),
        "batch_size": cfg.get("batch_size"),
        "max_length": cfg.get("max_length"),
        "lr": cfg.get("lr"),
        "processes": metrics.get("world_size"),
        "units": plan.get("units"),
    }
    want = {**request, "units": [key for key, _ in request["units"]]}
    return [k for k, v in recorded.items() if v != want[k]]


def _rows(c: dict) -> list[tuple[str, float, float]]:
    est, m = c["dry_run"], c["measured"]
    return [
        ("positions per step", est["positions_per_step"], m["batch_positions_per_step"]),
        ("largest micro-batch's positions", est["max_positions"], m["max_batch_positions"]),
        ("s/step (measured: median)", est["step_time_at_run_s"], m["s_per_step"]),
        ("peak memory MiB", est["peak_memory_at_run_mib"], m["peak_memory_mib"]),
        ("optimizer steps s (measured: the run's wall time)", est["steps_s"], m["wall_time_s"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--card", required=True, help="card.json of the task")
    ap.add_argument("--name", default="facts", help="the result files' name")
    ap.add_argument("--task", default="synthetic:facts")
    ap.add_argument("--val-task", default=None)
    ap.add_argument("--budget", default="params=0.2x")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", default="2e-3")
    ap.add_argument("--replan", action="store_true", help="plan again at the dry run's positions")
    ap.add_argument("--out", default=None, help="work folder (default: runs/dry_run_NAME)")
    ap.add_argument("--processes", type=int, default=1, help="train under accelerate launch in N processes")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every command")
    args = ap.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.out or HERE.parent / "runs" / f"dry_run_{args.name}")
    out.mkdir(parents=True, exist_ok=True)

    cases = {"the card's batch": _case(args, out, "card", [])}
    if args.replan:
        est = cases["the card's batch"]["dry_run"]
        at = [
            "--step-positions",
            f"{est['positions_per_step']:.1f}",
            "--peak-positions",
            str(est["max_positions"]),
        ]
        cases["the dry run's positions"] = _case(args, out, "replan", at)

    from layercard.artifacts import machine_info, package_versions, write_json, write_text

    res = {
        "card": args.card,
        "task": args.task,
        "budget": args.budget,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "processes": args.processes,
        "threads": args.threads or (1 if args.processes > 1 else None),
        "cases": cases,
        "machine": machine_info(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("dry_run" if args.name == "facts" else f"dry_run_{args.name}")
    write_json(f"{stem}.json", res)
    lines = [
        "# `layercard train --dry-run` against the run it describes",
        "",
        f"smollm2, `{args.task}`, `--budget {args.budget}` planned on its own from `{args.card}`, "
        f"{args.steps} steps of batch {args.batch_size}"
        + (
            f" per process in {args.processes} data-parallel processes (`accelerate launch`, ddp_cpu.yaml)"
            if args.processes > 1
            else ""
        )
        + (f", {res['threads']} torch thread(s) per process" if res["threads"] else "")
        + ", each command in a process of its own. Machine: "
        f"{res['machine'].get('processor')} · {res['machine'].get('cpu_count')} cores · {res['date']}.",
    ]
    for name, c in cases.items():
        p = c["placement"] or {}
        label = " · ".join(str(p.get(k)) for k in ("matrices", "layers", "rank")) if p else "—"
        lines += [
            "",
            f"## Planned at {name}" + (f" ({' '.join(c['plan_args'])})" if c["plan_args"] else ""),
            "",
            f"The plan: {label}, {c['measured']['trainable_params']:,} parameters, priced at "
            f"{c['plan_step_s']:.3f} s/step and a peak of {c['plan_peak_mib']:,.0f} MiB "
            f"({c['plan_memory_figure']} figure). The dry run took {c['dry_run_s']:.1f} s, model loading "
            "included.",
            "",
            "| | dry run | measured | measured / dry run |",
            "|---|---:|---:|---:|",
            *(f"| {k} | {a:,.3f} | {b:,.3f} | ×{b / a:.3f} |" for k, a, b in _rows(c)),
            "",
            "Budget notes: the dry run's "
            + ("; ".join(c["dry_run"]["budget_notes"]) or "none")
            + "; the run's "
            + ("; ".join(c["measured"]["budget_notes"] or []) or "none")
            + ".",
        ]
    lines += [
        "",
        "The run's wall time also holds its final validation, its unmerged forward timing and the adapter's "
        "writing, which the dry run's time of the optimizer steps leaves out.",
    ]
    write_text(f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
