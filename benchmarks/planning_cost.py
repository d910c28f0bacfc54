"""Planning cost against a training run of practical length: the demo's card guiding a long run.

Runs `layercard run` on the packaged demo config for one built-in task with only the recommended
placement, trained for ``--steps`` steps (the demo trains 24), and writes the card's wall time against
the training it guided, as the run's report states it. Resumable: the run folder keeps every finished
stage, so a second call only writes the results.

    .venv/bin/python benchmarks/planning_cost.py [--task facts] [--steps 400] [--budget params=0.2x]
    .venv/bin/python benchmarks/planning_cost.py --budget params=0.25x --label r2   # a repeat
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "planning_cost"
# card.json `timings`: probe_s includes stats_s.
_PARTS = {
    "probe_s": "probe pass with its statistics",
    "stats_s": "of which statistics",
    "calibrate_s": "cost calibration",
    "target_entropy_s": "target entropy",
    "weight_snr_s": "weight SNRs",
    "coupling_s": "coupling",
}
# What the run recorded of its plan's prices against what it measured (train_metrics.json), so the
# results carry the cost model's figures for the run and not only the planning share.
PRICED = (
    "predicted_step_time_s",
    "predicted_step_time_scaled_s",
    "step_time_ratio",
    "s_per_step_spread",
    "batch_positions_per_step",
    "max_batch_positions",
    "peak_memory_kind",
    "peak_memory_mib",
    "predicted_peak_memory_mib",
    "predicted_peak_memory_scaled_mib",
    "predicted_memory_figure",
    "peak_memory_ratio",
    "peak_memory_start_mib",
    "predicted_peak_memory_at_start_mib",
    "peak_memory_at_start_ratio",
    "forward_s",
    "predicted_forward_s",
    "forward_ratio",
)


def priced(metrics_path: Path) -> dict:
    """The run's predicted and measured step time, peak memory and forward, as training recorded them."""
    m = json.loads(metrics_path.read_text())
    return {k: m.get(k) for k in PRICED}


def priced_lines(p: dict, s_per_step: float) -> list[str]:
    """The markdown lines stating the plan's prices against the run."""
    out = []
    step = p.get("predicted_step_time_scaled_s") or p.get("predicted_step_time_s")
    if step:
        at = p.get("batch_positions_per_step")
        out.append(
            f"- Step time measured {s_per_step:.3f} s against {step:.3f} s priced"
            + (f" at the run's {at:,.1f} padded positions per step" if at else "")
            + f" (×{s_per_step / step:.3f}; the plan's own price {p['predicted_step_time_s']:.3f} s)."
        )
    peak = p.get("predicted_peak_memory_scaled_mib") or p.get("predicted_peak_memory_mib")
    if peak and p.get("peak_memory_mib"):
        start = (
            f"; restated from the run's start {p['predicted_peak_memory_at_start_mib']:,.0f} MiB"
            f" (×{p['peak_memory_at_start_ratio']:.3f})"
            if p.get("peak_memory_at_start_ratio")
            else ""
        )
        out.append(
            f"- Peak memory ({p.get('peak_memory_kind')}) measured {p['peak_memory_mib']:,.0f} MiB against "
            f"{peak:,.0f} MiB priced (×{p['peak_memory_mib'] / peak:.3f}; the "
            f"{p.get('predicted_memory_figure')} figure at the largest micro-batch, "
            f"{p.get('max_batch_positions')} positions){start}."
        )
    if p.get("forward_s") and p.get("predicted_forward_s"):
        out.append(
            f"- Unmerged forward measured {p['forward_s']:.3f} s against {p['predicted_forward_s']:.3f} s "
            "priced."
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="facts", choices=("facts", "format"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--budget", default="params=0.2x", help="the recommendation's budget (the demo's)")
    ap.add_argument("--run", default=None, help="run folder (default: one under runs/)")
    ap.add_argument(
        "--label", default="", help="a repeat's name: its run folder and result files end with _LABEL"
    )
    args = ap.parse_args()
    tag = args.budget.replace("=", "").replace(",", "_") + (f"_{args.label}" if args.label else "")
    run = Path(args.run or HERE.parent / "runs" / f"planning_cost_{args.task}_{args.steps}_{tag}")
    sets = [
        f"task.train=synthetic:{args.task}",
        f"task.eval=synthetic:{args.task}",
        f"placements=[{{name: recommend, policy: recommend, budget: '{args.budget}'}}]",
        f"train.steps={args.steps}",
        # A long run validates and checkpoints every 100 steps, as one a practitioner keeps would.
        "train.eval_every=100",
        "train.checkpoint_every=100",
        "eval.base=false",
    ]
    from layercard.pipeline.config import demo_config_path

    cmd = [sys.executable, "-m", "layercard", "run", str(demo_config_path()), "--out", str(run), "--json"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0

    from layercard.artifacts import machine_info, package_versions, write_json, write_text
    from layercard.card import Card
    from layercard.report.results import planning_sentence, planning_share
    from layercard.train.metrics import TrainMetrics

    card = Card.load(run / "card" / "card.json")
    metrics = TrainMetrics.load(run / "train" / "recommend" / "train_metrics.json")
    share, steps_for_tenth = planning_share(card.timings["total_s"], metrics.wall_time_s, metrics.s_per_step)
    res = {
        "task": args.task,
        "budget": args.budget,
        "steps": metrics.steps,
        "batch_size": metrics.batch_size,
        "card_s": card.timings["total_s"],
        "card_timings": card.timings,
        "train_wall_s": metrics.wall_time_s,
        "s_per_step": metrics.s_per_step,
        "planning_share": share,
        "steps_for_10pct": steps_for_tenth,
        "policy": metrics.plan["policy"],
        "modules": metrics.plan["modules"],
        "trainable_params": metrics.trainable_params,
        "final_val_loss": metrics.final_val_loss,
        "priced": priced(run / "train" / "recommend" / "train_metrics.json"),
        "sentence": planning_sentence(card, {"recommend": metrics}, "recommend"),
        "this_call_wall_s": wall,
        "settings": sets,
        "machine": machine_info(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{args.task}_{metrics.steps}_{tag}"
    write_json(f"{stem}.json", res)
    t = card.timings
    lines = [
        f"# Planning cost: the demo's card against a {metrics.steps}-step run ({args.task})",
        "",
        f"smollm2, built-in task `{args.task}`, the packaged demo config with only the recommended placement "
        f"({args.budget}), trained {metrics.steps} steps of batch {metrics.batch_size}. "
        f"Machine: {res['machine'].get('processor')} · {res['machine'].get('cpu_count')} cores · "
        f"{res['date']}.",
        "",
        "| | seconds |",
        "|---|---:|",
        f"| card (total) | {t['total_s']:.1f} |",
        *(f"| · {_PARTS[k]} | {t[k]:.1f} |" for k in _PARTS if t.get(k)),
        f"| training the recommendation | {metrics.wall_time_s:.1f} |",
        "",
        f"- **Card / training = {100 * share:.1f}%** at {metrics.s_per_step:.2f} s/step (median step).",
        f"- The card is 10% of a run of {steps_for_tenth:,} steps or more at that step time.",
        f"- The run's report says: {res['sentence']}",
        *priced_lines(res["priced"], metrics.s_per_step),
    ]
    write_text(f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
