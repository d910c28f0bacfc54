"""Does the recommendation hold when the card is measured on another draw of the task's examples?

A card probes 64 examples of the task, drawn by ``--seed``. A practitioner who makes the card again at
another seed (or on another sample of their data) should get the same advice, or advice the card itself
prices within its error. For each task, cards are made at five seeds (``card --no-calibrate``: parameter
budgets need no calibration) and planned (``layercard plan``, the default policy and ``--depth auto``) at
several parameter budgets and quality targets. Recorded per task and budget:

- the distinct picks over the draws, and the share of the most common one;
- whether the picks agree on the matrices and the rank (the choices that matter most), apart from the
  layers;
- the cost of a disagreement as the cards see it: for every pair of draws, the predicted fraction the
  first draw's card loses by taking the second draw's pick instead of its own (0 where the second pick
  is priced over the budget by the first card: it then does not apply);
- per task, the agreement of the cards' per-layer scores (Spearman's ρ of the default score between
  every pair of draws).

These are predictions only: no pick is trained here. Cards and plans are kept under ``runs/card_draws``
and reused, so a second call runs only what is missing.

    .venv/bin/python benchmarks/card_draws.py [--seeds 0,1,2,3,4] [--tasks e2e_nlg,sst2,gsm8k,samsum]

Writes results/card_draws/card_draws.{json,md} and card_draws.png. Needs ``LAYERCARD_DATA``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "card_draws"
WORK = HERE.parent / "runs" / "card_draws"
# the split a practitioner's own training data stands for: train (a preset's default) where the data has one
TASKS = {"e2e_nlg": "e2e_nlg:validation", "sst2": "sst2", "gsm8k": "gsm8k", "samsum": "samsum:validation"}
BUDGETS = ("params=0.04x", "params=0.05x", "params=0.1x", "params=0.2x", "params=0.25x", "params=0.5x")
TARGETS = (0.9, 0.95)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "layercard", *args]


def _run(cmd: list[str], log: Path) -> None:
    env = os.environ | {"LAYERCARD_PROGRESS": "0"}
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")


def card(task: str, seed: int) -> Path:
    """The task's card at ``seed``, made once."""
    out = WORK / task / f"s{seed}"
    path = out / "card.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        cmd = _cli("card", "-t", TASKS[task], "--no-calibrate", "--seed", str(seed), "-o", str(out))
        _run(cmd, out / "card.log")
        print(f"card {task} seed {seed}: {time.perf_counter() - t:.1f} s", flush=True)
    return path


def _name(ask: str) -> str:
    return ask.replace("params=", "params_").replace("target=", "target_")


def plan(card_path: Path, ask: str) -> dict[str, Any]:
    """The plan for ``ask`` (a budget or ``target=F``) from a card, made once; its pick."""
    out = card_path.parent / f"plan_{_name(ask)}.json"
    if not out.is_file():
        opt = ["--target", ask.split("=")[1]] if ask.startswith("target=") else ["--budget", ask]
        _run(_cli("plan", "--card", str(card_path), *opt, "--out", str(out)), out.with_suffix(".log"))
    c = json.loads(out.read_text(encoding="utf-8"))["predicted"]["candidate"]
    return {k: c[k] for k in ("matrices", "layers", "rank", "quality", "error", "params", "params_x")}


def label(pick: dict[str, Any]) -> str:
    return f"{pick['matrices']} · {pick['layers']} · r={pick['rank']}"


