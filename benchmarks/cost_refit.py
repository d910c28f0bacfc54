"""Cost model variants refitted on the committed `benchmarks/cost.py` runs: no model is loaded.

Each task-run folder holds its card (with the calibration's every timed step) and the step time its 12
placements measured. Two variants of the step-time model are refitted on the card's own calibration rows,
with the same non-negative least squares, and re-price the run's placements (rescaled to each run's
positions as the run recorded):

- the statistic of a calibration placement's timed steps: their median, their fastest, or the last; and
  the fastest of the first round's alone (`fastest-round1`), what the calibration would have given without
  timing again the placements whose times contradicted each other; and the fastest, fitted without one of
  the five calibration placements (`fastest-no-middle`: the middle layer alone; `fastest-no-r32`: every
  layer at rank 32), what a shorter calibration would have given;
- the module term: the adapted modules' count, or their width Σ (d_in + d_out). The calibration's
  placements all adapt every linear role, so on them the two are proportional; they differ only on
  placements of narrower or wider modules.

    .venv/bin/python benchmarks/cost_refit.py [FOLDER ...] [--chosen-on A,B] [--since F]  # default: CPU's

By default every task-run whose card was calibrated on a CPU. Writes results/cost/refit.{json,md}.
``--chosen-on`` names the folders the statistic in use was chosen on; ``--since`` a folder after whose
task-runs the rest are summed up apart (the module term's width was first refitted on the task-runs up to
``fifth``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from cost import GRID, task_run_folders  # this folder is on sys.path
from scipy.optimize import nnls

from layercard.artifacts import write_json, write_text
from layercard.cost import timings_by_round
from layercard.models.roles import parse_roles

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost"
ROLES = {p.name: p.roles for p in GRID}
STATISTICS = {
    "median": statistics.median,
    "fastest": min,
    "last": lambda xs: xs[-1],
    "fastest-round1": min,
    "fastest-no-middle": min,
    "fastest-no-r32": min,
}
TERMS = ("count", "width")


def _width(card: dict[str, Any], roles: Any, layers: list[int]) -> float:
    wanted, at = set(parse_roles(roles)), set(layers)
    return float(
        sum(u["d_in"] + u["d_out"] for u in card["units"] if u["role"] in wanted and u["layer"] in at)
    )


def task_run(folder: Path) -> dict[str, Any]:
    """Every variant's fit on one task-run's calibration and its signed errors on the run's placements."""
    card = _card(folder)
    n_layers, rows = card["model"]["n_layers"], card["cost"]["measured"]
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]

    def x(layers: list[int], modules: int, params: int, roles: Any, term: str) -> list[float]:
        size = modules if term == "count" else _width(card, roles, layers) / 1e3
        return [1.0, n_layers - min(layers), size, params / 1e6]

    # The statistic this card's calibration used: its recorded predictions must come back from that fit.
    fastest = all(abs(r["s_per_step"] - min(r["timings_s_per_step"])) < 1e-3 for r in rows)
    shipped = (
        "fastest" if fastest else "median",
        "width" if card["cost"].get("step_module_width") else "count",
    )
    errors: dict[str, list[float]] = {}

    def timings(row: dict[str, Any], stat: str) -> list[float]:
        xs = row["timings_s_per_step"]
        if stat.endswith("-round1"):
            return timings_by_round(row)[0]
        return xs

    def kept(stat: str) -> list[dict[str, Any]]:
        """The calibration rows a variant fits on: without the middle layer alone, or without every layer
        at rank 32, the two ``-no-`` variants ask what a shorter calibration would have given."""
        if stat.endswith("-no-middle"):
            return [r for r in rows if not (len(r["layers"]) == 1 and 0 < r["layers"][0] < n_layers - 1)]
        if stat.endswith("-no-r32"):
            return [r for r in rows if r["rank"] != 32]
        return rows

    for stat, f in STATISTICS.items():
        fit_rows = kept(stat)
        y = np.array([f(timings(r, stat)) for r in fit_rows], dtype=float)
        for term in TERMS:
            a = np.array([x(r["layers"], r["modules"], r["params"], card["roles"], term) for r in fit_rows])
            coef, _ = nnls(a, y)
            errs = []
            for run in runs:
                pred = float(coef @ x(run["layers"], run["modules"], run["params"], ROLES[run["name"]], term))
                if (stat, term) == shipped and abs(pred / run["predicted_step_time_s"] - 1) > 1e-3:
                    raise SystemExit(
                        f"{folder}: the refit does not reproduce {run['name']}'s recorded prediction"
                    )
                scale = run["predicted_step_time_scaled_s"] / run["predicted_step_time_s"]
                errs.append(pred * scale / run["s_per_step"] - 1)
            errors[f"{stat}/{term}"] = errs
    return {
        "folder": str(folder.relative_to(RESULTS)),
        "shipped": "/".join(shipped),
        "placements": [r["name"] for r in runs],
        "errors": errors,
    }


