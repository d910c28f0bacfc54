"""Sketch agreement: how far a sketched card's unit scores move from the exact card's, and what it saves.

Measures two all-linear cards of smollm2 on the same probe set, one exact and one with ``--sketch K``
(only inputs wider than K are projected; on smollm2 with K = 576 that is the MLP down projection's
1536-wide input), and compares every unit's scores: Spearman correlation over all units and over the
projected units alone, and the projected units' median ratio sketched/exact. Writes
results/sketch_agreement.{json,md} (another K: results/sketch_agreement_K.{json,md}).

    .venv/bin/python benchmarks/sketch_agreement.py [--sketch 576] [--examples 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASK = ROOT.parent / "shared" / "data" / "e2e_nlg" / "validation.jsonl"
DEFAULT_K = 576  # smollm2's hidden size: what the default `sketch: auto` resolves to


def _scores(card) -> dict[str, dict[str, float]]:
    energy = {g.key: g.energy for g in card.groups}
    return {
        u.key: {
            "gradnorm_energy": u.grad_norm * energy[u.group] ** 0.5,
            "grad_norm": u.grad_norm,
            "resnorm": u.resnorm,
            "captured@8": u.captured["8"],
            "rate": u.rate,
        }
        for u in card.units
    }


def run(sketch: int, examples: int, threads: int) -> dict:
    import torch
    from scipy.stats import spearmanr

    from layercard import load_model, load_task
    from layercard.artifacts import machine_info
    from layercard.card import CardConfig, compute_card

    if not TASK.is_file():
        raise SystemExit(f"{TASK}: not found (the e2e_nlg data under ../shared/data)")
    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    task = load_task(str(TASK))
    cards, timings = {}, {}
    for name, k in (("exact", None), ("sketch", sketch)):
        cfg = CardConfig(
            roles="all-linear", examples=examples, max_length=128, batch_size=8, calibrate=False, sketch=k
        )
        t = time.perf_counter()
        cards[name] = compute_card(loaded, task, cfg, progress=False)
        timings[name] = {"wall_s": time.perf_counter() - t, **cards[name].timings}
        print(f"{name}: {timings[name]['wall_s']:.1f} s", flush=True)
    ex, sk = _scores(cards["exact"]), _scores(cards["sketch"])
    keys = sorted(ex)
    d_in = {u.key: u.d_in for u in cards["exact"].units}
    projected = [k for k in keys if d_in[k] > sketch]
    agreement = {}
    for score in ex[keys[0]]:
        a, b = [ex[k][score] for k in keys], [sk[k][score] for k in keys]
        pa, pb = [ex[k][score] for k in projected], [sk[k][score] for k in projected]
        agreement[score] = {
            "spearman_all": float(spearmanr(a, b).statistic),
            "spearman_projected": float(spearmanr(pa, pb).statistic) if len(projected) > 1 else None,
            "median_ratio_projected": statistics.median(y / x for x, y in zip(pa, pb, strict=True) if x)
            if projected
            else None,
        }
    return {
        "benchmark": "sketch_agreement",
        "model": "smollm2",
        "task": "e2e_nlg/validation.jsonl",
        "examples": examples,
        "sketch": sketch,
        "units": len(keys),
        "projected_units": len(projected),
        "threads": torch.get_num_threads(),
        "timings": timings,
        "agreement": agreement,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
    }


def stem(sketch: int) -> Path:
    """Where the results of ``--sketch K`` go: the default K's under the plain name, others beside it."""
    return RESULTS / ("sketch_agreement" if sketch == DEFAULT_K else f"sketch_agreement_{sketch}")


def write(out: dict) -> None:
    from layercard.artifacts import write_json, write_text

    write_json(stem(out["sketch"]).with_suffix(".json"), out)
    t = out["timings"]
    lines = [
        "# Sketch agreement",
        "",
        f"{out['model']}, {out['task']}, {out['examples']} probe examples (128 tokens, micro-batch 8), "
        f"all linear roles, {out['threads']} torch threads, {out['date']}. The sketched card projects inputs "
        f"wider than {out['sketch']} to {out['sketch']} dimensions: {out['projected_units']} of "
        f"{out['units']} units.",
        "",
        "| card | wall s | statistics s | weight SNR s |",
        "|---|---:|---:|---:|",
    ]
    for name in ("exact", "sketch"):
        lines.append(
            f"| {name} | {t[name]['wall_s']:.1f} | {t[name].get('stats_s', float('nan')):.1f} | "
            f"{t[name].get('weight_snr_s', float('nan')):.1f} |"
        )
    lines += [
        "",
        "| score | Spearman, all units | Spearman, projected units | projected: median sketched/exact |",
        "|---|---:|---:|---:|",
    ]
    for score, a in out["agreement"].items():
        sp = a["spearman_projected"]
        ratio = a["median_ratio_projected"]
        lines.append(
            f"| {score} | {a['spearman_all']:.4f} | {'—' if sp is None else f'{sp:.4f}'} | "
            f"{'—' if ratio is None else f'{ratio:.3f}'} |"
        )
    lines.append("")
    write_text(stem(out["sketch"]).with_suffix(".md"), "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sketch", type=int, default=DEFAULT_K)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.sketch < 1 or args.examples < 1:
        ap.error("--sketch and --examples must be ≥ 1")
    write(run(args.sketch, args.examples, args.threads))
    print(f"wrote {stem(args.sketch).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
