"""Summary of benchmarks/placement_v2.py: summary.json, placement_v2.md and the figures, rebuilt from the
run and cell files alone (no model is loaded), so it can run at any point of a partial benchmark.

Definitions (docs/benchmarks in placement_v2.md say the same):
- a cell is (task, budget, candidate); its runs are the seeds of its placement;
- loss drop fraction: (base test loss − the cell's mean test loss) / (base − the reference's mean);
- noise of a task: the mean, over placements trained with 3 seeds, of the range (max − min) of their test
  losses; a task without repeats borrows the largest task's noise;
- measured cost: step time, peak memory, parameters and modules as ratios of the reference's measured ones
  (seed 0); a cell misses its budget when the budgeted ratio is over the budget by more than 10%.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from placement_v2 import BUDGETS, PEER_BUDGET, RESULTS, RULES, STEPS, TASKS

KIND_RATIO = {
    "step_time": "step_time_ratio",
    "params": "params_ratio",
    "modules": "modules_ratio",
    "memory": "memory_ratio",
}


def _runs(task: str) -> dict[str, dict[int, dict[str, Any]]]:
    from layercard.artifacts import read_json

    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted((RESULTS / "runs" / task).glob("*-s*.json")):
        if path.name.startswith("lora-drop-importance"):
            continue
        r = read_json(path)
        out[r["signature"]][int(r["seed"])] = r
    return out


def _noise(runs: dict[str, dict[int, dict[str, Any]]]) -> float | None:
    ranges = [
        max(r["test_loss"] for r in by_seed.values()) - min(r["test_loss"] for r in by_seed.values())
        for by_seed in runs.values()
        if len(by_seed) >= 3
    ]
    return statistics.mean(ranges) if ranges else None


def _cost(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    m, rm = run["metrics"], ref["metrics"]
    mem, ref_mem = m.get("peak_memory_mib"), rm.get("peak_memory_mib")
    return {
        "s_per_step": m["s_per_step"],
        "peak_memory_mib": mem,
        "params": run["params"],
        "modules": run["modules"],
        "step_time_ratio": m["s_per_step"] / rm["s_per_step"],
        "memory_ratio": mem / ref_mem if mem and ref_mem else None,
        "params_ratio": run["params"] / ref["params"],
        "modules_ratio": run["modules"] / ref["modules"],
    }


def task_cells(task: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every cell of ``task`` with its measured loss, fraction, cost and predictions; and task facts."""
    from layercard.artifacts import read_json

    cells_path = RESULTS / "cells" / f"{task}.json"
    base_path = RESULTS / "runs" / task / "base.json"
    if not (cells_path.is_file() and base_path.is_file()):
        return [], {}
    ledger, runs = read_json(cells_path), _runs(task)
    ref_sig = (ledger.get("reference|reference") or {}).get("signature")
    if ref_sig not in runs or 0 not in runs[ref_sig]:
        return [], {}
    base = float(read_json(base_path)["test_loss"])
    ref_runs = runs[ref_sig]
    ref_loss = statistics.mean(r["test_loss"] for r in ref_runs.values())
    ref_drop = base - ref_loss
    facts = {
        "base_loss": base,
        "reference_loss": ref_loss,
        "reference_seeds": sorted(ref_runs),
        "reference_drop": ref_drop,
        "noise": _noise(runs),
    }
    trim_path = RESULTS / "runs" / task / "trim.json"
    if trim_path.is_file():
        t = read_json(trim_path)
        facts["trim"] = {
            "chosen_k": t["k"],
            "tolerance": t["tolerance"],
            "test_loss": t["test_loss"],
            "sweep_s": t["sweep_s"],
        }
    card_wall = RESULTS / "cards" / task / "wall_s.txt"
    facts["card_s"] = float(card_wall.read_text()) if card_wall.is_file() else None
    out = []
    for key, entry in ledger.items():
        budget, candidate = key.split("|")
        cell: dict[str, Any] = {"task": task, "budget": budget, "candidate": candidate, "fits": True}
        sig = entry["signature"]
        if sig is None:
            out.append({**cell, "fits": False, "why": entry["why"]})
            continue
        by_seed = runs.get(sig, {})
        if not by_seed:
            continue  # planned, not yet trained
        losses = [r["test_loss"] for r in by_seed.values()]
        first = by_seed[min(by_seed)]
        mean = statistics.mean(losses)
        m = first["metrics"]
        cell.update(
            signature=sig,
            seeds=sorted(by_seed),
            test_losses=losses,
            test_loss_mean=mean,
            loss_drop_fraction=(base - mean) / ref_drop if ref_drop > 0 else None,
            predicted_fraction=first.get("predicted_quality"),
            measured_cost=_cost(first, ref_runs[0]),
            predicted_step_time_s=m.get("predicted_step_time_scaled_s"),
            predicted_peak_memory_mib=m.get("predicted_peak_memory_scaled_mib"),
            training_memory_ratio=m.get("training_memory_ratio"),
            placement=_label(first),
            wall_s=first["wall_s"],
            lora_drop=first.get("lora_drop"),
        )
        if budget != "reference" and not budget.startswith("trim@"):
            kind, value = budget.split("=")
            ratio = cell["measured_cost"][KIND_RATIO[kind]]
            share = float(value.rstrip("x"))
            cell["budget_ratio"] = ratio / share if ratio is not None else None
            # The tolerance is two-sided: a candidate far under its budget did not get the cost it was
            # compared at, and the row says so.
            cell["within_budget"] = ratio is not None and abs(ratio / share - 1.0) <= 0.10
        out.append(cell)
    return out, facts


