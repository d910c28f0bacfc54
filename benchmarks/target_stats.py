"""Each benchmark task's target statistics, read from its training data alone (no model run): how many
target tokens an example carries and how varied they are.

For every task the quality forms are fitted or scored on (quality.py's two, placement_v2.py's four others,
fresh_tasks.py's), the seeded subset of up to 1000 training examples its runs read is encoded at the task's
max_length with smollm2's tokenizer, and over the tokens that carry loss it records:

- ``entropy``: the plug-in entropy, in nats, of the token ids of the first ``SAMPLE`` of them in subset order
  (a fixed sample, so that tasks with long targets are not credited with more types for having more tokens);
- ``tokens_per_example``: their mean number per example;
- ``card_entropy``: the same entropy as a card reads it from the task it is given (``layercard.tasks.
  target_entropy``: the first ``SAMPLE`` target tokens in a seeded shuffle of the examples, not in source
  order), which is what a plan's warning reads.

quality.py ``targetcoverage`` scales the depth-coverage penalty by them; quality_confirm.py and fresh_tasks.py
score the resulting forms frozen.

``shortfall`` sets each task's entropy beside what the plan's target-entropy warning rests on: the default
quality model's shortfall (predicted minus measured fraction of the reference's drop, mean over the
placements that cover under half the depth) from the committed runs, with no model loaded: quality.py's
seed-0 grid (e2e_nlg, sst2), quality_confirm.py's placements (gsm8k, samsum, facts, format; the
tight-budget runs' seeds included) and fresh_tasks.py's seed-0 grid. It marks which tasks set the
threshold and which were built after it to test it.

    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/target_stats.py
        # writes results/quality/target_stats.{json,md}
    .venv/bin/python benchmarks/target_stats.py shortfall
        # writes results/quality/entropy_shortfall.{json,md,png}
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layercard.tasks.encode import TARGET_ENTROPY_SAMPLE as SAMPLE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "quality" / "target_stats.json"  # and .md beside it
SHORTFALL = OUT.with_name("entropy_shortfall.json")  # and .md, .png beside it
TRAIN_EXAMPLES, SEED = 1000, 0
# the tasks built after the warning's threshold was set on the others, each to test it
TESTED_AFTER = ("gsm8k_reverse", "sst2_echo", "e2e_echo")


def target_statistics(encoded: Sequence[Any], sample: int = SAMPLE) -> dict[str, float]:
    """The entropy of the first ``sample`` loss-carrying tokens and their mean number per example."""
    from layercard.tasks import plug_in_entropy
    from layercard.tasks.loss import IGNORE_INDEX

    per_example = [[t for t in e.labels if t != IGNORE_INDEX] for e in encoded]
    ids = [t for ex in per_example for t in ex]
    return {
        "entropy": plug_in_entropy(ids[:sample]),
        "entropy_tokens": min(sample, len(ids)),
        "tokens_per_example": len(ids) / len(per_example),
        "examples": len(per_example),
    }


def _tasks() -> dict[str, tuple[Any, int]]:
    """Every task's training subset and max_length, by name."""
    import fresh_tasks as F
    import placement_v2 as P
    import quality as Q

    from layercard import load_task

    out: dict[str, tuple[Any, int]] = {}
    for name, s in Q.TASKS.items():
        out[name] = (load_task(f"{name}:{s.train_split}").subset(TRAIN_EXAMPLES, seed=SEED), s.max_length)
    for name, s in P.TASKS.items():
        if name not in out:
            out[name] = (load_task(s.train).subset(TRAIN_EXAMPLES, seed=SEED), s.max_length)
    for name, t in F.TASKS.items():
        out[name] = (F.load(t, t.train_split).subset(TRAIN_EXAMPLES, seed=SEED), t.max_length)
    return out


def main() -> None:
    from layercard import load_model
    from layercard.artifacts import write_json, write_text
    from layercard.tasks import target_entropy
    from layercard.tasks.encode import encode_task

    tokenizer = load_model("smollm2").tokenizer
    stats = {
        name: {
            **target_statistics(encode_task(tokenizer, task, max_length=max_length)),
            "card_entropy": target_entropy(tokenizer, task, max_length, seed=SEED)[0],
        }
        for name, (task, max_length) in _tasks().items()
    }
    write_json(OUT, {"sample": SAMPLE, "train_examples": TRAIN_EXAMPLES, "tasks": stats})
    write_text(OUT.with_suffix(".md"), _markdown(stats))
    print(_markdown(stats))


def _markdown(stats: dict[str, dict[str, float]]) -> str:
    lines = [
        "# Target statistics of the benchmark tasks",
        "",
        f"smollm2's tokenizer, each task's seeded subset of up to {TRAIN_EXAMPLES} training examples at its "
        f"max_length; the tokens that carry loss. Entropy: plug-in, nats, over the first {SAMPLE} of them; "
        "as a card reads it: the same over the first of them in a seeded shuffle of the examples.",
        "",
        "| task | examples | target tokens per example | entropy (nats) | tokens in the entropy | "
        "entropy as a card reads it |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['examples']} | {s['tokens_per_example']:.1f} | {s['entropy']:.3f} | "
            f"{s['entropy_tokens']} | {s['card_entropy']:.3f} |"
        )
    return "\n".join([*lines, ""])


