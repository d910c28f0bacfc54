"""What `layercard plan --target F` delivers: the cheapest placement predicted to reach F, trained, against F.

Per task and target fraction F, the plan is made twice from the committed placement benchmark v2 card (with
its task's target entropy as a card reads it): `--depth any` (the cheapest placement of all) and the default
`--depth auto` (on a task whose targets are varied, the cheapest placement over all the depth). Each
distinct placement is trained with placement benchmark v2's settings (smollm2, 36 steps of batch 4, lr
2e-3) at the given seeds; a run that benchmark or the tight-budget runs already hold is reused, not
retrained. The measured fraction is the test-loss drop from the base model as a fraction of the reference's
seed-0 drop, as in tight.md. Nothing here is fitted.

    .venv/bin/python benchmarks/target.py run [--tasks ...] [--targets 0.8,0.9,0.95,0.98] [--seeds 0,1,2]
    .venv/bin/python benchmarks/target.py summary

New runs go to results/placement_v2/target/runs/<task>/ (one JSON each: the script resumes); the summary to
results/placement_v2/target/target.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import placement_v2 as P  # this folder is on sys.path
from fresh_tasks import with_target_entropy
from tight_budget import _reference

TASKS = ("e2e_nlg", "gsm8k", "samsum", "sst2", "facts", "format")
TARGETS = (0.8, 0.9, 0.95, 0.98)
DEPTHS = ("any", "auto")
OUT = P.RESULTS / "target"
# runs of the same settings, keyed alike by placement signature and seed
RUN_FOLDERS = (P.RESULTS / "runs", P.RESULTS / "tight" / "runs", OUT / "runs")


def plan_at(card: Any, target: float, depth: str) -> Any:
    """The plan `layercard plan --target` makes from ``card`` under ``depth``."""
    from layercard import PlanConfig

    return P.planned(card, PlanConfig(policy="recommend", target=target, depth=depth))


def _runs(task: str, sig: str) -> list[dict[str, Any]]:
    """Every run of one placement on disk, one per seed (the first folder that holds a seed wins)."""
    from layercard.artifacts import read_json

    by_seed: dict[str, dict[str, Any]] = {}
    for folder in RUN_FOLDERS:
        for path in sorted((folder / task).glob(f"{sig}-s*.json")):
            by_seed.setdefault(path.stem.rsplit("-s", 1)[1], read_json(path))
    return [by_seed[k] for k in sorted(by_seed, key=int)]


def _ledger_path(task: str) -> Path:
    return OUT / "cells" / f"{task}.json"


def run(tasks: list[str], targets: tuple[float, ...], seeds: tuple[int, ...], threads: int) -> None:
    import torch

    from layercard import load_model, load_task
    from layercard.artifacts import read_json, write_json

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    for name in tasks:
        s = P.TASKS[name]
        train_task = load_task(s.train).subset(P.TRAIN_EXAMPLES, seed=0)
        test = load_task(s.test).subset(s.test_examples, seed=0)
        card = with_target_entropy(P._card(loaded, train_task, s), name)
        ctx = {"loaded": loaded, "setting": s, "train": train_task, "test": test, "card": card}
        P._base(ctx)
        ledger = read_json(_ledger_path(name)) if _ledger_path(name).is_file() else {}
        plans = {}
        for target in targets:
            for depth in DEPTHS:
                plan = plan_at(card, target, depth)
                sig = P.signature(plan)
                c = plan.predicted["candidate"]
                ledger[f"{target:g}|{depth}"] = {
                    "signature": sig,
                    "matrices": c["matrices"],
                    "layers": c["layers"],
                    "rank": c["rank"],
                    "params": c["params"],
                    "params_x": c["params_x"],
                    "predicted": c["quality"],
                    "expected_error": c.get("error"),
                    "cleared": plan.predicted["target"]["cleared"],
                    "depth_notes": [w for w in plan.warnings if w.startswith("plan: ")],
                }
                plans.setdefault(sig, (plan, f"target {target:g} depth {depth}"))
        write_json(_ledger_path(name), ledger)
        for seed in seeds:
            for sig, (plan, label) in plans.items():
                have = {r["seed"] for r in _runs(name, sig)}
                if seed not in have:
                    P.train_and_score(ctx, plan, seed, label=label, runs=OUT / "runs")


def summary() -> dict[str, Any]:
    from layercard.artifacts import read_json, write_json, write_text

    out: dict[str, Any] = {
        "steps": P.STEPS,
        "lr": P.LR,
        "date": time.strftime("%Y-%m-%d"),
        "targets": list(TARGETS),
        "tasks": {},
    }
    for task in TASKS:
        if not _ledger_path(task).is_file():
            continue
        base = float(read_json(P.RESULTS / "runs" / task / "base.json")["test_loss"])
        ref, _ = _reference(task)
        card = P.RESULTS / "cards" / task / "card.json"
        entropy = _entropy(card, task)
        rows = []
        for key, cell in read_json(_ledger_path(task)).items():
            target, depth = key.split("|")
            runs = _runs(task, cell["signature"])
            fr = [(base - r["test_loss"]) / (base - ref) for r in runs]
            rows.append(
                {
                    "target": float(target),
                    "depth": depth,
                    **cell,
                    "seeds": [r["seed"] for r in runs],
                    "fraction_by_seed": fr,
                    "fraction": statistics.fmean(fr) if fr else None,
                    "s_per_step": (
                        statistics.fmean(r["metrics"]["s_per_step"] for r in runs) if runs else None
                    ),
                    "peak_memory_mib": (
                        statistics.fmean(r["metrics"]["peak_memory_mib"] for r in runs) if runs else None
                    ),
                }
            )
        rows.sort(key=lambda r: (r["target"], DEPTHS.index(r["depth"])))
        out["tasks"][task] = {
            "target_entropy": entropy,
            "base_loss": base,
            "reference_loss": ref,
            "rows": rows,
        }
    out["tally"] = tally(out)
    write_json(OUT / "target.json", out)
    write_text(OUT / "target.md", _markdown(out))
    _plot(out)
    return out


def _entropy(card_path: Path, task: str) -> float:
    from layercard.card.artifact import Card

    return float(with_target_entropy(Card.load(card_path), task).task["target_entropy"])


def tally(out: dict[str, Any]) -> dict[str, Any]:
    """Over the measured (task, target) cells: how often each depth's pick reached the target on the seed
    mean, its mean shortfall below the target, and its mean error against its prediction."""
    res: dict[str, Any] = {}
    for depth in DEPTHS:
        rows = [
            r
            for t in out["tasks"].values()
            for r in t["rows"]
            if r["depth"] == depth and r["fraction"] is not None
        ]
        if not rows:
            continue
        res[depth] = {
            "cells": len(rows),
            "reached": sum(r["fraction"] >= r["target"] for r in rows),
            "mean_shortfall": statistics.fmean(max(0.0, r["target"] - r["fraction"]) for r in rows),
            "mae_vs_predicted": statistics.fmean(abs(r["predicted"] - r["fraction"]) for r in rows),
            # the plan's own statement: predicted above F by more than the expected error, or not
            **{
                f"{side}_reached": [
                    sum(r["fraction"] >= r["target"] for r in part),
                    len(part),
                ]
                for side, flag in (("cleared", True), ("within_error", False))
                for part in [[r for r in rows if r.get("cleared") is flag]]
            },
        }
    res["changed"] = changed(out)
    return res


def changed(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The (task, target) cells where ``auto`` took another placement than ``any``, both measured: the
    measured fractions (seed means), their difference and the parameter ratio."""
    res = []
    for task, t in out["tasks"].items():
        by_key = {(r["target"], r["depth"]): r for r in t["rows"]}
        for (f, depth), auto in by_key.items():
            free = by_key.get((f, "any"))
            if depth != "auto" or free is None or auto["signature"] == free["signature"]:
                continue
            if auto["fraction"] is None or free["fraction"] is None:
                continue
            res.append(
                {
                    "task": task,
                    "target": f,
                    "any": free["fraction"],
                    "auto": auto["fraction"],
                    "difference": auto["fraction"] - free["fraction"],
                    "params_ratio": auto["params"] / free["params"],
                }
            )
    return res


