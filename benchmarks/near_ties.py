"""Near-ties: do the placements the quality model cannot tell apart measure alike?

Over five draws of a card's examples (`card_draws.md`) the recommendation moved, on e2e_nlg and sst2,
between the same matrices and rank on all 30 layers and on the last 26 or 28 of them: placements the
default quality model predicts within 0.0001 of each other, so the draw chooses. This trains both sides
of the two pairs the draws split on at params=0.2x and 0.25x (the MLP at rank 2 on all layers and on the
last 26; every linear module at rank 2 on all layers and on the last 28) with the quality benchmark's
settings (`quality.py`: 36 steps of batch 4, lr 2e-3, its cards and test sets) at three seeds on the two
tasks the quality model was chosen on. Runs the quality benchmark already holds (same settings, same
seed) are read from there; the rest are trained by the quality benchmark's own run function and kept under
results/quality/near_ties/runs/ (seed 0's at its top, others in seed{N}/) and skipped when present
(resumable). Each seed's fraction is of the same seed's reference drop.

    .venv/bin/python benchmarks/near_ties.py run
    .venv/bin/python benchmarks/near_ties.py summary

Writes results/quality/near_ties/near_ties.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import quality as QB  # this folder is on sys.path

RESULTS = QB.RESULTS / "near_ties"
TASKS = ("e2e_nlg", "sst2")
SEEDS = (0, 1, 2)
# (the draws' all-layer side, the fewer-layer side), as quality-benchmark placements
PAIRS = (
    (
        QB.Placement("mlp-all-r2", "mlp", "all", None, 2),
        QB.Placement("mlp-last26-r2", "mlp", "top", "layers=26", 2),
    ),
    (
        QB.Placement("lin-all-r2", "all-linear", "all", None, 2),
        QB.Placement("lin-last28-r2", "all-linear", "top", "layers=28", 2),
    ),
)
REF = QB.GRID[0]


def _path(task: str, name: str, seed: int) -> Path:
    """The run's file: the quality benchmark's where it holds the run, else this benchmark's own."""
    theirs = QB._run_path(task, name, seed)
    return theirs if theirs.is_file() else QB._run_path(task, name, seed, root=RESULTS / "runs")


def _plan(card: Any, p: Any) -> Any:
    from layercard import PlanConfig, make_plan

    return make_plan(card, PlanConfig(policy=p.policy, budget=p.budget, roles=p.roles, rank=p.rank))


def predicted(card: Any, p: Any) -> tuple[float, float | None, list[int]]:
    """The default quality model's fraction for ``p`` on ``card``, its expected error, and its layers."""
    from layercard.plan import quality as Q

    plan = _plan(card, p)
    model = Q.default_model()
    f = Q.Basis(card).features({u.key: u.rank for u in plan.units})
    return model.predict(f), model.error(f), list(plan.layers)


def run(threads: int) -> None:
    """Every pair's runs and the reference's, at every seed, that neither benchmark holds yet."""
    import torch

    from layercard import load_model, load_task

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    for name in TASKS:
        s = QB.TASKS[name]
        train_task = load_task(f"{name}:{s.train_split}")
        test = load_task(f"{name}:{s.test_split}").subset(s.test_examples, seed=QB.SEED)
        card = QB._card(loaded, train_task.subset(QB.TRAIN_EXAMPLES, seed=QB.SEED), s)
        for seed in SEEDS:
            for p in (REF, *(p for pair in PAIRS for p in pair)):
                if not QB._run_path(name, p.name, seed).is_file():
                    QB._run(loaded, card, train_task, test, s, p, seed, root=RESULTS / "runs")


def _loss(task: str, name: str, seed: int) -> float | None:
    path = _path(task, name, seed)
    return float(json.loads(path.read_text())["test_loss"]) if path.is_file() else None


def _card(task: str) -> Any:
    from layercard.card import Card

    return Card.load(QB.RESULTS / "cards" / task / "card.json")