def shortfall_of(runs: Sequence[tuple[float, float, float]]) -> tuple[float | None, int]:
    """The mean of predicted minus measured over the (coverage, predicted, measured) runs that cover under
    half the depth, and how many they are; None where there are none."""
    low = [p - m for c, p, m in runs if c < 0.5]
    if any(not math.isfinite(x) for x in low):
        raise ValueError("a non-finite predicted or measured fraction")
    return (sum(low) / len(low) if low else None), len(low)


Runs = list[tuple[float, float, float]]


def _shortfall_runs() -> dict[str, tuple[str, Runs, dict[str, Runs]]]:
    """Every task's committed runs as (coverage, the default's prediction, measured fraction): its source,
    its seed-0 runs and, by seed, its runs repeated at other training seeds (each fraction against its own
    seed's reference, with the seed-0 placement's coverage and prediction)."""
    import quality as Q

    from layercard.artifacts import read_json
    from layercard.plan.quality import TWO_TASK_MODEL

    model = TWO_TASK_MODEL
    out: dict[str, tuple[str, Runs, dict[str, Runs]]] = {}
    for name in Q.TASKS:
        base_path = Q.RESULTS / "runs" / f"{name}-base.json"
        if not base_path.is_file():
            continue
        losses = {
            (p.name, sd): read_json(path)["test_loss"]
            for sd in Q.run_seeds(Q.RESULTS / "runs")
            for p in Q.GRID
            if (path := Q._run_path(name, p.name, sd)).is_file()
        }
        runs: Runs = []
        other: dict[str, Runs] = {}
        own = Q.seed_fractions(read_json(base_path)["test_loss"], losses, "own")
        for p_name, by_seed in ((p.name, own[p.name]) for p in Q.GRID if Q.SEED in own.get(p.name, {})):
            f = Q._features(name, read_json(Q._run_path(name, p_name)))
            at = (f.coverage, model.predict(f))
            runs.append((*at, by_seed[Q.SEED]))
            for sd, frac in by_seed.items():
                if sd != Q.SEED:
                    other.setdefault(str(sd), []).append((*at, frac))
        out[name] = ("quality.py, seed 0", runs, other)
    confirm = read_json(Q.RESULTS / "confirm.json")
    for name, v in confirm["tasks"].items():
        if v.get("band_runs"):
            runs = [(r["coverage"], r["predicted"], r["measured"]) for r in v["band_runs"]]
            out[name] = ("quality_confirm.py", runs, {})
    for name, v in read_json(Q.RESULTS / "fresh" / "fresh.json")["tasks"].items():
        own = (v.get("repeats") or {}).get("own", {})
        seeds = sorted({sd for fr in own.values() for sd in fr if sd != "0"}, key=int)
        at = {r["name"]: (r["bands"], r["predicted"]["default"]) for r in v["runs"]}
        out[name] = (
            "fresh_tasks.py, seed 0",
            [(*at[r["name"]], r["measured"]) for r in v["runs"]],
            {sd: [(*at[n], own[n][sd]) for n in at if sd in own.get(n, {})] for sd in seeds},
        )
    return out


def shortfall() -> dict[str, Any]:
    """Each task's target entropy beside the default's shortfall under half the depth; writes SHORTFALL."""
    from layercard.artifacts import read_json, write_json, write_text
    from layercard.plan.quality import HIGH_TARGET_ENTROPY

    stats = read_json(OUT)["tasks"]
    rows = {}
    for name, (source, runs, repeats) in _shortfall_runs().items():
        value, n = shortfall_of(runs)
        if value is None or name not in stats:
            continue
        # another seed counts only where every placement under half the depth was repeated at it
        other = {sd: shortfall_of(rs) for sd, rs in repeats.items()}
        rows[name] = {
            "entropy": stats[name]["entropy"],
            "card_entropy": stats[name]["card_entropy"],
            "tokens_per_example": stats[name]["tokens_per_example"],
            "shortfall": value,
            "placements_under_half_depth": n,
            "other_seeds": {sd: v for sd, (v, m) in other.items() if m == n},
            "source": source,
            "role": "tested" if name in TESTED_AFTER else "set",
        }
    out = {
        "threshold": HIGH_TARGET_ENTROPY,
        "tasks": dict(sorted(rows.items(), key=lambda kv: kv[1]["entropy"])),
    }
    write_json(SHORTFALL, out)
    write_text(SHORTFALL.with_suffix(".md"), _shortfall_markdown(out))
    _shortfall_plot(out)
    return out


