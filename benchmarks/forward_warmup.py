"""Does the calibration's base-model forward need an untimed pass first, right after the card's probe?

The cost calibration times the frozen model's no-grad forward on the calibration batch and on half of it,
the fastest of two passes each, and reads the forward's share that grows with positions off the two. It
runs right after the card's probe pass and statistics. This script repeats that order in fresh processes
(the card without calibration, then four full-batch passes and four half-batch passes, each timed) and
reports what the fastest of the first two passes gives against the fastest of the two after an untimed one.

    .venv/bin/python benchmarks/forward_warmup.py [--processes 5] [--threads 2]
    .venv/bin/python benchmarks/forward_warmup.py --task sst2:validation --batch 8 --max-length 128

Settings: smollm2, the card of all linear roles on 16 examples; by default the packaged demo's (the
built-in facts task, up to 96 tokens, batch 4), with the options those of benchmarks/cost.py. Writes
results/cost/forward_warmup.{json,md}, with any other setting forward_warmup_TASK_bBATCH.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost"
PASSES = 4


def child(threads: int, task_spec: str, batch_size: int, max_length: int) -> dict:
    import torch

    from layercard.api import measure_card
    from layercard.config import CardConfig
    from layercard.cost import forward_seconds
    from layercard.models import load_model
    from layercard.tasks import batches, encode_task, load_task

    torch.set_num_threads(threads)
    cfg = CardConfig(
        roles="all-linear", examples=16, max_length=max_length, batch_size=batch_size, calibrate=False
    )
    loaded = load_model("smollm2")
    if task_spec.startswith("synthetic:"):
        task = load_task(task_spec, split="train", seed=cfg.seed)
    else:
        task = load_task(task_spec, seed=cfg.seed)
    card = measure_card(loaded, task, cfg, progress=False)
    # the calibration's batch: the card's first probe batch
    enc = encode_task(loaded.tokenizer, task.subset(cfg.examples, seed=cfg.seed), max_length=cfg.max_length)
    batch = next(iter(batches(enc, cfg.batch_size, loaded.tokenizer.pad_token_id)))
    half = {k: v[: cfg.batch_size // 2] for k, v in batch.items()}
    full_s = [forward_seconds(loaded.model, batch, warm=True) for _ in range(PASSES)]
    half_s = [forward_seconds(loaded.model, half, warm=True) for _ in range(PASSES)]
    return {"probe_s": card.timings["probe_s"], "full_s": full_s, "half_s": half_s}


def summarize(passes: list[float]) -> dict:
    """The fastest of the first two passes against the fastest of passes 2-3 (one untimed pass first)."""
    cold, warm = min(passes[:2]), min(passes[1:3])
    return {
        "first_over_rest": passes[0] / statistics.median(passes[1:]),
        "first_two_s": cold,
        "after_one_s": warm,
        "first_two_over_after_one": cold / warm,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", default="synthetic:facts", help="task spec (presets need LAYERCARD_DATA)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.processes < 1 or args.threads < 1 or args.batch < 2 or args.max_length < 8:
        ap.error("--processes and --threads must be ≥ 1, --batch ≥ 2 and --max-length ≥ 8")
    if args.child:
        print(json.dumps(child(args.threads, args.task, args.batch, args.max_length)))
        return 0
    default = (args.task, args.batch, args.max_length) == ("synthetic:facts", 4, 96)
    name = "forward_warmup" if default else f"forward_warmup_{args.task.split(':')[-2]}_b{args.batch}"
    from layercard.artifacts import machine_info, write_json, write_text

    load_before = os.getloadavg()[0]
    runs = []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--task", args.task]
        cmd += ["--batch", str(args.batch), "--max-length", str(args.max_length)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run |= {"full": summarize(run["full_s"]), "half": summarize(run["half_s"])}
        runs.append(run)
        print(
            f"process {i + 1}/{args.processes}: full {run['full']['first_two_over_after_one']:.3f}, "
            f"half {run['half']['first_two_over_after_one']:.3f}"
        )
    out = {
        "benchmark": "forward_warmup",
        "threads": args.threads,
        "task": args.task,
        "batch": args.batch,
        "max_length": args.max_length,
        "passes": PASSES,
        "runs": runs,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
    }
    for kind in ("full", "half"):
        ratios = [r[kind]["first_two_over_after_one"] for r in runs]
        out[f"{kind}_mean_first_two_over_after_one"] = statistics.mean(ratios)
        out[f"{kind}_max_first_two_over_after_one"] = max(ratios)
    write_json(RESULTS / f"{name}.json", out)
    lines = [
        "# The base model's forward right after the probe: is an untimed pass needed first?",
        "",
        f"smollm2, a card on `{args.task}` (all linear roles, 16 examples, batch {args.batch}, "
        f"≤ {args.max_length} tokens) without calibration, then {PASSES} timed no-grad forward passes on the "
        f"calibration batch and {PASSES} on half of it; {args.processes} fresh processes, {args.threads} "
        f"torch threads, {out['date']}; 1-min load average {load_before:.1f} before, "
        f"{out['load_1min_after']:.1f} after.",
        "",
        "| process | batch | passes (s) | first / median of the rest | fastest of passes 1-2 | "
        "fastest of 2-3 | ratio |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs):
        for kind, rows in (("full", args.batch), ("half", args.batch // 2)):
            s = r[kind]
            times = ", ".join(f"{x:.3f}" for x in r[f"{kind}_s"])
            lines.append(
                f"| {i + 1} | {rows} rows | {times} | {s['first_over_rest']:.3f} | {s['first_two_s']:.3f} | "
                f"{s['after_one_s']:.3f} | {s['first_two_over_after_one']:.3f} |"
            )
    lines += [
        "",
        f"- The fastest of the first two passes over the fastest of the two after an untimed one: full batch "
        f"mean **{out['full_mean_first_two_over_after_one']:.3f}** (at most "
        f"{out['full_max_first_two_over_after_one']:.3f}), half batch mean "
        f"**{out['half_mean_first_two_over_after_one']:.3f}** (at most "
        f"{out['half_max_first_two_over_after_one']:.3f}).",
        "",
    ]
    write_text(RESULTS / f"{name}.md", "\n".join(lines))
    print(f"wrote {RESULTS / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
