"""Gradient noise scale of each benchmark task on smollm2: how much a training batch's gradient differs
from the task's mean gradient, over how large that mean gradient is.

For every card the quality benchmarks use (results/quality/cards: e2e_nlg, sst2; results/placement_v2/cards:
six tasks) it takes that card's 32 probe examples, forms each example's gradient h_i (summed over its
target tokens) of every linear unit of every layer, and estimates

    G = Σ h_i / Σ n_i                         the mean per-token gradient (n_i: target tokens of example i)
    V = Σ ‖h_i − n_i·G‖² / (N − 1)             the spread of one example's gradient about n_i·G
    |G|² (unbiased) = ‖G‖² − V / (N·n̄²)
    B_noise = V / (n̄²·|G|²)                    in examples

A batch of B examples then has a gradient whose noise is B_noise/B times its signal. The question it
answers is whether B_noise carries what the card's other statistics do not: how many steps a task takes to
saturate (docs/design.md §4). Two passes over the examples: the first sums h_i, the second measures each
residual against that sum.

    .venv/bin/python benchmarks/noise_scale.py            # writes results/quality/noise_scale.{json,md}
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
sys.path.insert(0, str(ROOT / "benchmarks"))
THREADS = 2


def _sources() -> list[tuple[str, str, Path, Any, int]]:
    """(benchmark, task, card folder, the card's source task, training batch size) for every card."""
    import placement_v2 as P
    import quality as Q

    from layercard import load_task

    out = []
    for name, s in Q.TASKS.items():
        task = load_task(f"{name}:{s.train_split}").subset(Q.TRAIN_EXAMPLES, seed=Q.SEED)
        out.append(("quality", name, Q.RESULTS / "cards" / name, task, Q.BATCH))
    for name, s in P.TASKS.items():
        task = load_task(s.train).subset(P.TRAIN_EXAMPLES, seed=0)
        out.append(("placement_v2", name, P.RESULTS / "cards" / name, task, s.batch_size))
    return out


def noise_scale(loaded: Any, card: Any, task: Any) -> dict[str, float]:
    """B_noise and its parts over ``card``'s probe examples of ``task`` (module docstring)."""
    from layercard import models
    from layercard.tasks import encode_task

    cfg = card.config
    probe = task.subset(int(cfg["examples"]), seed=int(cfg["seed"]))
    if probe.data_hash != card.task["data_hash"]:
        raise SystemExit(f"{card.task['name']}: the probe subset does not match the card's")
    encoded = encode_task(loaded.tokenizer, probe, max_length=int(cfg["max_length"]))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    mods = dict(loaded.model.named_modules())
    weights = [mods[s.name].weight for s in models.units(loaded.model, "all-linear")]
    return example_noise(loaded.model, weights, encoded, pad)


def example_noise(model: Any, weights: list[Any], encoded: list[Any], pad_id: int) -> dict[str, float]:
    """The module docstring's estimates for the gradients of ``weights``, one example of ``encoded`` at a
    time, in two passes; the model's parameters are left as they were."""
    import torch

    from layercard.tasks import batches
    from layercard.tasks.loss import forward_loss

    singles = list(batches(encoded, 1, pad_id))
    counts = [int((b["labels"] != -100).sum()) for b in singles]
    if len(singles) < 2 or min(counts) < 1:
        raise SystemExit("noise scale: needs two or more examples, each with a target token")
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    model.eval()

    def grads(batch: dict[str, Any]) -> list[Any]:
        for w in weights:
            w.grad = None
        loss, _ = forward_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        return [w.grad.detach().clone() for w in weights]

    try:
        total = [torch.zeros_like(w) for w in weights]
        for b in singles:
            for t, g in zip(total, grads(b), strict=True):
                t.add_(g)
        n_sum = sum(counts)
        mean_g = [t / n_sum for t in total]
        g_sq = float(sum((g.double() ** 2).sum() for g in mean_g))
        res_sq = []
        for b, n in zip(singles, counts, strict=True):
            h = grads(b)
            dot = float(sum((a.double() * g.double()).sum() for a, g in zip(h, mean_g, strict=True)))
            hh = float(sum((a.double() ** 2).sum() for a in h))
            res_sq.append(hh - 2 * n * dot + n * n * g_sq)
    finally:
        for w in weights:
            w.grad = None
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    big_n = len(singles)
    n_bar = n_sum / big_n
    v = sum(res_sq) / (big_n - 1)
    g_unbiased = g_sq - v / (big_n * n_bar**2)
    return {
        "examples": big_n,
        "target_tokens_mean": n_bar,
        "mean_grad_sq": g_sq,
        "mean_grad_sq_unbiased": g_unbiased,
        "example_spread": v,
        "b_noise": v / (n_bar**2 * g_unbiased) if g_unbiased > 0 else float("inf"),
        "b_noise_biased": v / (n_bar**2 * g_sq),
    }


def main() -> None:
    """Measure every card not yet in noise_scale.json (a probe set two benchmarks share is measured once),
    then write the JSON and markdown."""
    import torch

    from layercard import load_model
    from layercard.artifacts import read_json, write_json, write_text
    from layercard.card import Card

    torch.set_num_threads(THREADS)
    path = OUT / "noise_scale.json"
    done = {(r["benchmark"], r["task"]): r for r in read_json(path)["rows"]} if path.is_file() else {}
    loaded = None
    rows = []
    for bench, name, folder, task, batch in _sources():
        card = Card.load(folder / "card.json")
        key = (card.task["data_hash"], card.config["max_length"])
        same = [r for r in [*done.values(), *rows] if (r["data_hash"], r["max_length"]) == key]
        if (bench, name) in done:
            r = dict(done[(bench, name)])
        elif same:
            r = {k: v for k, v in same[0].items() if k not in ("benchmark", "task", "batch")}
        else:
            loaded = loaded or load_model("smollm2")
            t0 = time.perf_counter()
            r = noise_scale(loaded, card, task)
            r.update({"wall_s": time.perf_counter() - t0, "data_hash": key[0], "max_length": key[1]})
        r.update({"benchmark": bench, "task": name, "batch": batch})
        rows.append(r)
        print(f"{bench:13s} {name:8s} B_noise {r['b_noise']:.3g} (uncorrected {r['b_noise_biased']:.3g})",
              flush=True)  # fmt: skip
        # after every row, so a stopped run keeps what it measured; the rows stored before and not yet
        # reached stay in the file after those
        seen = {(q["benchmark"], q["task"]) for q in rows}
        write_json(path, _out([*rows, *(q for k, q in done.items() if k not in seen)]))
    out = _out(rows)
    write_json(path, out)
    write_text(OUT / "noise_scale.md", _markdown(out))


def _out(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import platform

    import torch

    return {
        "model": "smollm2",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{THREADS} threads",
        "rows": rows,
    }


def _markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Gradient noise scale per task",
        "",
        f"smollm2, fp32, {out['machine']}; each card's 32 probe examples, every linear unit of every layer "
        "(benchmarks/noise_scale.py). B_noise in examples; uncorrected: with ‖G‖² as measured, not less its "
        "sampling noise. 1 + B_noise/B: how many times the steps an exact gradient would need a batch of B "
        "needs, if each step's progress is cut by its gradient's noise.",
        "",
        "| benchmark | task | target tokens / example | B_noise | uncorrected | train batch B "
        "| 1 + B_noise/B | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['benchmark']} | {r['task']} | {r['target_tokens_mean']:.1f} | {r['b_noise']:.3g} | "
            f"{r['b_noise_biased']:.3g} | {r['batch']} | {1 + r['b_noise'] / r['batch']:.2f} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from usage import no_options

    no_options(__doc__)
    main()