def summary_groups(
    runs: list[dict[str, Any]], chosen_on: set[str], since: str = ""
) -> list[tuple[str, list[dict[str, Any]]]]:
    """The groups a refit table sums up: every task-run; where some were marked, those a variant was
    chosen on and the rest; with ``since`` (a folder whose task-runs are in ``runs``, which are in the
    order they were made), the task-runs up to that folder's and those after (empty groups left out)."""
    groups = [("all", runs)]
    if chosen_on:
        groups += [
            ("chosen on", [r for r in runs if r["folder"] in chosen_on]),
            ("not chosen on", [r for r in runs if r["folder"] not in chosen_on]),
        ]
    if since:
        at = [i for i, r in enumerate(runs) if Path(r["folder"]).parent == Path(since)]
        if not at:
            raise SystemExit(f"--since {since}: no task-run of that folder among those refitted")
        groups += [(f"up to {since}", runs[: at[-1] + 1]), (f"after {since}", runs[at[-1] + 1 :])]
    return [(name, group) for name, group in groups if group]


def _card(folder: Path) -> dict[str, Any]:
    return _read_card(folder.resolve())


@functools.cache
def _read_card(folder: Path) -> dict[str, Any]:
    """A task-run's card, read once: the order, the device filter and the refit each need it."""
    return json.loads((folder / "card" / "card.json").read_text())


def made(folder: Path) -> str:
    """When a task-run's card was made (its provenance), which orders the task-runs as they were run."""
    return _card(folder)["provenance"]["created"]


def on_cpu(folder: Path) -> bool:
    """Whether the task-run's card was calibrated on a CPU: the default refit's, since the statistic and
    the module term were chosen there; a GPU's task-runs are refitted when named."""
    return _card(folder)["cost"].get("device") == "cpu"


def _mae(errs: list[float]) -> float:
    return 100 * statistics.fmean(abs(e) for e in errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--chosen-on", default="", help="comma list of folders (relative to results/cost)")
    ap.add_argument(
        "--since",
        default="",
        help="a results/cost folder: the task-runs up to its own and after, summed apart",
    )
    args = ap.parse_args()
    folders = sorted(args.folders or [f for f in task_run_folders(RESULTS) if on_cpu(f)], key=made)
    runs = [task_run(f.resolve()) for f in folders]
    chosen_on = {s for s in args.chosen_on.split(",") if s}
    write_json(
        RESULTS / "refit.json",
        {
            "benchmark": "cost_refit",
            "date": time.strftime("%Y-%m-%d"),
            "chosen_on": sorted(chosen_on),
            "since": args.since,
            "runs": runs,
        },
    )
    variants = list(runs[0]["errors"])
    lines = [
        "# Cost model variants refitted on the committed cost runs",
        "",
        "Each task-run's own calibration refitted per variant (statistic of a placement's timed steps / "
        "module term) and scored on that run's 12 placements. Cells: mean absolute error of the step time, "
        "then the mean signed error (positive: over-predicted). Each run's own predictions came from the "
        "variant named beside it. Task-runs marked * are those the statistic in use (`fastest`) was chosen "
        "on, after seeing all of them; the others were measured after it was fixed. Rows are in the order "
        "the task-runs were made (their cards' creation time)"
        + ("; every task-run calibrated on a CPU." if not args.folders else "; the task-runs named."),
        "",
        "| task-run | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for r in runs:
        mark = " *" if r["folder"] in chosen_on else ""
        cells = [
            f"{_mae(r['errors'][v]):.1f}% ({100 * statistics.fmean(r['errors'][v]):+.1f}%)" for v in variants
        ]
        lines.append(f"| {r['folder']}{mark} ({r['shipped']}) | " + " | ".join(cells) + " |")
    for name, group in summary_groups(runs, chosen_on, args.since):
        cells = []
        for v in variants:
            within = sum(_mae(r["errors"][v]) <= 10 for r in group)
            bias = 100 * statistics.fmean(e for r in group for e in r["errors"][v])
            cells.append(
                f"{statistics.fmean(_mae(r['errors'][v]) for r in group):.1f}% ({bias:+.1f}%), "
                f"≤10% in {within}/{len(group)}"
            )
        lines.append(f"| **mean, {name} ({len(group)})** | " + " | ".join(cells) + " |")
    lines.append("")
    write_text(RESULTS / "refit.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