def _markdown(out: dict[str, Any]) -> str:
    from layercard.plan.frontier import row_label
    from layercard.plan.quality import HIGH_TARGET_ENTROPY

    lines = [
        "# What `--target F` delivers",
        "",
        f"smollm2, {out['steps']} steps of batch 4, lr {out['lr']}, placement benchmark v2's settings, "
        "cards, base and reference runs. Each cell is the plan `layercard plan --target F` makes from the "
        "task's card (`--depth any`: the cheapest placement predicted to reach F; `--depth auto`, the "
        f"default: on a task whose targets are varied, target entropy ≥ {HIGH_TARGET_ENTROPY} nats per "
        "token, the cheapest over all the depth), trained at each seed. Measured: the test-loss drop from "
        "the base model as a fraction of the reference's (every linear module of every layer at rank 8, "
        "seed 0), mean over seeds (range). **Bold**: the mean fell short of F.",
        "",
        "| task (target entropy) | F | depth | placement | params | predicted | measured (range) | seeds |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for task, t in out["tasks"].items():
        for r in t["rows"]:
            fr = r["fraction"]
            if fr is None:
                meas = "not run"
            else:
                spread = max(r["fraction_by_seed"]) - min(r["fraction_by_seed"])
                meas = f"{fr:.3f} ({spread:.3f})"
                meas = f"**{meas}**" if fr < r["target"] else meas
            err = f" ± {r['expected_error']:.2f}" if r.get("expected_error") is not None else ""
            lines.append(
                f"| {task} ({t['target_entropy']:.2f}) | {r['target']:g} | {r['depth']} | {row_label(r)} | "
                f"{r['params_x']:.4f}x | {r['predicted']:.3f}{err} | {meas} | {len(r['seeds'])} |"
            )
    lines += [
        "",
        "| depth | cells | reached F (seed mean) | of them: F cleared by the expected error / within it | "
        "mean shortfall below F | mean abs. error vs predicted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for depth in DEPTHS:
        if (v := out["tally"].get(depth)) is not None:
            lines.append(
                f"| {depth} | {v['cells']} | {v['reached']} | "
                + " / ".join(f"{a} of {n}" for a, n in (v["cleared_reached"], v["within_error_reached"]))
                + f" | {v['mean_shortfall']:.3f} | {v['mae_vs_predicted']:.3f} |"
            )
    if moved := out["tally"].get("changed"):
        lines += [
            "",
            "Where `auto` took another placement than `any` (measured fraction, seed means): "
            + "; ".join(
                f"{c['task']} at {c['target']:g}: {c['any']:.3f} → {c['auto']:.3f} ({c['difference']:+.3f}, "
                f"{c['params_ratio']:.2f}× the parameters)"
                for c in moved
            )
            + f". Mean difference {statistics.fmean(c['difference'] for c in moved):+.3f}.",
        ]
    lines += ["", "![measured against predicted fraction per target](target.png)"]
    return "\n".join(lines) + "\n"


def _plot(out: dict[str, Any]) -> None:
    """target.png: per task, each pick's measured fraction (bars: range over seeds) against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, v in out["tasks"].items() if any(r["fraction"] is not None for r in v["rows"])]
    if not tasks:
        return
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows + 0.5), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for depth, colour, dx in (("any", "C0", -0.004), ("auto", "C3", 0.004)):
            pts = [r for r in out["tasks"][task]["rows"] if r["depth"] == depth and r["fraction"] is not None]
            x = [r["target"] + dx for r in pts]
            y = [r["fraction"] for r in pts]
            lo = [r["fraction"] - min(r["fraction_by_seed"]) for r in pts]
            hi = [max(r["fraction_by_seed"]) - r["fraction"] for r in pts]
            ax.errorbar(x, y, yerr=[lo, hi], fmt="o", color=colour, ms=5, capsize=2, label=f"--depth {depth}")
        lim = (min(out["targets"]) - 0.03, max(out["targets"]) + 0.03)
        ax.plot(lim, lim, color="grey", lw=1, ls="--")
        ax.set_title(f"{task} (entropy {out['tasks'][task]['target_entropy']:.2f})", fontsize=10)
        ax.set_xlabel("target F")
        ax.set_ylabel("measured fraction")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(OUT / "target.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "summary"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.what == "run":
        tasks = a.tasks.split(",")
        bad = [t for t in tasks if t not in P.TASKS]
        if bad:
            raise SystemExit(f"--tasks: unknown task {bad[0]!r}; valid: {', '.join(P.TASKS)}")
        try:
            targets = tuple(float(x) for x in a.targets.split(","))
        except ValueError:
            raise SystemExit(f"--targets: not a comma-separated list of fractions: {a.targets!r}") from None
        if not all(0 < t <= 1 for t in targets):
            raise SystemExit(f"--targets: each must lie in (0, 1]: {a.targets!r}")
        run(tasks, targets, tuple(int(x) for x in a.seeds.split(",")), a.threads)
    res = summary()
    print((OUT / "target.md").read_text() if res["tasks"] else "no runs yet")


if __name__ == "__main__":
    main()
