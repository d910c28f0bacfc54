"""The recommendation against the practitioners' rules where it departs from them, measured.

At params=0.25x the default quality model recommends the all-linear rule fitted to the budget, so that
budget cannot show it doing better than the rules. At params=0.05x, 0.1x, 0.15x and 0.2x (the demo's
budget), and under step_time=0.7x, it departs from every rule. This script trains, per task and budget, the
recommendation and each rule fitted to the budget (and, unless ``--candidates`` leaves it out, the pick of
the previous default quality model, the parameter share), with placement benchmark v2's settings, cards,
base and reference runs (smollm2, 36 steps, lr 2e-3; benchmarks/placement_v2.py), and reports their test
losses, fractions of the reference's drop and measured costs. The default tasks are the four the quality
model was fitted on none of; nothing here is fitted.

    .venv/bin/python benchmarks/tight_budget.py run [--budget params=0.1x] [--tasks ...] [--seeds 0]
        [--candidates recommend,peft-default,all-linear,last-n]
    .venv/bin/python benchmarks/tight_budget.py summary

Runs go to results/placement_v2/tight/runs/<task>/ (one JSON each: the script resumes); the summary to
results/placement_v2/tight/tight.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import placement_v2 as P  # this folder is on sys.path
from quality import seed_gaps

BUDGETS = ("params=0.1x", "step_time=0.7x", "params=0.15x", "params=0.05x", "params=0.2x", "params=0.04x")
CANDIDATES = ("recommend", "previous-default", "peft-default", "all-linear", "last-n")
# trained only when asked for: the recommendation taken among placements over all the depth (plan.depth=all);
# the ten-task default's recommendation
EXTRA_CANDIDATES = ("depth-all", "ten-task")
UNSEEN = ("gsm8k", "samsum", "facts", "format")
OUT = P.RESULTS / "tight"


def _plan(card: Any, candidate: str, budget: str) -> tuple[Any, str | None]:
    if candidate == "ten-task":
        return _ten_task(card, budget), None
    if candidate != "previous-default":
        return P.plan_for(card, candidate, budget)
    from layercard import PlanConfig
    from layercard.plan.quality import QualityModel
    from layercard.plan.recommend import search_plan

    previous = QualityModel("params", (0.03,), expected_error=0.066, basis="the default before", max_rank=8)
    cfg = PlanConfig(policy="recommend", budget=budget)
    return search_plan(card, cfg, model=previous), None


def _ten_task(card: Any, budget: str) -> Any:
    """The ten-task default's recommendation (``TEN_TASK_MODEL``, adopted after these runs' cards were
    made), from the committed card given its task's target entropy as a card made today reads it."""
    from fresh_tasks import with_target_entropy

    from layercard import PlanConfig
    from layercard.plan.quality import TEN_TASK_MODEL

    card = with_target_entropy(card, card.task["name"])
    return P.planned(card, PlanConfig(policy="recommend", budget=budget), TEN_TASK_MODEL)


def _reference(task: str) -> tuple[float, int]:
    """The reference run's test loss and its layer count (it adapts every layer)."""
    from layercard.artifacts import read_json

    sig = read_json(P.RESULTS / "cells" / f"{task}.json")["reference|reference"]["signature"]
    run = read_json(P._run_path(task, sig, 0))
    return float(run["test_loss"]), len(run["layers"])


def _ledger(task: str) -> dict[str, dict[str, Any]]:
    """The ``budget|candidate`` → run ledger of one task (a placement that cannot fit keeps its reason)."""
    from layercard.artifacts import read_json

    path = OUT / "cells" / f"{task}.json"
    return read_json(path) if path.is_file() else {}