def _budget_note(cell: dict[str, Any]) -> str:
    """'ok' when the measured cost is within ±10% of the budget, else by how much it missed."""
    r = cell.get("budget_ratio")
    if r is None:
        return "not measured"
    if cell["within_budget"]:
        return "ok"
    return f"over by {r - 1:.0%}" if r > 1 else f"under by {1 - r:.0%}"


def _label(run: dict[str, Any]) -> str:
    roles = sorted({u[1] for u in run["units"]})
    ranks = sorted({u[2] for u in run["units"]})
    layers = run["layers"]
    span = f"{len(layers)} layers from {min(layers)}" if len(layers) < 30 else "all layers"
    kind = run["kind"] if run["kind"] != "lora" else ",".join(roles) if len(roles) < 7 else "all-linear"
    rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}–{ranks[-1]}"
    init = " (EVA)" if run.get("init") == "eva" else ""
    return f"{kind} · {span} · {rank}{init}"


def verdicts(cells: list[dict[str, Any]], noise: float) -> list[dict[str, Any]]:
    """Per (task, budget): is the recommendation the best or within noise of it, and against each fitting
    practitioners' default: beats (lower loss by more than noise), ties or loses (higher by more)."""
    by_budget: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for c in cells:
        if c["budget"] in BUDGETS and c["fits"] and "test_loss_mean" in c:
            by_budget[c["budget"]][c["candidate"]] = c
    out = []
    for budget, group in by_budget.items():
        rec = group.get("recommend")
        if rec is None:
            continue
        best = min(group.values(), key=lambda c: c["test_loss_mean"])
        v: dict[str, Any] = {
            "task": rec["task"],
            "budget": budget,
            "best": best["candidate"],
            "best_or_tied": rec["test_loss_mean"] - best["test_loss_mean"] <= noise,
            "against": {},
        }
        for rule in RULES:
            if rule in group and group[rule]["signature"] != rec["signature"]:
                d = group[rule]["test_loss_mean"] - rec["test_loss_mean"]
                v["against"][rule] = "beats" if d > noise else "loses" if d < -noise else "ties"
            elif rule in group:
                v["against"][rule] = "same placement"
        out.append(v)
    return out