def summarize() -> dict[str, Any]:
    """Per task and pair: each side's measured fraction per seed (of that seed's reference drop), its
    prediction, and the difference of the two sides' mean test losses against their seed ranges."""
    rows = []
    for task in TASKS:
        base = float(json.loads((QB.RESULTS / "runs" / f"{task}-base.json").read_text())["test_loss"])
        card = _card(task)
        refs = {s: _loss(task, REF.name, s) for s in SEEDS}
        for wide, narrow in PAIRS:
            sides = {}
            for p in (wide, narrow):
                losses = {s: _loss(task, p.name, s) for s in SEEDS}
                if any(v is None for v in (*losses.values(), *refs.values())):
                    raise SystemExit(f"{task} {p.name}: runs missing; run `near_ties.py run` first")
                fractions = [(base - losses[s]) / (base - refs[s]) for s in SEEDS]
                pred, err, layers = predicted(card, p)
                sides[p.name] = {
                    "layers": [min(layers), max(layers), len(layers)],
                    "test_loss": [losses[s] for s in SEEDS],
                    "fraction": fractions,
                    "fraction_mean": statistics.fmean(fractions),
                    "predicted": pred,
                    "expected_error": err,
                }
            a, b = sides[wide.name], sides[narrow.name]
            diff = statistics.fmean(b["test_loss"]) - statistics.fmean(a["test_loss"])
            overlap = max(a["test_loss"]) >= min(b["test_loss"]) and max(b["test_loss"]) >= min(
                a["test_loss"]
            )
            rows.append(
                {
                    "task": task,
                    "all_layers": wide.name,
                    "fewer_layers": narrow.name,
                    "sides": sides,
                    "loss_difference": diff,  # fewer layers minus all layers: positive = fewer layers worse
                    "fraction_difference": b["fraction_mean"] - a["fraction_mean"],
                    "predicted_difference": b["predicted"] - a["predicted"],
                    "beyond_seed_range": not overlap,
                }
            )
    return {"tasks": list(TASKS), "seeds": list(SEEDS), "steps": QB.STEPS, "rows": rows}


def _markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Near-ties: placements the quality model cannot tell apart, trained",
        "",
        "`benchmarks/near_ties.py`, smollm2, the quality benchmark's settings (36 steps of batch 4, lr 2e-3, "
        "its cards and test sets), seeds 0, 1, 2; each seed's fraction is of that seed's reference drop "
        "(every linear module of every layer at rank 8). The pairs are those the recommendation moved "
        "between over five draws of the card's examples (`card_draws.md`).",
        "",
        "| task | placement | layers | test loss per seed | fraction: mean (seeds) | predicted |",
        "|---|---|---|---|---|---:|",
    ]
    for r in out["rows"]:
        for name, side in r["sides"].items():
            lo, hi, n = side["layers"]
            losses = ", ".join(f"{v:.4f}" for v in side["test_loss"])
            fr = ", ".join(f"{v:.3f}" for v in side["fraction"])
            lines.append(
                f"| {r['task']} | {name} | {n} ({lo}–{hi}) | {losses} | {side['fraction_mean']:.3f} ({fr}) "
                f"| {side['predicted']:.4f} |"
            )
    lines += [
        "",
        "| task | pair | fewer layers minus all: test loss (nats) | fraction | predicted "
        "| beyond the seeds' range |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['task']} | {r['fewer_layers']} vs {r['all_layers']} | {r['loss_difference']:+.4f} "
            f"| {r['fraction_difference']:+.3f} | {r['predicted_difference']:+.1e} "
            f"| {'yes' if r['beyond_seed_range'] else 'no'} |"
        )
    lines += ["", "![fractions per seed](near_ties.png)", ""]
    return "\n".join(lines)


def _plot(out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = []
    for i, r in enumerate(out["rows"]):
        for j, (name, side) in enumerate(r["sides"].items()):
            x = 2 * i + j
            ax.scatter([x] * len(side["fraction"]), side["fraction"], color="C0" if j == 0 else "C1", s=18)
            ax.plot([x - 0.25, x + 0.25], [side["predicted"]] * 2, color="k", lw=1)
            labels.append(f"{r['task']}\n{name}")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("fraction of the reference's drop")
    ax.set_title("measured per seed (dots) and predicted (line)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "near_ties.png", dpi=120)
    plt.close(fig)


def summary() -> None:
    from layercard.artifacts import write_json

    out = summarize()
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "near_ties.json", out)
    (RESULTS / "near_ties.md").write_text(_markdown(out), encoding="utf-8")
    _plot(out)
    print(_markdown(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "summary"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.what == "run":
        run(args.threads)
    summary()


if __name__ == "__main__":
    main()