def run(
    budget: str,
    tasks: list[str],
    seeds: tuple[int, ...],
    threads: int,
    candidates: tuple[str, ...] = CANDIDATES,
) -> None:
    import torch

    from layercard import load_model, load_task
    from layercard.artifacts import write_json

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    for name in tasks:
        s = P.TASKS[name]
        train_task = load_task(s.train).subset(P.TRAIN_EXAMPLES, seed=0)
        test = load_task(s.test).subset(s.test_examples, seed=0)
        card = P._card(loaded, train_task, s)  # the committed card: measured once, reused
        ctx = {"loaded": loaded, "setting": s, "train": train_task, "test": test, "card": card}
        P._base(ctx)
        ledger = _ledger(name)
        for c in candidates:
            plan, why = _plan(card, c, budget)
            ledger[f"{budget}|{c}"] = {"signature": None if plan is None else P.signature(plan), "why": why}
            write_json(OUT / "cells" / f"{name}.json", ledger)
            if plan is None:
                print(f"{name} {c}: does not fit ({why})", flush=True)
                continue
            for seed in seeds:
                P.train_and_score(ctx, plan, seed, label=f"{budget} {c}", runs=OUT / "runs")


def summary() -> dict[str, Any]:
    from layercard.artifacts import read_json, write_json, write_text
    from layercard.plan.frontier import row_label

    out: dict[str, Any] = {"steps": P.STEPS, "lr": P.LR, "date": time.strftime("%Y-%m-%d"), "budgets": {}}
    machines: dict[tuple[Any, ...], set[tuple[str, str, int]]] = {}
    for ledger_path in sorted((OUT / "cells").glob("*.json")):
        task = ledger_path.stem
        base = float(read_json(P.RESULTS / "runs" / task / "base.json")["test_loss"])
        ref, n_layers = _reference(task)
        for key, cell in _ledger(task).items():
            budget, c = key.split("|")
            rows = (
                out["budgets"]
                .setdefault(budget, {})
                .setdefault(task, {"base_loss": base, "reference_loss": ref, "rows": []})["rows"]
            )
            if cell["signature"] is None:
                rows.append({"candidate": c, "fits": False, "why": cell["why"]})
                continue
            runs = [read_json(p) for p in sorted((OUT / "runs" / task).glob(f"{cell['signature']}-s*.json"))]
            if not runs:
                continue
            for r in runs:
                machines.setdefault(machine_key(r), set()).add((task, r["signature"], int(r["seed"])))
            loss = statistics.mean(r["test_loss"] for r in runs)
            r0 = runs[0]
            plan_row = {"matrices": _matrices(r0), "layers": _layers(r0, n_layers), "rank": _rank(r0)}
            rows.append(
                {
                    "candidate": c,
                    "fits": True,
                    "signature": cell["signature"],
                    "placement": row_label(plan_row),
                    "params": r0["params"],
                    "seeds": [r["seed"] for r in runs],
                    "test_loss": loss,
                    "test_loss_range": max(r["test_loss"] for r in runs) - min(r["test_loss"] for r in runs),
                    "fraction": (base - loss) / (base - ref),
                    "fraction_by_seed": [(base - r["test_loss"]) / (base - ref) for r in runs],
                    "predicted": r0["predicted_quality"],
                    "s_per_step": statistics.mean(r["metrics"]["s_per_step"] for r in runs),
                    "peak_memory_mib": statistics.mean(r["metrics"]["peak_memory_mib"] for r in runs),
                }
            )
    # Parameter budgets from the tightest up, then the others.
    out["budgets"] = dict(
        sorted(
            out["budgets"].items(),
            key=lambda kv: (kv[0].split("=")[0] != "params", float(kv[0].split("=")[1].rstrip("x"))),
        )
    )
    out["seed_noise"] = _seed_noise(out)
    out["ten_task"] = ten_task_check(out)
    # the machines the runs themselves record, not the one summarizing them; each run once
    out["measured_on"] = [
        {"processor": k[0], "cpus": k[1], "torch_threads": k[2], "runs": len(n)}
        for k, n in sorted(machines.items(), key=lambda kv: str(kv[0]))
    ]
    out = keep_date(out, read_json(OUT / "tight.json") if (OUT / "tight.json").is_file() else None)
    write_json(OUT / "tight.json", out)
    write_text(OUT / "tight.md", _markdown(out))
    _plot(out)
    return out


def machine_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """The processor, CPU count and torch threads a run's JSON records (placement_v2.train_and_score)."""
    m = run.get("machine") or {}
    return (m.get("processor"), m.get("cpu_count"), run.get("threads", m.get("torch_threads")))