def _cross(searches: dict[int, Any], picks: dict[int, dict[str, Any]], ask: str) -> list[float]:
    """For every ordered pair of draws (d, e) with different picks: what d's card predicts it loses by
    taking e's pick (0 where d's card prices e's pick over the budget, or does not price it).
    ``searches``: each draw's card priced (:func:`layercard.plan.recommend.price`)."""
    losses = []
    for d, e in itertools.permutations(searches, 2):
        if label(picks[d]) == label(picks[e]):
            continue
        search = searches[d]
        by_label = {c.label: c for c in search.candidates}
        own, other = by_label.get(label(picks[d])), by_label.get(label(picks[e]))
        # the card's own prediction of its pick, unrounded (plan.json keeps four decimals)
        mine = own.quality if own is not None else picks[d]["quality"]
        cap = (
            None if ask.startswith("target=") else float(ask.split("=")[1][:-1]) * search.reference["params"]
        )
        fits = other is not None and (cap is None or other.costs["params"] <= cap)
        losses.append(round(mine - other.quality, 4) + 0.0 if fits else 0.0)  # + 0.0: no "-0.0"
    return losses


def task_rows(task: str, seeds: list[int]) -> dict[str, Any]:
    from layercard.card import Card
    from layercard.card.stats import spearman
    from layercard.plan.recommend import price

    paths = {s: card(task, s) for s in seeds}
    cards = {s: Card.load(p) for s, p in paths.items()}
    profiles = {str(s): [float(x) for x in c.layer_scores()] for s, c in cards.items()}
    rho = [spearman(profiles[a], profiles[b]) for a, b in itertools.combinations(profiles, 2)]
    asks = [*BUDGETS, *(f"target={t}" for t in TARGETS)]
    # each card priced once for every ask
    searches = {s: price(c) for s, c in cards.items()}
    rows = []
    for ask in asks:
        picks = {s: plan(p, ask) for s, p in paths.items()}
        labels = [label(p) for p in picks.values()]
        modal = max(labels, key=labels.count)  # of equal counts, the first draw's: the same every run
        losses = _cross(searches, picks, ask)
        rows.append(
            {
                "ask": ask,
                "picks": {str(s): label(p) for s, p in picks.items()},
                "predicted": {str(s): round(p["quality"], 4) for s, p in picks.items()},
                "params_x": {str(s): p["params_x"] for s, p in picks.items()},
                "distinct": len(set(labels)),
                "modal": modal,
                "modal_share": labels.count(modal) / len(labels),
                "same_matrices_and_rank": len({(p["matrices"], p["rank"]) for p in picks.values()}) == 1,
                "cross_loss_max": max(losses, default=0.0),
                "cross_loss_mean": round(statistics.fmean(losses), 4) if losses else 0.0,
                "expected_error": max(p["error"] or 0.0 for p in picks.values()),
            }
        )
    return {
        "task": task,
        "spec": TASKS[task],
        "seeds": seeds,
        "layer_spearman": {"mean": round(statistics.fmean(rho), 3), "min": round(min(rho), 3)},
        "profiles": profiles,
        "rows": rows,
    }


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# The recommendation over five draws of the card's examples",
        "",
        "`benchmarks/card_draws.py`, smollm2, cards of 64 examples at seeds "
        f"{', '.join(map(str, data['seeds']))} "
        "(`card --no-calibrate`), each planned with `layercard plan` (default policy, `--depth auto`). "
        f"{data['machine_text']}; {data['date']}. Predictions only: no pick was trained.",
        "",
        "Columns: the distinct picks over the draws; the most common one and its share; whether every draw "
        "picked the same matrices and rank; the cost of a disagreement as the cards see it (over every pair "
        "of draws with different picks, what one draw's card predicts it loses by taking the other's pick, "
        "as a fraction of the reference's loss drop: mean and largest) against the picks' expected error; "
        "the picks' own predicted fractions, least to largest over the draws.",
        "",
        "| task | ask | distinct | most common pick (share) | same matrices and rank "
        "| picks' predicted fraction | loss if swapped: mean / max | expected error |",
        "|---|---|---:|---|---|---|---:|---:|",
    ]
    for t in data["tasks"]:
        for r in t["rows"]:
            lines.append(
                f"| {t['task']} | {r['ask']} | {r['distinct']} | {r['modal']} ({r['modal_share']:.0%}) | "
                f"{'yes' if r['same_matrices_and_rank'] else 'no'} | "
                f"{min(r['predicted'].values()):.4f}–{max(r['predicted'].values()):.4f} | "
                f"{r['cross_loss_mean']:.4f} / "
                f"{r['cross_loss_max']:.4f} | {r['expected_error']:.3f} |"
            )
    rows = [r for t in data["tasks"] for r in t["rows"]]
    s = data["summary"]
    lines += [
        "",
        f"Over {len(rows)} task-asks: every draw agreed in {s['all_agree']}; the most common pick held "
        f"{s['modal_share_mean']:.0%} of the draws on average; the matrices and rank agreed in "
        f"{s['same_matrices_and_rank']}; the largest predicted loss of a swapped pick was "
        f"{s['cross_loss_max']:.4f} (mean over the task-asks whose draws disagreed "
        f"{s['cross_loss_mean']:.4f}).",
        "",
        "Per-layer scores (the card's default score) between pairs of draws, Spearman's ρ: "
        + "; ".join(
            f"{t['task']} {t['layer_spearman']['mean']:.3f} (least {t['layer_spearman']['min']:.3f})"
            for t in data["tasks"]
        )
        + (
            f"; between tasks (seed {data['seeds'][0]}'s cards) {s['between_tasks']['min']:.3f}–"
            f"{s['between_tasks']['max']:.3f}."
            if s.get("between_tasks")
            else "."
        ),
        "",
        "![per-layer scores over the draws](card_draws.png)",
    ]
    return "\n".join(lines) + "\n"


