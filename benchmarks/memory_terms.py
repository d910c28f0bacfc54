"""The memory model's module term refitted on the committed `benchmarks/cost.py` runs: no model is loaded.

The memory a placement adds is fitted to four terms: a constant, the layers backward reaches, the adapted
modules and the adapter parameters. What each adapted module keeps for its backward is its input, and
modules that read the same tensor (q, k and v; gate and up) keep it once, so the module term can be
priced in more than one way:

- ``count``: the adapted modules' number (the model's term until this benchmark);
- ``width``: Σ (d_in + d_out) over the adapted modules;
- ``d_in``: Σ d_in over the adapted modules;
- ``inputs``: Σ d_in over the distinct input tensors the adapted modules read (one per layer and input
  group).

The calibration's placements all adapt every linear role, so on them the four are proportional and the
fit is the same; they differ on placements of some roles only. Each task-run's calibration is refitted
per term and scored on its run's 12 placements, against each run's peak (rescaled to its largest
micro-batch as the run recorded) and against what training added over its own start. Task-runs priced
by the first step's memory figure (runs in a process that ran no calibration, since that figure is in use)
are left out: what is refitted here is the window's figure.

    .venv/bin/python benchmarks/memory_terms.py [--chosen-on A,B,...]

Writes results/cost/memory_terms.{json,md}. ``--chosen-on`` names the folders (relative to
results/cost) the term was chosen on; the rest are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from cost import GRID, task_run_folders  # this folder is on sys.path
from cost_refit import summary_groups

from layercard.artifacts import write_json, write_text
from layercard.cost import CostModel, fit_memory
from layercard.models.roles import parse_roles

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost"
ROLES = {p.name: p.roles for p in GRID}
TERMS = ("count", "width", "d_in", "inputs")


def module_term(card: dict[str, Any], roles: Any, layers: list[int], term: str) -> float:
    """The module term of a placement (every unit of ``roles`` on ``layers``) under ``term``."""
    wanted, at = set(parse_roles(roles)), set(layers)
    units = [u for u in card["units"] if u["role"] in wanted and u["layer"] in at]
    if term == "count":
        return float(len(units))
    if term == "width":
        return sum(u["d_in"] + u["d_out"] for u in units) / 1e3
    if term == "d_in":
        return sum(u["d_in"] for u in units) / 1e3
    return sum({u["group"]: u["d_in"] for u in units}.values()) / 1e3


def task_run(folder: Path) -> dict[str, Any] | None:
    """Every term's fit on one task-run's calibration and its signed errors on the run's placements; None
    where the card measured no per-placement memory or its runs were priced by the first step's figure."""
    card = json.loads((folder / "card" / "card.json").read_text())
    cost, n_layers = card["cost"], card["model"]["n_layers"]
    rows = cost["measured"]
    if cost.get("memory_base_mib") is None or any(r.get("resident_mib") is None for r in rows):
        return None
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    if any(r.get("predicted_memory_figure") == "first_step" for r in runs):
        return None  # priced by the first step's terms, not the window's refitted here
    resident = float(cost["memory_resident_mib"])
    # the term this card's own predictions were priced with: they must come back from its refit
    shipped = "d_in" if cost.get("memory_module_width") else "count"
    peak_err: dict[str, list[float]] = {}
    added_err: dict[str, list[float | None]] = {}
    for term in TERMS:
        # the card's own fit with each row's modules counted under ``term`` (on these rows the terms are
        # proportional, so only the module coefficient's unit changes)
        fit_rows = [r | {"modules": module_term(card, card["roles"], r["layers"], term)} for r in rows]
        terms = {
            k: v for k, v in fit_memory(fit_rows, n_layers, resident).items() if k != "memory_module_width"
        }
        model = CostModel.from_dict(cost | terms | {"memory_module_width": None})
        peaks, added = [], []
        for run in runs:
            m = module_term(card, ROLES[run["name"]], run["layers"], term)
            adds = float(model.peak_memory(run["layers"], m, run["params"])) - resident  # type: ignore[arg-type]
            recorded = run["predicted_peak_memory_mib"] - resident
            if term == shipped and abs(adds - recorded) > 0.5:
                raise SystemExit(f"{folder}: the refit does not reproduce {run['name']}'s recorded memory")
            # the run's own rescaling to its largest micro-batch, applied to what training adds
            scale = (run["predicted_peak_memory_scaled_mib"] - resident) / recorded
            peaks.append((resident + adds * scale) / run["peak_memory_mib"] - 1)
            start = run.get("peak_memory_start_mib")
            added.append(None if start is None else adds * scale / (run["peak_memory_mib"] - start) - 1)
        peak_err[term], added_err[term] = peaks, added
    return {
        "folder": str(folder.relative_to(RESULTS)),
        "placements": [r["name"] for r in runs],
        "peak": peak_err,
        "added": added_err,
    }