def summary() -> dict[str, Any]:
    from layercard.artifacts import machine_info, write_json, write_text

    all_cells, facts, all_verdicts = [], {}, []
    for task in TASKS:
        cells, f = task_cells(task)
        if cells:
            all_cells += cells
            facts[task] = f
    measured_noise = [f["noise"] for f in facts.values() if f["noise"] is not None]
    borrowed = max(measured_noise) if measured_noise else 0.0
    for task, f in facts.items():
        f["noise_borrowed"] = f["noise"] is None
        f["noise_used"] = f["noise"] if f["noise"] is not None else borrowed
        all_verdicts += verdicts([c for c in all_cells if c["task"] == task], f["noise_used"])
    for c in all_cells:
        c["noise"] = facts[c["task"]]["noise_used"]
    trained = [c for c in all_cells if "test_loss_mean" in c and c["budget"] in ("reference", *BUDGETS)]
    q_err: dict[str, list[float]] = defaultdict(list)
    seen = set()
    for c in trained:
        if c["predicted_fraction"] is not None and (c["task"], c["signature"]) not in seen:
            seen.add((c["task"], c["signature"]))
            q_err[c["task"]].append(abs(c["predicted_fraction"] - c["loss_drop_fraction"]))
    step_err = [
        abs(c["predicted_step_time_s"] / c["measured_cost"]["s_per_step"] - 1)
        for c in _unique(trained)
        if c["predicted_step_time_s"]
    ]
    mem_err = [
        abs(c["predicted_peak_memory_mib"] / c["measured_cost"]["peak_memory_mib"] - 1)
        for c in _unique(trained)
        if c["predicted_peak_memory_mib"] and c["measured_cost"]["peak_memory_mib"]
    ]
    added_err = [
        abs(c["training_memory_ratio"] - 1) for c in _unique(trained) if c.get("training_memory_ratio")
    ]
    planning = []
    for task, f in facts.items():
        rec = [c for c in trained if c["task"] == task and c["candidate"] == "recommend"]
        if f["card_s"] and rec:
            planning.append(f["card_s"] / statistics.mean(c["wall_s"] for c in rec))
    beats = [v for v in all_verdicts if v["against"]]
    out = {
        "device": _device(),
        "steps": STEPS,
        "budgets": list(BUDGETS),
        "peer_budget": PEER_BUDGET,
        "tasks": facts,
        "cells": [
            {
                k: c.get(k)
                for k in (
                    "task",
                    "budget",
                    "candidate",
                    "fits",
                    "why",
                    "placement",
                    "seeds",
                    "test_loss_mean",
                    "loss_drop_fraction",
                    "measured_cost",
                    "budget_ratio",
                    "within_budget",
                    "predicted_fraction",
                    "noise",
                )
            }
            for c in all_cells
        ],
        "verdicts": all_verdicts,
        "quality_mae": {t: statistics.mean(v) for t, v in q_err.items()},
        "step_time_mape": statistics.mean(step_err) if step_err else None,
        "memory_mape": statistics.mean(mem_err) if mem_err else None,
        "memory_added_mape": statistics.mean(added_err) if added_err else None,
        "recommendation_best_or_tied": _rate([v["best_or_tied"] for v in all_verdicts]),
        "recommendation_beats_defaults": _rate(
            [
                all(a in ("beats", "same placement") for a in v["against"].values())
                and any(a == "beats" for a in v["against"].values())
                for v in beats
            ]
        ),
        "recommendation_loses_to_a_default": _rate(
            [any(a == "loses" for a in v["against"].values()) for v in beats]
        ),
        "planning_cost_fraction": statistics.mean(planning) if planning else None,
        "machine": machine_info(),
    }
    write_json(RESULTS / "summary.json", out)
    write_text(RESULTS / "placement_v2.md", markdown(out, all_cells))
    plots(all_cells, facts)
    print(f"{len(trained)} cells measured over {len(facts)} tasks; wrote {RESULTS / 'summary.json'}")
    return out


def _device() -> str:
    """The machine the runs were measured on, from the first run's record."""
    for task in TASKS:
        for path in sorted((RESULTS / "runs" / task).glob("*-s0.json")):
            from layercard.artifacts import read_json

            m = read_json(path)["machine"]
            return f"cpu {m['processor']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
    return "unknown"