def _shortfall_markdown(out: dict[str, Any]) -> str:
    h0 = out["threshold"]
    lines = [
        "# Target entropy and the default's shortfall where placements leave depth out",
        "",
        "Shortfall: the default quality model's predicted minus measured fraction of the reference's drop, "
        "mean over each task's placements that cover under half the depth (36 steps, lr 2e-3, smollm2); "
        "at other seeds: the same placements and reference re-trained at another seed, where all were. "
        f"Plans warn at a target entropy of {h0} nats or more, as a card reads it. `set`: the threshold was "
        "placed between these tasks; `tested`: built after it, each predicted to fall on its side.",
        "",
        "| task | entropy (nats) | as a card reads it | target tokens per example | shortfall | "
        "at other seeds | placements | source | role | warned |",
        "|---|---:|---:|---:|---:|---|---:|---|---|---|",
    ]
    for name, r in out["tasks"].items():
        seeds = ", ".join(f"{sd}: {v:+.3f}" for sd, v in r["other_seeds"].items())
        lines.append(
            f"| {name} | {r['entropy']:.3f} | {r['card_entropy']:.3f} | {r['tokens_per_example']:.1f} | "
            f"{r['shortfall']:+.3f} | {seeds} | {r['placements_under_half_depth']} | {r['source']} | "
            f"{r['role']} | {'yes' if r['card_entropy'] >= h0 else 'no'} |"
        )
    lines.append("")
    for side, pick in (
        ("warned", lambda r: r["card_entropy"] >= h0),
        ("not warned", lambda r: r["card_entropy"] < h0),
    ):
        vals = [r["shortfall"] for r in out["tasks"].values() if pick(r)]
        if vals:
            lines.append(f"- {side}: {len(vals)} tasks, shortfall {min(vals):+.3f} to {max(vals):+.3f}")
    return "\n".join([*lines, ""])


def _name_points(ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Write each point's name beside it, at the first of a few offsets where the name covers no other name,
    no point and the legend, stays inside the axes and lies nearer its own point than any other; names
    moved off the first ring get a leader line."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    at = [ax.transData.transform((x, y)) for _, x, y in points]
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    frame = ax.get_window_extent(renderer)

    def gap(box: Any, px: float, py: float) -> float:
        return math.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1))

    near = [(5, 2), (5, -9), (-5, 2), (-5, -9)]
    far = [(dx, dy) for d in (14, 24, 34) for dy in (d, -d - 8) for dx in (12, -12)]
    for i, (name, x, y) in enumerate(points):
        placed = None
        for dx, dy in [*near, *far]:
            leader = (dx, dy) not in near
            t = ax.annotate(
                name, (x, y), fontsize=7, textcoords="offset points", xytext=(dx, dy),
                ha="left" if dx > 0 else "right", va="center" if leader else "baseline",
                arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkB": 3} if leader else None,
            )  # fmt: skip
            box = t.get_window_extent(renderer).expanded(1.05, 1.15)
            own = gap(box, *at[i])
            clear = (
                frame.contains(box.x0, box.y0)
                and frame.contains(box.x1, box.y1)
                and not any(box.overlaps(b) for b in taken)
                and not any(j != i and box.contains(px, py) for j, (px, py) in enumerate(at))
                and (leader or all(own < gap(box, px, py) for j, (px, py) in enumerate(at) if j != i))
            )
            if clear:
                placed = box
                break
            t.remove()
        if placed is None:  # every place is crowded: the first far one, with its leader line
            t = ax.annotate(
                name, (x, y), fontsize=7, textcoords="offset points", xytext=far[0], va="center",
                arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkB": 3},
            )  # fmt: skip
            placed = t.get_window_extent(renderer)
        taken.append(placed)


def _shortfall_plot(out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for role, marker in (("set", "o"), ("tested", "^")):
        rs = {n: r for n, r in out["tasks"].items() if r["role"] == role}
        label = {"set": "set the threshold", "tested": "built after it"}[role]
        xs, ys = [r["card_entropy"] for r in rs.values()], [r["shortfall"] for r in rs.values()]
        ax.scatter(xs, ys, marker=marker, label=label, alpha=0.8)
    ax.axvline(out["threshold"], color="grey", ls="--", lw=0.8, label="plans warn from here")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("target entropy as a card reads it (nats per token)")
    ax.set_ylabel("default's shortfall under half the depth")
    xs = [r["card_entropy"] for r in out["tasks"].values()]
    ax.set_xlim(min(xs) - 0.3, max(xs) + 1.0)  # room for the names right of the last points
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _name_points(ax, [(n, r["card_entropy"], r["shortfall"]) for n, r in out["tasks"].items()])
    fig.savefig(SHORTFALL.with_suffix(".png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:] == ["shortfall"]:
        print(_shortfall_markdown(shortfall()))
    elif sys.argv[1:]:
        sys.exit(
            f"target_stats.py: unknown command {' '.join(sys.argv[1:])!r}; use no command or `shortfall`"
        )
    else:
        main()
