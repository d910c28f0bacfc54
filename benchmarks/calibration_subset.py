"""Which calibration placements a card needs: the committed cost runs re-priced from fewer of them.

No model is loaded. Each task-run folder of `benchmarks/cost.py` holds its card (the calibration's five
placements with their step time, memory and unmerged forward) and what its 12 placements measured. Each
variant below refits the card's cost model from a subset of those measurements, with the same fits the
calibration uses, and prices the runs again exactly as training priced them (rescaled to each run's
positions):

- ``as calibrated``: all five placements (must reproduce every run's recorded prediction);
- ``no middle``: without the middle layer alone, for step time, memory and forward;
- ``forward: all-layer``: the forward's line through the base model and the two all-layer placements
  only (the single-layer placements' forwards add one module group each, next to no time);
- ``forward: all-layer r8``: through the base model and every layer at rank 8 only;
- ``shorter``: no middle layer and the forward through the all-layer placements only;
- ``again: the slower only``: where placements were timed again because a costlier one had been timed
  faster, only the slower, cheaper one of each such pair timed again (load only slows a step); the other
  keeps its first round's steps (its memory stays the median over both rounds: the rows do not keep each
  round's starting memory). Every placement's time is its fastest step, so read it against ``fastest
  step``;
- ``one timed step``: each round's first timed step alone (and the half batch's), for step time and the
  share of it that grows with positions. Memory stays as recorded: the rows keep the peak over the whole
  window, which a shorter window might not reach, so that column does not tell what the variant would do;
- ``no top``: without the top layer alone, for step time and memory;
- ``again: one timed step``: a placement timed again gets one timed step in that round instead of all of
  them (its warm-up kept), for step time; what the calibration does since it was chosen here, so on
  cards made since it agrees with ``as calibrated``. Memory stays as recorded, as for ``one timed step``.
  It also takes every placement's fastest step, so read it against ``fastest step``, not ``as calibrated``;
- ``fastest step``: every placement's fastest timed step, every round kept: today's rule on every card.
  Cards made before it recorded the mean of a placement's steps, so on them this column, not ``as
  calibrated``, is what the ``again`` variants change.
- ``fastest step, no middle``: ``no middle`` read against ``fastest step``.

What each variant would save is estimated from the card's own recorded times: a placement's warm-up and
timed steps, and two forward passes at its fastest.

    .venv/bin/python benchmarks/calibration_subset.py [FOLDER ...]   # default: every folder of results/cost

Writes results/cost/calibration_subset.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from cost import GRID, priced, task_run_folders  # this folder is on sys.path

from layercard.artifacts import read_json, write_json, write_text
from layercard.cost import timings_by_round

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost"
VARIANTS = (
    "as calibrated", "no middle", "forward: all-layer", "forward: all-layer r8", "shorter",
    "again: the slower only", "one timed step", "no top", "again: one timed step", "fastest step",
    "fastest step, no middle",
)  # fmt: skip
MEASURES = ("step", "memory", "forward")


def _kind(row: dict[str, Any], n_layers: int) -> str:
    layers = row["layers"]
    if len(layers) == n_layers:
        return f"all-r{row['rank']}"
    return {n_layers - 1: "top", 0: "bottom"}.get(layers[0], "middle")


def _rows(rows: list[dict[str, Any]], n_layers: int, drop: set[str]) -> list[dict[str, Any]]:
    return [r for r in rows if _kind(r, n_layers) not in drop]


def _fastest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with each placement's time its fastest timed step, as calibrations since ``fifth`` take it
    (before, the mean of its steps): the baseline every ``again`` variant changes."""
    return [r | {"s_per_step": min(r["timings_s_per_step"])} for r in rows]


def _slower_only(rows: list[dict[str, Any]], rounds: int) -> tuple[list[dict[str, Any]], float]:
    """``rows`` as the calibration gives them when it times again only the slower placement of each pair
    whose first times contradicted each other, and the seconds that leaves out. The rows of a card that
    timed again both of a pair carry the extra round of each."""
    from layercard.cost import _out_of_order

    def first_rounds(r: dict[str, Any]) -> list[float]:
        return [x for rnd in timings_by_round(r)[:rounds] for x in rnd]

    rows = _fastest(rows)
    configs = [(r["layers"], r["rank"]) for r in rows]
    suspects = set(_out_of_order(configs, [min(first_rounds(r)) for r in rows]))
    out, saved = [], 0.0
    for i, r in enumerate(rows):
        if i in suspects or len(r["warmup_s_by_round"]) == rounds:
            out.append(r)
            continue
        steps = first_rounds(r)
        saved += sum(r["warmup_s_by_round"][rounds:]) + sum(r["timings_s_per_step"][len(steps) :])
        saved += 2 * (r["forward_s"] or 0.0)  # the forward it timed again
        out.append(r | {"s_per_step": min(steps)})
    return out, saved


