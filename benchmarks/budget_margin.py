"""How far a budget the plan met holds when the run trains, on the committed `benchmarks/cost.py` runs.

A plan checks a ``memory`` or ``step_time`` budget at the card's calibration batch. A run peaks at its
largest micro-batch and its steps follow its mean positions, so a placement priced exactly at the budget
can train over it. Training therefore prices the plan again at its own batches before its first step and
warns where that puts a budget over (``over_budget`` in ``layercard.train.metrics``). No model is loaded:
every figure comes from what the runs recorded.

For each run of the current cost code (those that recorded their steps' spread) trained at its card's
batch, the budget is taken as tight as the plan allows, the plan's own price at the card's batch. The run
is *over* when it measured more than that; training would have *warned* when its price at the run's own
batches is more than that. Also: how often a run measured more than its price plus a margin, at the
card's batch and at its own batches, which is the margin to leave under a hard limit.

    .venv/bin/python benchmarks/budget_margin.py

Writes results/cost/budget_margin.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from cost import task_run_folders  # this folder is on sys.path

from layercard.artifacts import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost"
MARGINS = (0.0, 0.02, 0.05, 0.10)
# cost, the run's measured field, the plan's price at the card's batch, and at the run's own batches
COSTS = {
    "memory": ("peak_memory_mib", "predicted_peak_memory_mib", "predicted_peak_memory_scaled_mib"),
    "step_time": ("s_per_step", "predicted_step_time_s", "predicted_step_time_scaled_s"),
}


def run_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per run of ``folder`` (a card and its runs) that recorded its steps' spread and trained at
    its card's batch: the measured figures and both prices of each cost."""
    card = json.loads((folder / "card" / "card.json").read_text())
    cost = card.get("cost") or {}
    rows = []
    for path in sorted((folder / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if not r.get("s_per_step_spread") or r.get("setup", {}).get("batch") != cost.get("batch_size"):
            continue
        row: dict[str, Any] = {
            "folder": str(folder.relative_to(RESULTS)),
            "name": r["name"],
            "device": cost.get("device"),
            # smollm2, or a model of another one's shapes (random weights)
            "model": Path(r["setup"]["shapes"]).stem if r["setup"].get("shapes") else r["setup"].get("model"),
            "largest_over_card": r["max_batch_positions"] / cost["batch_positions"],
        }
        for kind, (measured, planned, scaled) in COSTS.items():
            if r.get(measured) and r.get(planned) and r.get(scaled):
                row[kind] = {"measured": r[measured], "planned": r[planned], "scaled": r[scaled]}
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The runs against a ``kind`` budget set at the plan's own price: how the measured figure lies from
    both prices, the warning's outcome counts, and the share over each price plus each margin."""
    cells = [r[kind] for r in rows if kind in r]
    to_plan = [c["measured"] / c["planned"] - 1 for c in cells]
    to_scaled = [c["measured"] / c["scaled"] - 1 for c in cells]
    # (warned, over) per run
    both = [(c["scaled"] > c["planned"], e > 0) for c, e in zip(cells, to_plan, strict=True)]
    return {
        "runs": len(cells),
        "from_planned": _errors(to_plan),
        "from_scaled": _errors(to_scaled),
        "warning": {
            "warned_and_over": sum(w and o for w, o in both),
            "warned_not_over": sum(w and not o for w, o in both),
            "over_not_warned": sum(o and not w for w, o in both),
            "neither": sum(not (w or o) for w, o in both),
        },
        "over_planned_by": {f"{m:g}": sum(e > m for e in to_plan) / len(cells) for m in MARGINS},
        "over_scaled_by": {f"{m:g}": sum(e > m for e in to_scaled) / len(cells) for m in MARGINS},
    }


def _errors(errs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(errs), "mean_abs": statistics.fmean(map(abs, errs))}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def main() -> None:
    # "proportional" folders re-price runs kept elsewhere under an older batch rule
    folders = [f for f in task_run_folders(RESULTS) if "proportional" not in f.parts]
    rows = [row for f in folders for row in run_rows(f)]
    groups = sorted({(r["device"], r["model"]) for r in rows})
    by_group = {
        f"{d} · {m}": {k: summary([r for r in rows if (r["device"], r["model"]) == (d, m)], k) for k in COSTS}
        for d, m in groups
    }
    out = {
        "benchmark": "budget_margin",
        "date": time.strftime("%Y-%m-%d"),
        "margins": list(MARGINS),
        "summary": by_group,
        "runs": rows,
    }
    write_json(RESULTS / "budget_margin.json", out)
    lines = [
        "# Does a budget the plan met hold in training?",
        "",
        "On the committed `benchmarks/cost.py` runs of the current cost code (those that recorded their "
        "steps' spread) trained at their card's batch (`benchmarks/budget_margin.py`). The budget is as "
        "tight as the plan allows: its own price at the card's calibration batch. *Over*: the run measured "
        "more; *warned*: its price at the run's own batches (the largest micro-batch for memory, the mean "
        "positions per step for step time) is more, which training says before its first step.",
    ]
    for group in by_group:
        folders = sorted({r["folder"] for r in rows if f"{r['device']} · {r['model']}" == group})
        lines += ["", f"## {group}: {len(folders)} task-runs", ""]
        lines += [
            "| cost | runs | measured from the plan's price: mean / mean absolute | from the price at the "
            "run's batches | warned and over | warned, not over | over, not warned | neither |",
            "|---|---:|---|---|---:|---:|---:|---:|",
        ]
        for kind in COSTS:
            s = out["summary"][group][kind]
            w = s["warning"]
            lines.append(
                f"| {kind} | {s['runs']} | {_pct(s['from_planned']['mean'])} / "
                f"{100 * s['from_planned']['mean_abs']:.1f}% | {_pct(s['from_scaled']['mean'])} / "
                f"{100 * s['from_scaled']['mean_abs']:.1f}% | {w['warned_and_over']} | "
                f"{w['warned_not_over']} | {w['over_not_warned']} | {w['neither']} |"
            )
        lines += [
            "",
            "Share of runs that measured more than the price plus a margin (a budget with that margin left "
            "under it, checked at the card's batch / at the run's own batches):",
            "",
            "| cost | " + " | ".join(f"+{100 * m:g}%" for m in MARGINS) + " |",
            "|---|" + "---:|" * len(MARGINS),
        ]
        for kind in COSTS:
            s = out["summary"][group][kind]
            cells = [
                f"{100 * s['over_planned_by'][f'{m:g}']:.0f}% / {100 * s['over_scaled_by'][f'{m:g}']:.0f}%"
                for m in MARGINS
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines += ["", "Task-runs: " + ", ".join(f"`{f}`" for f in folders) + "."]
    lines.append("")
    write_text(RESULTS / "budget_margin.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    from usage import no_options

    no_options(__doc__)
    main()