def keep_date(out: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``out`` with the previous summary's date where it holds everything the previous one did unchanged
    (it may add to it): a summary written again from the same runs keeps its date."""
    if previous is None or "date" not in previous:
        return out
    now = json.loads(json.dumps(out))
    if all(now.get(k) == v for k, v in previous.items() if k != "date"):
        return {**out, "date": previous["date"]}
    return out


def _machines_text(out: dict[str, Any]) -> str:
    """Where the runs were measured, from their own records."""
    ms = out.get("measured_on") or []
    if not ms:
        return ""
    parts = [f"{m['processor']} · {m['cpus']} CPUs · {m['torch_threads']} torch threads" for m in ms]
    each = "" if len(ms) == 1 else " (" + ", ".join(f"{m['runs']}" for m in ms) + " runs)"
    return f" Every run measured on {' / '.join(parts)}{each}, as the runs record."


def _plot(out: dict[str, Any]) -> None:
    """tight.png: per task, each candidate's mean test loss (bars: the range over seeds, as long as it and
    centred on the mean: the runs keep the range, not each seed's loss) against its trainable
    parameters, under every parameter budget; the recommendation's points joined across budgets. The
    previous default's picks are left to the table (at params=0.1x they are the last-n rule's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in out["budgets"] if b.startswith("params=")]
    tasks = sorted({t for b in budgets for t in out["budgets"][b]})
    if not tasks:
        return
    cols = min(2, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows + 0.6), squeeze=False)
    colours = {"recommend": "C3", "peft-default": "C0", "all-linear": "C4", "last-n": "C1"}
    # shapes as well as colours, so that no two candidates differ by colour alone
    markers = {"recommend": "o", "peft-default": "s", "all-linear": "^", "last-n": "v"}
    labelled: set[str] = set()
    for ax, task in zip(axes.flat, tasks, strict=False):
        seen: set[tuple[str, str]] = set()  # a placement shared by two budgets is drawn once
        rec = []
        for b in budgets:
            for r in out["budgets"][b].get(task, {}).get("rows", []):
                c = r["candidate"]
                if c not in colours or not r["fits"] or (c, r["signature"]) in seen:
                    continue
                seen.add((c, r["signature"]))
                ax.errorbar(
                    r["params"] / 1e3, r["test_loss"], yerr=r["test_loss_range"] / 2, fmt=markers[c],
                    color=colours[c], ms=7 if c == "recommend" else 5, capsize=2,
                    label=None if c in labelled else c, zorder=3 if c == "recommend" else 2,
                )  # fmt: skip
                labelled.add(c)
                if c == "recommend":
                    rec.append((r["params"] / 1e3, r["test_loss"]))
        if rec:
            ax.plot(*zip(*sorted(rec), strict=True), color=colours["recommend"], lw=1)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("trainable parameters (thousands)")
        ax.set_ylabel("test loss, mean over seeds")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.legend(loc="upper center", ncol=len(colours), fontsize=9, frameon=False)
    bars = "as long as the range over seeds, centred on the mean"
    fig.text(0.5, 0.005, f"budgets: {', '.join(budgets)}; bars: {bars}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(OUT / "tight.png", dpi=100)
    plt.close(fig)


def _seed_noise(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task, over its distinct placements trained at three or more seeds: how far one run's fraction
    lies from the mean of the same placement's runs at the other seeds (what a quality model scored
    against single runs misses by even when it predicts that mean exactly)."""
    by_task: dict[str, dict[str, list[float]]] = {}
    for tasks in out["budgets"].values():
        for task, t in tasks.items():
            for r in t["rows"]:
                if r["fits"] and len(r["fraction_by_seed"]) >= 3:
                    by_task.setdefault(task, {})[r["signature"]] = r["fraction_by_seed"]
    res = {}
    for task, placements in sorted(by_task.items()):
        gaps = [g for fr in placements.values() for g in seed_gaps(fr)]
        res[task] = {"placements": len(placements), "one_run_vs_other_seeds_mean": statistics.mean(gaps)}
    return res


def _matrices(r: dict[str, Any]) -> str:
    from layercard.plan.frontier import MATRICES

    roles = {u[1] for u in r["units"]}
    return next((k for k, v in MATRICES.items() if set(v) == roles), ",".join(sorted(roles)))


def _layers(r: dict[str, Any], n_layers: int) -> str:
    layers = sorted({u[0] for u in r["units"]})
    if len(layers) == n_layers:
        return "all"
    if layers == list(range(n_layers - len(layers), n_layers)):
        return f"last-{len(layers)}"
    return f"{len(layers)} layers {layers[0]}–{layers[-1]}"


def _rank(r: dict[str, Any]) -> int:
    return max(u[2] for u in r["units"])


def _against_best_rule(fitted: list[dict[str, Any]]) -> tuple[float, str, float, float, float] | None:
    """The recommendation's mean test loss minus the best rule's at the same budget, that rule, the larger
    of the two placements' ranges over seeds, and the recommendation's measured s/step and peak memory as
    ratios to the rule's; None when either is missing."""
    rec = next((r for r in fitted if r["candidate"] == "recommend"), None)
    rules = [r for r in fitted if r["candidate"] in P.RULES]
    if rec is None or not rules:
        return None
    best = min(rules, key=lambda r: r["test_loss"])
    noise = max(rec["test_loss_range"], best["test_loss_range"])
    return (
        rec["test_loss"] - best["test_loss"],
        best["candidate"],
        noise,
        rec["s_per_step"] / best["s_per_step"],
        rec["peak_memory_mib"] / best["peak_memory_mib"],
    )


def _overview(out: dict[str, Any]) -> list[str]:
    """One row per budget, one column per task: the recommendation against the best rule."""
    tasks = sorted({t for b in out["budgets"].values() for t in b})
    head = ["", "| budget | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines = [
        "Recommendation minus the best rule fitted to the same budget, mean test loss (negative: the "
        "recommendation is better; **bold**: the difference exceeds the larger of the two placements' "
        "ranges over seeds):",
        *head,
    ]
    costs = ["", "The recommendation's measured s/step and peak memory against the same rule's (seed means):"]
    costs += head
    for budget, by_task in out["budgets"].items():
        cells, cost_cells = [], []
        for task in tasks:
            t = by_task.get(task)
            a = _against_best_rule([r for r in t["rows"] if r["fits"]]) if t else None
            if a is None:
                cells.append("")
                cost_cells.append("")
                continue
            d, rule, noise, time_ratio, memory_ratio = a
            text = f"{d:+.3f} ({rule}; range {noise:.3f})"
            cells.append(f"**{text}**" if abs(d) > noise else text)
            cost_cells.append(f"{100 * (time_ratio - 1):+.0f}% / {100 * (memory_ratio - 1):+.0f}%")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
        costs.append(f"| {budget} | " + " | ".join(cost_cells) + " |")
    return lines + costs


def _depth_all_lines(tasks: dict[str, Any]) -> list[str]:
    """Under one budget: the recommendation over all the depth (candidate ``depth-all``) against the
    recommendation and the best rule, in mean test loss, with the larger of the two ranges over seeds."""
    cells = []
    for task, t in tasks.items():
        rows = {r["candidate"]: r for r in t["rows"] if r["fits"]}
        if "depth-all" not in rows or "recommend" not in rows:
            continue
        d = rows["depth-all"]
        rules = [r for c, r in rows.items() if c in P.RULES]
        others = [("the recommendation", rows["recommend"])]
        if rules:
            best = min(rules, key=lambda r: r["test_loss"])
            others.append((f"the best rule ({best['candidate']})", best))
        parts = []
        for name, other in others:
            noise = max(d["test_loss_range"], other["test_loss_range"])
            parts.append(f"{d['test_loss'] - other['test_loss']:+.4f} against {name} (range {noise:.4f})")
        cells.append(f"{task} " + ", ".join(parts))
    if not cells:
        return []
    return [
        "",
        "`depth-all`: the recommendation taken among placements over all the depth (`plan.depth: all`; "
        "the default `depth: auto` takes it where a card reads the task's targets as varied, as a card made "
        "today does on every task it ran on here; these committed cards predate that reading). Its mean "
        "test loss minus the others' (negative: lower): " + "; ".join(cells) + ".",
    ]


def _fitted_note(out: dict[str, Any]) -> str:
    """Which of the tasks here the quality model was fitted on (none of UNSEEN), and where they were run."""
    others = sorted({t for b in out["budgets"].values() for t in b} - set(UNSEEN))
    if not others:
        return "None of these tasks was used to fit the quality model."
    where = {t: sorted(b for b, tasks in out["budgets"].items() if t in tasks) for t in others}
    return (
        f"None of {', '.join(UNSEEN)} was used to fit the quality model; "
        + "; ".join(f"{t}, which was, ran only at {', '.join(bs)}" for t, bs in where.items())
        + " (to check `plan.depth`, which no task here chose; gsm8k's, samsum's, facts' and format's"
        + " target entropies were among the eleven that set the threshold it acts on)."
    )


def ten_task_check(out: dict[str, Any]) -> dict[str, Any] | None:
    """The ten-task default's pick against the two-task model's (``recommend``) and the best rule, per cell
    where both were trained, and the decision rule stated before its runs: it stays the default only if it
    is behind the two-task pick beyond the larger range over seeds in no cell where the picks differ, and
    its mean difference over those cells is 0 or below. None before any ten-task run."""
    cells = []
    for budget, tasks in out["budgets"].items():
        for task, t in tasks.items():
            rows = {r["candidate"]: r for r in t["rows"] if r["fits"]}
            if "ten-task" not in rows or "recommend" not in rows:
                continue
            new, old = rows["ten-task"], rows["recommend"]
            cell = {"budget": budget, "task": task, "placement": new["placement"], "seeds": new["seeds"]}
            cell["same"] = new["signature"] == old["signature"]
            cell["against_two_task"] = new["test_loss"] - old["test_loss"]
            cell["range"] = max(new["test_loss_range"], old["test_loss_range"])
            rules = [r for c, r in rows.items() if c in P.RULES]
            if rules:
                best = min(rules, key=lambda r: r["test_loss"])
                cell["best_rule"] = best["candidate"]
                cell["against_best_rule"] = new["test_loss"] - best["test_loss"]
                cell["rule_range"] = max(new["test_loss_range"], best["test_loss_range"])
            cells.append(cell)
    if not cells:
        return None
    differ = [c for c in cells if not c["same"]]
    behind = [c for c in differ if c["against_two_task"] > c["range"]]
    mean = statistics.fmean(c["against_two_task"] for c in differ) if differ else 0.0
    return {
        "cells": cells,
        "differ": len(differ),
        "behind_beyond_range": [f"{c['task']} {c['budget']}" for c in behind],
        "mean_against_two_task": mean,
        "stays_default": not behind and mean <= 0.0,
    }


def _ten_task_lines(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return []
    lines = [
        "",
        "## The ten-task default's pick",
        "",
        "The recommendation of the quality model fitted on ten tasks (`ten-task`, the committed card given "
        "its task's target entropy as a card made today reads it) against the two-task model's (`recommend`) "
        "and the best rule at the same budget: mean test loss minus theirs (negative: lower; **bold**: "
        "beyond the larger of the two ranges over seeds).",
        "",
        "| budget | task | ten-task pick | seeds | minus the two-task pick | minus the best rule |",
        "|---|---|---|---:|---:|---:|",
    ]

    def cell(d: float, rng: float) -> str:
        text = f"{d:+.4f} (range {rng:.4f})"
        return f"**{text}**" if abs(d) > rng else text

    for c in check["cells"]:
        two = "the same placement" if c["same"] else cell(c["against_two_task"], c["range"])
        rule = (
            f"{cell(c['against_best_rule'], c['rule_range'])} ({c['best_rule']})" if "best_rule" in c else ""
        )
        seeds = len(c["seeds"])
        lines.append(f"| {c['budget']} | {c['task']} | {c['placement']} | {seeds} | {two} | {rule} |")
    behind = ", ".join(check["behind_beyond_range"]) or "none"
    lines += [
        "",
        f"Where the picks differ ({check['differ']} cells): behind the two-task pick beyond the range in "
        f"{behind}; mean difference {check['mean_against_two_task']:+.4f}. Decision rule (stated before the "
        "runs): the ten-task model stays the default only if it is behind beyond the range nowhere and its "
        "mean difference is 0 or below: "
        f"**{'stays' if check['stays_default'] else 'reverts to the two-task model'}**.",
    ]
    return lines


def _markdown(out: dict[str, Any]) -> str:
    lines = [
        "# The recommendation against the rules where it departs from them",
        "",
        f"smollm2, {out['steps']} steps, lr {out['lr']:g}, placement benchmark v2's settings, cards, base "
        "and reference runs. `previous-default`: what the parameter-share quality model (the default before "
        "`capacity_coverage`) recommends at the budget. Fraction: the test-loss drop from the base model "
        "as a fraction of the reference's (every linear module of every layer at rank 8). Candidates that "
        "land on the same placement share one run." + _machines_text(out) + " " + _fitted_note(out),
        "",
        *_overview(out),
        *_ten_task_lines(out.get("ten_task")),
        "",
        "![test loss against trainable parameters](tight.png)",
    ]
    for budget, tasks in out["budgets"].items():
        lines += [
            "",
            f"## {budget}",
            "",
            "| task | candidate | placement | params | seeds | test loss (range over seeds) | fraction "
            "| predicted | s/step | peak MiB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for task, t in tasks.items():
            fitted = [r for r in t["rows"] if r["fits"]]
            best = min((r["test_loss"] for r in fitted), default=None)
            for r in t["rows"]:
                if not r["fits"]:
                    lines.append(f"| {task} | {r['candidate']} | does not fit | | | | | | | |")
                    continue
                mark = "**" if r["test_loss"] == best else ""
                lines.append(
                    f"| {task} | {r['candidate']} | {r['placement']} | {r['params']:,} | {len(r['seeds'])} | "
                    f"{mark}{r['test_loss']:.4f}{mark} ({r['test_loss_range']:.4f}) | {r['fraction']:.3f} | "
                    f"{r['predicted']:.3f} | {r['s_per_step']:.2f} | {r['peak_memory_mib']:,.0f} |"
                )
        # Each distinct placement once per task: a rule that lands on another's placement shares its run.
        errs = [
            abs(r["predicted"] - r["fraction"])
            for t in tasks.values()
            for r in {r["signature"]: r for r in t["rows"] if r["fits"]}.values()
        ]
        if errs:
            lines += [
                "",
                f"The two-task quality model's mean absolute error over these {len(errs)} distinct "
                f"placements (seed means): {statistics.mean(errs):.3f}.",
            ]
        lines += _depth_all_lines(tasks)
    if out.get("seed_noise"):
        lines += [
            "",
            "## Seed noise",
            "",
            "One run's fraction against the mean of the same placement's runs at the other seeds, over each "
            "task's distinct placements trained at 3 seeds: "
            + "; ".join(
                f"{t} {v['one_run_vs_other_seeds_mean']:.3f} ({v['placements']} placements)"
                for t, v in out["seed_noise"].items()
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "summary"))
    ap.add_argument("--budget", default=BUDGETS[0], choices=BUDGETS)
    ap.add_argument("--tasks", default=",".join(UNSEEN))
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="comma-separated, of: " + ", ".join((*CANDIDATES, *EXTRA_CANDIDATES)),
    )
    a = ap.parse_args()
    if a.what == "run":
        tasks = a.tasks.split(",")
        bad = [t for t in tasks if t not in P.TASKS]
        if bad:
            raise SystemExit(f"--tasks: unknown task {bad[0]!r}; valid: {', '.join(P.TASKS)}")
        cands = tuple(a.candidates.split(","))
        unknown = [c for c in cands if c not in (*CANDIDATES, *EXTRA_CANDIDATES)]
        if unknown:
            raise SystemExit(
                f"--candidates: unknown candidate {unknown[0]!r}; valid: "
                + ", ".join((*CANDIDATES, *EXTRA_CANDIDATES))
            )
        run(a.budget, tasks, tuple(int(x) for x in a.seeds.split(",")), a.threads, cands)
    res = summary()
    print(Path(OUT / "tight.md").read_text() if res["budgets"] else "no runs yet")


if __name__ == "__main__":
    main()