def _model(cost: dict[str, Any], variant: str, rounds: int = 1) -> tuple[Any, float]:
    """The card's cost model refitted for ``variant``, and the calibration seconds the variant leaves out."""
    from layercard.cost import CostModel, first_step_terms, fit_forward, fit_memory, fit_step_time

    rows, n_layers = cost["measured"], cost["n_layers"]
    saved = 0.0
    changes: dict[str, Any] = {}
    if variant == "again: the slower only":
        rows, saved = _slower_only(rows, rounds)
    if variant == "one timed step":
        rows, saved, changes = _one_step(cost)
    if variant == "again: one timed step":
        rows, saved = _again_one_step(rows, rounds)
    if variant in ("fastest step", "fastest step, no middle"):
        rows = _fastest(rows)
    no_middle = variant in ("no middle", "shorter", "fastest step, no middle")
    fwd_drop = {"top", "bottom", "middle"} if variant in ("forward: all-layer", "shorter") else set()
    if variant == "forward: all-layer r8":
        fwd_drop = {"top", "bottom", "middle", "all-r32"}
    step_rows = _rows(rows, n_layers, {"middle"} if no_middle else {"top"} if variant == "no top" else set())
    changes |= fit_step_time(step_rows, n_layers)
    if cost.get("memory_base_mib") is not None:
        memory = fit_memory(step_rows, n_layers, cost.get("memory_resident_mib"))
        changes |= {k: v for k, v in memory.items() if k != "memory_resident_mib"}
        if cost.get("memory_first_step"):  # the first step's terms from the same rows, as the card fits them
            changes["memory_first_step"] = first_step_terms(step_rows, n_layers, memory, cost)
    base = (cost.get("batch_scaling") or {}).get("forward_s")
    if base is not None:
        changes |= fit_forward(base, _rows(rows, n_layers, fwd_drop))
    for r in rows:
        kind = _kind(r, n_layers)
        if (no_middle and kind == "middle") or (variant == "no top" and kind == "top"):
            forward = 2 * (r["forward_s"] or 0.0) * len(r["warmup_s_by_round"])
            saved += sum(r["warmup_s_by_round"]) + sum(r["timings_s_per_step"]) + forward
        elif kind in fwd_drop and r["forward_s"]:
            saved += 2 * r["forward_s"] * len(r["warmup_s_by_round"])
    return CostModel.from_dict(cost | changes), saved


def _again_one_step(rows: list[dict[str, Any]], rounds: int) -> tuple[list[dict[str, Any]], float]:
    """``rows`` with each round after the first ``rounds`` (a placement timed again) cut to its first timed
    step, and the seconds that leaves out."""
    out, saved = [], 0.0
    for r in rows:
        by_round = timings_by_round(r)
        kept = [x for rnd in by_round[:rounds] for x in rnd] + [rnd[0] for rnd in by_round[rounds:]]
        saved += sum(r["timings_s_per_step"]) - sum(kept)
        out.append(r | {"s_per_step": min(kept)})
    return out, saved


def _one_step(cost: dict[str, Any]) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """The rows with each round's first timed step alone, the seconds that leaves out, and the step share
    that grows with positions from the first timed steps of the full and the half batch."""
    from layercard.cost import position_share

    rows, saved = [], 0.0
    for r in cost["measured"]:
        firsts = [rnd[0] for rnd in timings_by_round(r)]
        saved += sum(r["timings_s_per_step"]) - sum(firsts)
        rows.append(r | {"s_per_step": min(firsts)})
    changes: dict[str, Any] = {}
    scaling = cost.get("batch_scaling") or {}
    half = scaling.get("half_timings_s_per_step")
    if half and cost.get("step_position_share") is not None:
        full = next(r for r in rows if _kind(r, cost["n_layers"]) == "all-r8")
        saved += sum(half[1:])
        share = position_share(full["s_per_step"], half[0], scaling["positions"], scaling["half_positions"])
        changes["step_position_share"] = share
    return rows, saved, changes


