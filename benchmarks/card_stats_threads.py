"""The card's statistics on one thread with BLAS threads, or on a few threads with one BLAS thread each.

After the probe pass the card eigen-decomposes every input's covariance and, per unit, the Gram matrix of
its whitened gradient. This script runs the demo card's probe pass once on smollm2 and then the
statistics of the same sums alternately in both ways, ``--repeats`` times each, and reports their wall
times and how far the two results lie apart.

    .venv/bin/python benchmarks/card_stats_threads.py [--repeats 3] [--threads 2]

Settings: smollm2, all linear roles, 16 examples of the built-in facts task (up to 96 tokens, batch 4),
the demo's card. Writes results/card_stats_threads.{json,md}.
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


def measure(repeats: int, threads: int) -> dict:
    import torch

    from layercard import models
    from layercard.card.compute import _finish_pass
    from layercard.card.probe import compute_dtype, make_accumulators, run_probe
    from layercard.config import CardConfig
    from layercard.models import load_model
    from layercard.tasks import batches, count_target_tokens, encode_task, load_task

    torch.set_num_threads(threads)
    cfg = CardConfig(roles="all-linear", examples=16, max_length=96, batch_size=4, calibrate=False)
    loaded = load_model("smollm2")
    task = load_task("synthetic:facts", split="train", seed=cfg.seed).subset(cfg.examples, seed=cfg.seed)
    enc = encode_task(loaded.tokenizer, task, max_length=cfg.max_length)
    n_tgt = count_target_tokens(enc)
    model = loaded.model
    specs = models.units(model, models.parse_roles(cfg.roles))
    accs = make_accumulators(
        specs,
        lora_rank=cfg.lora_rank,
        a_draws=cfg.a_draws,
        seed=cfg.seed,
        sketch=cfg.sketch_size(models.hidden_size(model)),
        device=torch.device("cpu"),
        dtype=compute_dtype(next(model.parameters()).dtype),
    )
    run_probe(
        model, list(batches(enc, cfg.batch_size, loaded.tokenizer.pad_token_id)), accs, n_target_tokens=n_tgt
    )
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"one thread": [], f"{threads} threads": []}
    rows: dict[str, list] = {}
    for _ in range(repeats):
        for name, workers in (("one thread", 1), (f"{threads} threads", threads)):
            t = time.perf_counter()
            units, _, _, _ = _finish_pass(accs, cfg, n_tgt, workers=workers)
            times[name].append(time.perf_counter() - t)
            rows[name] = units

    pairs = list(zip(*rows.values(), strict=True))

    def worst(field: str) -> float:
        return max(abs(getattr(x, field) - getattr(y, field)) / abs(getattr(x, field)) for x, y in pairs)

    captured = max(
        abs(x.captured[k] - y.captured[k]) / abs(x.captured[k]) for x, y in pairs for k in x.captured
    )
    return {
        "benchmark": "card_stats_threads",
        "threads": threads,
        "repeats": repeats,
        "units": len(accs),
        "inputs": len({id(x.group) for x in accs}),
        "seconds": times,
        "worst_relative_difference": {
            "resnorm": worst("resnorm"),
            "rate": worst("rate"),
            "captured": captured,
        },
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write(out: dict) -> None:
    from layercard.artifacts import machine_info, write_json, write_text

    out = out | {"machine": machine_info()}
    out["median_s"] = {k: statistics.median(v) for k, v in out["seconds"].items()}
    write_json(RESULTS / "card_stats_threads.json", out)
    serial, parallel = out["median_s"].values()
    diff = out["worst_relative_difference"]
    lines = [
        "# The card's statistics: one thread, or several with one BLAS thread each",
        "",
        f"smollm2, the demo's card on facts (all linear roles, 16 examples, batch 4, ≤ 96 tokens): one probe "
        f"pass, then the statistics of its sums ({out['units']} units, {out['inputs']} inputs) "
        f"{out['repeats']} times each way, alternately; {out['threads']} torch threads, {out['date']}; "
        f"1-min load average {out['load_1min_before']:.1f} before, {out['load_1min_after']:.1f} after.",
        "",
        "| way | seconds | median |",
        "|---|---|---:|",
    ]
    for name, secs in out["seconds"].items():
        lines.append(f"| {name} | {', '.join(f'{s:.2f}' for s in secs)} | {out['median_s'][name]:.2f} |")
    lines += [
        "",
        f"- {out['threads']} threads with one BLAS thread each took **{parallel / serial:.2f}×** the time of "
        f"one thread with BLAS's own threads ({serial - parallel:.2f} s less).",
        f"- Largest relative difference between the two results, over every unit: resnorm "
        f"{diff['resnorm']:.1e}, rate {diff['rate']:.1e}, captured {diff['captured']:.1e} (the card stores 8 "
        "significant digits).",
        "",
    ]
    write_text(RESULTS / "card_stats_threads.md", "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 2:
        ap.error("--repeats must be ≥ 1 and --threads ≥ 2")
    write(measure(args.repeats, args.threads))
    print(f"wrote {RESULTS / 'card_stats_threads.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
