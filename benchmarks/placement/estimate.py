"""--estimate: planned runs and expected hours, from time constants and the tasks' token statistics."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np

from .jobs import Job, grid_jobs, single_jobs
from .runner import load_capped
from .settings import Settings, TaskSetting


@dataclasses.dataclass(frozen=True)
class Costs:
    """Time constants of smollm2 on 2 CPU cores, fp32 (docs/design.md §10 and the pilot of §3a)."""

    train_all_s_per_ktok: float = 5.6  # all-30 LoRA q,v step per 1024 padded tokens
    fwd_s_per_ktok: float = 2.0  # forward only (eval loss, generation prefill) per 1024 tokens
    decode_s_per_step: float = 0.04  # one greedy decode step of a batch of 16
    run_overhead_s: float = 5.0  # PEFT wrap/unload, adapter save and load, hashes
    card_s_per_ktok: float = 45.0 / 8.192  # a card pass over 64×128 tokens ≈ 45 s
    card_extra_s: float = 75.0  # coupling (8 examples) and cost calibration (4 placements × 3 steps)
    trim_ks: int = 8  # boundaries swept per trim (±2 around two candidates, deduplicated, plus the last)


def depth_factor(min_layer: int, n_adapted: int, n_layers: int) -> float:
    """Step time relative to all-30, fitted to the pilot: layer 29 alone 0.38, layer 0 alone 0.95, all 1."""
    return 0.357 + 0.587 * (n_layers - min_layer) / n_layers + 0.056 * n_adapted / n_layers


def _assumed_min_layer(job: Job, n_layers: int) -> tuple[int, int]:
    """(lowest adapted layer, adapted layers) a job is costed at before its plan exists (conservative)."""
    if job.layer is not None:
        return job.layer, 1
    if job.policy == "all" or job.budget is None:
        return 0, n_layers
    k = job.budget
    if job.policy == "top":
        return n_layers - k, k
    if job.policy == "middle":
        return (n_layers - k) // 2, k
    if job.policy == "uniform":
        return n_layers // (2 * k), k
    return 0, k  # bottom, random, gradnorm and the card policies can reach layer 0


def token_stats(settings: Settings, tok: Any) -> dict[str, dict[str, float]]:
    """Mean padded tokens per training batch, eval lengths and prompt lengths, from 256 examples per split."""
    from layercard.tasks import encode_prompt, encode_task

    out = {}
    for ts in settings.tasks:
        train = load_capped(ts.train_spec, ts.train_split, ts).subset(256, seed=0)
        test = load_capped(ts.test_spec, ts.test_split, ts).subset(256, seed=0)
        enc = encode_task(tok, train, max_length=ts.max_length)
        lens = [len(e) for e in enc]
        rng = random.Random(0)
        rng.shuffle(lens)
        b = ts.batch_size
        step = [max(lens[i : i + b]) * b for i in range(0, len(lens) - b + 1, b)]
        tenc = encode_task(tok, test, max_length=ts.max_length)
        targets = sorted(len(e) - e.prompt_len for e in tenc)
        prompts = [len(encode_prompt(tok, test.format, ex.input)) for ex in test.examples]
        out[ts.name] = {
            "step_tokens": float(np.mean(step)),
            "eval_tokens": float(np.mean([len(e) for e in tenc])),
            "prompt_tokens": float(np.mean(prompts)),
            "decode_steps": float(min(ts.max_new_tokens, targets[int(0.9 * (len(targets) - 1))] + 1)),
        }
    return out


def _task_estimate(settings: Settings, ts: TaskSetting, st: dict[str, float], c: Costs) -> dict[str, Any]:
    """Runs and seconds of one task, per phase."""
    L = settings.n_layers
    step_all = c.train_all_s_per_ktok * st["step_tokens"] / 1024
    loss_s = ts.loss_examples * st["eval_tokens"] * c.fwd_s_per_ktok / 1024
    gen_s = (
        ts.gen_examples * st["prompt_tokens"] * c.fwd_s_per_ktok / 1024
        + math.ceil(ts.gen_examples / settings.eval_batch_size) * st["decode_steps"] * c.decode_s_per_step
    )

    def job_s(job: Job) -> float:
        lo, n = _assumed_min_layer(job, L)
        ev = loss_s + (gen_s if job.group != "single" else 0.0)
        return settings.steps * step_all * depth_factor(lo, n, L) + ev + c.run_overhead_s

    singles = single_jobs(settings, [ts.name])
    grid = grid_jobs(settings, [ts.name])
    card_s = c.card_s_per_ktok * settings.card_examples * min(ts.max_length, st["eval_tokens"] * 1.15) / 1024
    trim_n = ts.trim_examples
    trim_gen = (
        trim_n * st["prompt_tokens"] * c.fwd_s_per_ktok / 1024
        + math.ceil(trim_n / settings.eval_batch_size) * st["decode_steps"] * c.decode_s_per_step
    )
    trim_loss = trim_n * st["eval_tokens"] * c.fwd_s_per_ktok / 1024
    return {
        "all30_s_per_step": round(step_all, 2),
        "eval_s": round(loss_s + gen_s, 1),
        "runs": {
            "single": len(singles),
            "grid": sum(j.group == "grid" for j in grid),
            "repeat": sum(j.group == "repeat" for j in grid),
            "base": 1,
        },
        "seconds": {
            "card": card_s + c.card_extra_s,
            "base": loss_s + gen_s + c.run_overhead_s,
            "single": sum(job_s(j) for j in singles),
            "grid": sum(job_s(j) for j in grid if j.group == "grid"),
            "repeat": sum(job_s(j) for j in grid if j.group == "repeat"),
            "trim": (c.trim_ks + 2) * (trim_gen + trim_loss) + 2 * (loss_s + gen_s),
        },
    }


def estimate(settings: Settings, stats: dict[str, dict[str, float]], c: Costs = Costs()) -> dict[str, Any]:
    """Planned runs and expected seconds per task and phase, from the constants and the token statistics."""
    per = {ts.name: _task_estimate(settings, ts, stats[ts.name], c) for ts in settings.tasks}
    total = sum(sum(p["seconds"].values()) for p in per.values())
    n_runs = sum(sum(p["runs"].values()) for p in per.values())
    return {
        "tasks": [t.name for t in settings.tasks],
        "per_task": per,
        "runs": n_runs,
        "total_s": total,
        "hours": total / 3600,
        "constants": dataclasses.asdict(c),
        "token_stats": stats,
    }


def print_estimate(est: dict[str, Any]) -> None:
    """The estimate as a console table."""
    print("Planned work (train+eval runs; base = base-model evaluation; one card and one trim per task):")
    print(
        f"{'task':9s} {'single':>6s} {'grid':>5s} {'repeat':>6s} {'all-30 s/step':>13s} {'eval s':>7s} "
        f"{'card':>6s} {'single':>7s} {'grid':>7s} {'repeat':>7s} {'trim':>6s} {'total':>7s}"
    )
    for t, p in est["per_task"].items():
        r, s = p["runs"], p["seconds"]
        print(
            f"{t:9s} {r['single']:6d} {r['grid']:5d} {r['repeat']:6d} {p['all30_s_per_step']:13.2f} "
            f"{p['eval_s']:7.0f} {s['card'] / 60:5.1f}m {s['single'] / 60:6.1f}m {s['grid'] / 60:6.1f}m "
            f"{s['repeat'] / 60:6.1f}m {s['trim'] / 60:5.1f}m {sum(s.values()) / 60:6.1f}m"
        )
    print(
        f"total: {est['runs']} runs (at most: placements that coincide share a run) "
        f"≈ {est['hours']:.2f} h on 2 CPU cores"
    )
