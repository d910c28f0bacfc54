"""Calibration warm-up: is the first step after a fresh LoRA wrap slower than the next ones?

The cost calibration wraps the frozen model in new LoRA modules for each of its placements and times a few
optimizer steps after an untimed one. This script keeps that untimed first step's time too (two timed steps
follow it) for each calibration placement, in three interleaved rounds, and reports the first step's time
over the median of the other two. A ratio
near 1 in later rounds would mean later rounds need no warm-up step; a ratio above 1 means an unwarmed
timed step over-predicts a training run, whose median step never sees the wrap.

    .venv/bin/python benchmarks/calibration_warmup.py [--rounds 3] [--threads 2]

Settings: smollm2, all linear roles, one batch of 4 examples of the built-in facts task (up to 96 tokens),
the calibration's own placements (top layer, bottom layer, middle layer, all layers at rank 8 and at 32).
Writes results/calibration_warmup.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def measure(rounds: int, threads: int) -> dict:
    import torch

    from layercard import models
    from layercard.cost import _time_steps
    from layercard.models import load_model
    from layercard.tasks import batches, encode_task, load_task

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    task = load_task("synthetic:facts").subset(16, seed=0)
    enc = encode_task(loaded.tokenizer, task, max_length=96)
    batch = next(iter(batches(enc, 4, loaded.tokenizer.pad_token_id)))
    model = loaded.model
    model.train()
    roles = models.parse_roles("all-linear")
    n = models.num_layers(model)
    every = list(range(n))
    configs = [([n - 1], 8), ([0], 8), ([n // 2], 8), (every, 8), (every, 32)]
    names = [
        f"layer {layers[0]} r{rank}" if len(layers) == 1 else f"all layers r{rank}"
        for layers, rank in configs
    ]
    load_before = os.getloadavg()[0]
    rows = []
    for r in range(rounds):
        for name, (layers, rank) in zip(names, configs, strict=True):
            specs = models.units(model, roles, layers=layers)
            t = _time_steps(model, [s.name for s in specs], batch, 2, rank)
            rest = statistics.median(t.step_s)
            rows.append(
                {
                    "round": r,
                    "placement": name,
                    "first_s": round(t.warmup_s, 4),
                    "next_s": [round(x, 4) for x in t.step_s],
                    "first_over_next": t.warmup_s / rest,
                }
            )
    return {
        "benchmark": "calibration_warmup",
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "rows": rows,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write(out: dict) -> None:
    from layercard.artifacts import machine_info, write_json, write_text

    rows = out["rows"]
    ratios = [r["first_over_next"] for r in rows]
    later = [r["first_over_next"] for r in rows if r["round"] > 0]
    out = {
        **out,
        "median_first_over_next": statistics.median(ratios),
        "median_first_over_next_later_rounds": statistics.median(later) if later else None,
        "share_slower": sum(x > 1 for x in ratios) / len(ratios),
        "machine": machine_info(),
    }
    write_json(RESULTS / "calibration_warmup.json", out)
    lines = [
        "# Calibration warm-up: the first step after a fresh LoRA wrap",
        "",
        f"smollm2, all linear roles, one batch of 4 facts examples (≤ 96 tokens), {out['threads']} torch "
        f"threads, {out['rounds']} interleaved rounds over the calibration placements, {out['date']}; 1-min "
        f"load average {out['load_1min_before']:.1f} before, {out['load_1min_after']:.1f} after.",
        "",
        "| round | placement | first step (s) | next two (s) | first / median of next |",
        "|---:|---|---:|---|---:|",
    ]
    for r in rows:
        nxt = ", ".join(f"{x:.3f}" for x in r["next_s"])
        lines.append(
            f"| {r['round']} | {r['placement']} | {r['first_s']:.3f} | {nxt} | {r['first_over_next']:.3f} |"
        )
    lines += [
        "",
        f"- first step over the next ones, median over all {len(rows)} wraps: "
        f"**{out['median_first_over_next']:.3f}**; over the wraps after the first round: "
        + (f"**{out['median_first_over_next_later_rounds']:.3f}**" if later else "—"),
        f"- the first step was the slower in {100 * out['share_slower']:.0f}% of the wraps",
        "",
    ]
    write_text(RESULTS / "calibration_warmup.md", "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be ≥ 1")
    write(measure(args.rounds, args.threads))
    print(f"wrote {RESULTS / 'calibration_warmup.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