def _known(errs: list[float | None]) -> list[float]:
    return [e for e in errs if e is not None]


def _mae(errs: list[float | None]) -> float:
    return 100 * statistics.fmean(abs(e) for e in _known(errs))


def _cell(errs: list[float | None]) -> str:
    known = _known(errs)
    return f"{_mae(known):.1f}% ({100 * statistics.fmean(known):+.1f}%)" if known else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chosen-on", default="", help="comma list of folders (relative to results/cost)")
    args = ap.parse_args()
    # "proportional" folders re-price runs kept elsewhere under an older batch rule
    found = [f for f in task_run_folders(RESULTS) if "proportional" not in f.parts]
    runs = [r for r in (task_run(f) for f in found) if r is not None]
    chosen_on = {s for s in args.chosen_on.split(",") if s}
    write_json(
        RESULTS / "memory_terms.json",
        {
            "benchmark": "memory_terms",
            "date": time.strftime("%Y-%m-%d"),
            "chosen_on": sorted(chosen_on),
            "runs": runs,
        },
    )
    lines = [
        "# The memory model's module term, refitted on the committed cost runs",
        "",
        "Each task-run's own calibration refitted per module term and scored on that run's 12 placements "
        "(`benchmarks/memory_terms.py`). Cells: mean absolute error, then the mean signed error (positive: "
        "priced high). Task-runs marked * are those the term was chosen on. Task-runs whose runs were priced "
        "by the first step's memory figure are left out.",
    ]
    for what, label in (("peak", "Peak memory"), ("added", "What training added over its own start")):
        lines += [
            "",
            f"## {label}",
            "",
            "| task-run | " + " | ".join(TERMS) + " |",
            "|---|" + "---:|" * len(TERMS),
        ]
        for r in runs:
            mark = " *" if r["folder"] in chosen_on else ""
            lines.append(f"| {r['folder']}{mark} | " + " | ".join(_cell(r[what][t]) for t in TERMS) + " |")
        for name, group in summary_groups(runs, chosen_on):
            cells = []
            for t in TERMS:
                per_run = [_mae(r[what][t]) for r in group if _known(r[what][t])]
                within = sum(m <= 10 for m in per_run)
                cells.append(f"{statistics.fmean(per_run):.1f}%, ≤10% in {within}/{len(per_run)}")
            lines.append(f"| **mean, {name} ({len(group)})** | " + " | ".join(cells) + " |")
        # by the roles a placement adapts, over every task-run
        lines += ["", "By the roles a placement adapts (every task-run):", ""]
        lines += ["| roles | placements | " + " | ".join(TERMS) + " |", "|---|---:|" + "---:|" * len(TERMS)]
        for roles in sorted({ROLES[p] for r in runs for p in r["placements"]}):
            errs = {
                t: [
                    e
                    for r in runs
                    for p, e in zip(r["placements"], r[what][t], strict=True)
                    if ROLES[p] == roles
                ]
                for t in TERMS
            }
            n = len(_known(errs["count"]))
            lines.append(f"| {roles} | {n} | " + " | ".join(_cell(errs[t]) for t in TERMS) + " |")
    lines.append("")
    write_text(RESULTS / "memory_terms.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