def figure(data: dict[str, Any], path: Path) -> None:
    from layercard.plotting import new_figure, save_png

    tasks = data["tasks"]
    fig, axes = new_figure(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), sharey=True)
    for ax, t in zip(list(axes), tasks, strict=True):
        for s, prof in t["profiles"].items():
            top = max(prof) or 1.0
            ax.plot(range(len(prof)), [v / top for v in prof], lw=1, label=f"seed {s}")
        ax.set_yscale(
            "log"
        )  # one layer's score dwarfs the rest on every task: the others' spread shows on a log scale
        ax.set_title(f"{t['task']} (ρ {t['layer_spearman']['mean']:.2f})")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("default score / its largest")
    axes[-1].legend(fontsize=7)
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    if not os.environ.get("LAYERCARD_DATA"):
        raise SystemExit("LAYERCARD_DATA must name the folder of the preset tasks' data")
    from layercard.artifacts import machine_info, machine_text, write_json, write_text
    from layercard.card.stats import spearman

    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [task_rows(t, seeds) for t in args.tasks.split(",")]
    rows = [r for t in tasks for r in t["rows"]]
    losses = [r["cross_loss_max"] for r in rows]
    first = str(seeds[0])
    # how far apart two tasks' cards are, against two draws of one task's
    between = [
        spearman(a["profiles"][first], b["profiles"][first]) for a, b in itertools.combinations(tasks, 2)
    ]
    machine = machine_info()
    data = {
        "benchmark": "card_draws",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "machine_text": machine_text(machine),
        "seeds": seeds,
        "tasks": tasks,
        "summary": {
            "task_asks": len(rows),
            "all_agree": sum(r["distinct"] == 1 for r in rows),
            "modal_share_mean": round(statistics.fmean(r["modal_share"] for r in rows), 3),
            "same_matrices_and_rank": sum(r["same_matrices_and_rank"] for r in rows),
            "between_tasks": {"min": round(min(between), 3), "max": round(max(between), 3)}
            if between
            else None,
            "cross_loss_max": max(losses),
            "cross_loss_mean": round(
                statistics.fmean([r["cross_loss_mean"] for r in rows if r["distinct"] > 1] or [0.0]), 4
            ),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "card_draws.json", data)
    write_text(RESULTS / "card_draws.md", markdown(data))
    figure(data, RESULTS / "card_draws.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