def _errors(model: Any, run: dict[str, Any]) -> dict[str, float | None]:
    """Run ``run`` priced by ``model`` as training priced it, as relative errors (positive: over)."""
    p = priced(model, run)

    def err(pred: float | None, measured: float | None) -> float | None:
        return None if not pred or not measured else pred / measured - 1

    return {
        "step": err(p["predicted_step_time_scaled_s"], run["s_per_step"]),
        "memory": err(
            p["predicted_peak_memory_scaled_mib"] or p["predicted_peak_memory_mib"], run["peak_memory_mib"]
        ),
        "forward": err(p["predicted_forward_scaled_s"], run.get("forward_s")),
    }


def task_run(folder: Path) -> dict[str, Any]:
    """Every variant's errors on one task-run's placements, and the seconds it leaves out."""
    card = read_json(folder / "card" / "card.json")
    cost = card["cost"]
    paths = [folder / "runs" / f"{p.name}.json" for p in GRID]
    runs = [read_json(path) for path in paths if path.is_file()]
    out: dict[str, Any] = {"folder": str(folder.relative_to(RESULTS)), "device": cost["device"]}
    out["variants"] = {}
    for variant in VARIANTS:
        model, saved = _model(cost, variant, int(card["config"].get("calibrate_rounds", 1)))
        errors = {m: [] for m in MEASURES}
        for run in runs:
            e = _errors(model, run)
            for m in MEASURES:
                if e[m] is not None:
                    errors[m].append(e[m])
        if variant == "as calibrated":  # the refit must give back what training recorded
            for run, step in zip(runs, errors["step"], strict=True):
                recorded = run["predicted_step_time_scaled_s"] / run["s_per_step"] - 1
                if abs(step - recorded) > 2e-3:
                    raise SystemExit(f"{folder}: the refit does not reproduce {run['name']}'s step time")
        out["variants"][variant] = {"saved_s": round(saved, 2), "errors": errors}
    out["calibrate_s"] = round(card.get("timings", {}).get("calibrate_s", float("nan")), 1)
    return out


def _mae(errs: list[float]) -> float | None:
    return 100 * statistics.fmean(abs(e) for e in errs) if errs else None


def _cell(errs: list[float]) -> str:
    m = _mae(errs)
    return "–" if m is None else f"{m:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path)
    args = ap.parse_args()
    found = task_run_folders(RESULTS)
    folders = [f.resolve() for f in args.folders] or found
    results = [task_run(f) for f in folders]
    write_json(
        RESULTS / "calibration_subset.json",
        {"benchmark": "calibration_subset", "date": time.strftime("%Y-%m-%d"), "runs": results},
    )
    lines = [
        "# Which calibration placements a card needs",
        "",
        "Every committed cost task-run's card refitted from a subset of its five calibration placements and "
        "its placements priced again as training priced them. Cells: mean absolute error of step time / peak "
        "memory / unmerged forward over the task-run's placements (– where not recorded), then the "
        "calibration seconds the variant leaves out of that card's calibration (its warm-up, timed steps and "
        "two forward passes at their fastest), against the calibration's recorded total. Cards from "
        "`ninth` on time the forward on the all-layer placements only, and from `twelfth` on the rank-8 "
        "one only, so for them those forward columns agree with `as calibrated`; the means over the CPU "
        "task-runs include them. `one timed step` keeps the memory as recorded (the peak over the longer "
        "window), so its memory column does not say what a shorter window would give. Cards made before "
        "the fastest-step rule recorded the mean of a placement's steps; the `again` columns also take the "
        "fastest, so read them against `fastest step` (today's rule, every step kept).",
        "",
        "| task-run | device | calibration s | " + " | ".join(VARIANTS) + " |",
        "|---|---|---:|" + "---|" * len(VARIANTS),
    ]
    for r in results:
        cells = []
        for v in VARIANTS:
            e = r["variants"][v]
            errs = " / ".join(_cell(e["errors"][m]) for m in MEASURES)
            cells.append(errs + (f", −{e['saved_s']:.1f} s" if e["saved_s"] else ""))
        lines.append(f"| {r['folder']} | {r['device']} | {r['calibrate_s']} | " + " | ".join(cells) + " |")
    for device in sorted({r["device"] for r in results}):
        group = [r for r in results if r["device"] == device]
        cells = []
        for v in VARIANTS:
            parts = []
            for m in MEASURES:
                maes = [x for x in (_mae(r["variants"][v]["errors"][m]) for r in group) if x is not None]
                within = sum(x <= 10 for x in maes)
                parts.append(f"{statistics.fmean(maes):.1f}% ({within}/{len(maes)} ≤10%)" if maes else "–")
            cells.append(" / ".join(parts))
        lines.append(f"| **mean, {device} ({len(group)})** | | | " + " | ".join(cells) + " |")
    lines.append("")
    write_text(RESULTS / "calibration_subset.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