def _unique(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for c in cells:
        if (c["task"], c["signature"]) not in seen:
            seen.add((c["task"], c["signature"]))
            out.append(c)
    return out


def _rate(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _f(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(out: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    lines = [
        "# Placement benchmark v2: the recommendation against practitioners' defaults at matched cost",
        "",
        f"smollm2, {out['steps']} steps per run, every task's own card; budgets relative to the reference "
        f"(every linear module of every layer at rank 8): {', '.join(out['budgets'])}; peer selectors at "
        f"{out['peer_budget']}. Machine: {out['device']}.",
        "",
        "| task | base loss | reference loss | noise (loss) | quality MAE | card s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task, f in out["tasks"].items():
        noise = _f(f["noise_used"], ".4f") + (" (borrowed)" if f["noise_borrowed"] else "")
        lines.append(
            f"| {task} | {f['base_loss']:.4f} | {f['reference_loss']:.4f} | {noise} | "
            f"{_f(out['quality_mae'].get(task))} | {_f(f['card_s'], '.0f')} |"
        )
    lines += [
        "",
        f"- recommendation best or within noise of the best: {_f(out['recommendation_best_or_tied'], '.0%')}"
        " of cells (goal ≥ 90%)",
        f"- recommendation beats every fitting default by more than noise: "
        f"{_f(out['recommendation_beats_defaults'], '.0%')} of cells (goal ≥ 50%); "
        "loses to one beyond noise: "
        f"{_f(out['recommendation_loses_to_a_default'], '.0%')} (goal: none)",
        f"- step time mean abs error {_f(out['step_time_mape'], '.1%')}, peak memory "
        f"{_f(out['memory_mape'], '.1%')}, memory added by training {_f(out['memory_added_mape'], '.1%')} "
        f"(goal 10%); planning cost (card) against the recommended run: "
        f"{_f(out['planning_cost_fraction'], '.2f')}× (goal ≤ 0.10)",
        "",
    ]
    for task in out["tasks"]:
        for budget in ("reference", *BUDGETS):
            rows = [c for c in cells if c["task"] == task and c["budget"] == budget]
            if not rows:
                continue
            lines += [
                f"## {task} · {budget}",
                "",
                "| candidate | placement | seeds | test loss | fraction | predicted | s/step ×ref | "
                "memory ×ref | params ×ref | modules ×ref | budget |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for c in sorted(rows, key=lambda c: c.get("test_loss_mean", 1e9)):
                if not c["fits"]:
                    lines.append(f"| {c['candidate']} | does not fit: {c['why']} |||||||||||")
                    continue
                mc = c["measured_cost"]
                fit = "" if budget == "reference" else _budget_note(c)
                name = f"**{c['candidate']}**" if c["candidate"] == "recommend" else c["candidate"]
                lines.append(
                    f"| {name} | {c['placement']} | {len(c['seeds'])} | {c['test_loss_mean']:.4f} | "
                    f"{_f(c['loss_drop_fraction'])} | {_f(c['predicted_fraction'])} | "
                    f"{mc['step_time_ratio']:.2f} | {_f(mc['memory_ratio'], '.2f')} | "
                    f"{mc['params_ratio']:.3f} | "
                    f"{mc['modules_ratio']:.3f} | {fit} |"
                )
            lines.append("")
    lines += ["## Trim: the reference's boundary sweep (test loss with adapters kept in layers ≤ K)", ""]
    for task, f in out["tasks"].items():
        t = f.get("trim")
        if not t:
            continue
        sweep = ", ".join(f"K={k}: {v:.3f}" for k, v in t["test_loss"].items())
        lines.append(
            f"- {task}: chosen K = {t['chosen_k']} (tolerance {t['tolerance']} on a selection "
            f"subset disjoint from the test subset); {sweep}"
        )
        for c in cells:
            if c["task"] == task and c["budget"].startswith("trim@") and "test_loss_mean" in c:
                k = c["budget"].removeprefix("trim@")
                lines.append(
                    f"  - trained on layers ≤ {k} from the start: {c['test_loss_mean']:.4f}; "
                    f"the reference trimmed at {k}: {t['test_loss'][k]:.4f}"
                )
    lines += [
        "",
        "## Verdicts",
        "",
        "| task | budget | best measured | recommendation best or tied | "
        "against " + " | against ".join(RULES) + " |",
        "|---|---|---|---|" + "---|" * len(RULES),
    ]
    for v in out["verdicts"]:
        tied = "yes" if v["best_or_tied"] else "no"
        lines.append(
            f"| {v['task']} | {v['budget']} | {v['best']} | {tied} | "
            + " | ".join(v["against"].get(r, "does not fit") for r in RULES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plots(cells: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [c for c in cells if "test_loss_mean" in c]
    for task in facts:
        rows = [c for c in trained if c["task"] == task]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
        for ax, (key, label) in zip(
            axes,
            (
                ("step_time_ratio", "s/step ÷ reference"),
                ("memory_ratio", "peak memory ÷ reference"),
                ("params_ratio", "parameters ÷ reference"),
            ),
            strict=True,
        ):
            for c in rows:
                x = c["measured_cost"][key]
                if x is None:
                    continue
                rec = c["candidate"] == "recommend"
                ax.scatter(
                    x,
                    c["loss_drop_fraction"],
                    marker="*" if rec else "o",
                    s=140 if rec else 30,
                    color="C3" if rec else "C0",
                    zorder=3 if rec else 2,
                )
                name = c["candidate"] if not rec else f"recommend ({c['budget']})"
                ax.annotate(name, (x, c["loss_drop_fraction"]), fontsize=6, alpha=0.7)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("fraction of the reference's loss drop")
        fig.suptitle(f"{task}: measured quality against measured cost (★ recommendation)")
        fig.tight_layout()
        fig.savefig(RESULTS / f"pareto_{task}.png", dpi=100)
        plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, task in enumerate(facts):
        rows = _unique([c for c in trained if c["task"] == task])
        q = [
            (c["predicted_fraction"], c["loss_drop_fraction"])
            for c in rows
            if c["predicted_fraction"] is not None
        ]
        if q:
            a.scatter(*zip(*q, strict=True), label=task, color=f"C{i}", s=18)
        t = [
            (c["predicted_step_time_s"], c["measured_cost"]["s_per_step"])
            for c in rows
            if c["predicted_step_time_s"]
        ]
        if t:
            b.scatter(*zip(*t, strict=True), label=task, color=f"C{i}", s=18)
    for ax, title in ((a, "quality: fraction of the reference's drop"), (b, "step time (s)")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("measured")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "predicted_vs_measured.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from usage import no_options

    no_options(__doc__)
    summary()
