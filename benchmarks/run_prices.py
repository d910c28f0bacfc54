"""What a run's plans priced against what its trainings measured, from the run folder alone.

`layercard run` prices each plan at the run's own batches (step time at the mean padded positions per
step, peak memory at the largest micro-batch) before any training, and each training records its median
step and peak beside that price (train_metrics.json). For each trained placement this sets the two side
by side, and also prices the same plan config at the card's calibration batch, as `layercard plan` does
without `--step-positions`/`--peak-positions` (re-planned from card.json; a search policy may pick
another placement there, which the table says). No model is loaded.

    .venv/bin/python benchmarks/run_prices.py --run-dir RUN --out benchmarks/results/run_prices/NAME

Writes OUT/run_prices.{json,md}. A log of the commands that made the run, if kept, goes beside them;
`--until-log FILE` names the log of a `--until plan` call, whose last line is its wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _card_batch_price(run_dir: Path, name: str) -> dict[str, Any]:
    """The placement's plan config priced at the card's batch (no run positions)."""
    from layercard import PlanConfig, make_plan
    from layercard.config.schema import ConfigError

    plan = json.loads((run_dir / "plan" / name / "plan.json").read_text())
    cfg = dict(plan["config"], step_positions=None, peak_positions=None)
    try:  # search policies choose the matrices themselves and refuse the roles they recorded
        again = make_plan(run_dir / "card" / "card.json", PlanConfig(**dict(cfg, roles=None)))
    except ConfigError:
        roles = cfg["roles"]
        again = make_plan(run_dir / "card" / "card.json", PlanConfig(**dict(cfg, roles=",".join(roles))))
    return {
        "s_per_step": again.predicted["step_time_s"],
        "peak_mib": again.predicted["memory"]["peak_mib"]
        if again.predicted["memory_figure"] == "window"
        else again.predicted["memory"]["first_step"]["peak_mib"],
        "positions": again.predicted["calibration_batch_positions"],
        "same_placement": [u.key for u in again.units] == plan_units(plan),
    }


def plan_units(plan: dict[str, Any]) -> list[str]:
    return [u["key"] for u in plan["units"]]


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per trained placement: the plan's price at the run's batches and the run's measurements."""
    out = []
    for metrics_file in sorted((run_dir / "train").glob("*/train_metrics.json")):
        m = json.loads(metrics_file.read_text())
        steps, name = m["steps"], metrics_file.parent.name
        card = _card_batch_price(run_dir, name)
        predicted = json.loads((run_dir / "plan" / name / "plan.json").read_text())["predicted"]
        figure = predicted.get("memory_figure", "window")
        memory = predicted["memory"] if figure == "window" else predicted["memory"][figure]
        out.append(
            {
                "placement": name,
                "steps": steps,
                "positions_per_step": m["batch_positions_per_step"],
                "max_positions": m["max_batch_positions"],
                "priced_s_per_step": m["predicted_step_time_scaled_s"],
                "measured_s_per_step": m["s_per_step"],
                "priced_steps_s": m["predicted_step_time_scaled_s"] * steps,
                "measured_steps_s": m["s_per_step"] * steps,
                "step_priced_over_measured": m["predicted_step_time_scaled_s"] / m["s_per_step"] - 1,
                "priced_peak_mib": m["predicted_peak_memory_scaled_mib"],
                "measured_peak_mib": m["peak_memory_mib"],
                "peak_measured_over_priced": m["peak_memory_mib"] / m["predicted_peak_memory_scaled_mib"] - 1,
                "plan_figure": figure,
                "plan_peak_mib": memory["peak_mib"],
                "plan_peak_over_measured": memory["peak_mib"] / m["peak_memory_mib"] - 1,
                "card_batch": card,
                "card_batch_step_over_measured": card["s_per_step"] / m["s_per_step"] - 1,
                "card_batch_peak_over_measured": card["peak_mib"] / m["peak_memory_mib"] - 1,
                "wall_time_s": m["wall_time_s"],
                "created": m["provenance"]["created"],
                "machine": m["provenance"]["machine"],
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    first = result["rows"][0]
    lines = [
        "# A run's plans priced at its own batches, and at the card's, against what it measured",
        "",
        f"Run folder `{result['run_dir']}`, trained {first['created'][:10]} on "
        f"{first['machine']['cpu_count']} CPU cores, {first['machine']['torch_threads']} torch threads. "
        "Steps: the median step; priced: the plan at the run's own batches (as the run did); "
        "card's batch: the same plan config priced at the card's calibration batch; "
        "peak: the process's resident peak. The training prices its peak again by the figure for where it "
        "runs; plan.json's own figure is the last column (a plan made in the card's process takes the "
        "window's figure, `window`; one made for a later process, the first step's, `first_step`).",
    ]
    if result.get("until_plan_s"):
        lines += [
            "",
            f"The `--until plan` call took {result['until_plan_s']} in all (the last line of its log).",
        ]
    lines += [
        "",
        "| placement | steps | positions per step / most | priced s/step | measured | price vs measured "
        "| card's batch | priced time of steps | measured | priced peak MiB | measured | measured vs priced "
        "| card's batch | plan.json's peak (its figure) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        c = r["card_batch"]
        other = "" if c["same_placement"] else " (another placement)"
        lines.append(
            f"| {r['placement']} | {r['steps']} | {r['positions_per_step']:.1f} / {r['max_positions']} | "
            f"{r['priced_s_per_step']:.3f} | {r['measured_s_per_step']:.3f} | "
            f"{100 * r['step_priced_over_measured']:+.1f}% | {c['s_per_step']:.3f} at {c['positions']:.0f} "
            f"({100 * r['card_batch_step_over_measured']:+.1f}%){other} | {r['priced_steps_s']:.1f} s | "
            f"{r['measured_steps_s']:.1f} s | {r['priced_peak_mib']:,.0f} | {r['measured_peak_mib']:,.0f} | "
            f"{100 * r['peak_measured_over_priced']:+.1f}% | {c['peak_mib']:,.0f} "
            f"({100 * r['card_batch_peak_over_measured']:+.1f}%) | {r['plan_peak_mib']:,.0f} "
            f"({100 * r['plan_peak_over_measured']:+.1f}%, {r['plan_figure']}) | {r['wall_time_s']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--until-log", type=Path, help="the log of a `--until plan` call (its last line: wall time)"
    )
    args = ap.parse_args()
    result: dict[str, Any] = {"run_dir": str(args.run_dir), "written": time.strftime("%Y-%m-%d")}
    if args.until_log is not None:
        last = args.until_log.read_text().strip().splitlines()[-1]
        result["until_plan_s"] = last if last.endswith(" s") else None
    result["rows"] = rows(args.run_dir)
    if not result["rows"]:
        raise SystemExit(f"{args.run_dir}: no train/*/train_metrics.json")
    from layercard.artifacts import write_json, write_text

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "run_prices.json", result)
    write_text(args.out / "run_prices.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
