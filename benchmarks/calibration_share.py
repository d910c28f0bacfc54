"""Do the calibration's base-model forwards move the memory share it measures?

The calibration times the base model's unmerged forward on its whole batch and on half of it (the fastest
of two passes each) before any placement, and measures the share of the memory training adds that grows
with positions from the all-layer rank-8 placement on the whole batch and on half of it, each in its own
window. Cards calibrated on 16 sst2 sequences put all of it on the positions (results/cost/
cpu-batch32-forward and its repeat) where the earlier card of the same settings put 87.9% (results/cost/
cpu-batch32). This measures the card of that setting (cost.py's: 16 probe examples, batch 16, up to 128
tokens, every linear role, sst2) in one fresh process per round, with the calibration as it is (``now``)
or with its base-model forward as before the half-batch forward was added (``before``: one pass after a
warm-up on the whole batch, none on the half), rounds before, now, now, before, now, before, before, now
(from the fifth round on, each calibration placement's added memory is kept too).

    .venv/bin/python benchmarks/calibration_share.py run [--threads 2]
    .venv/bin/python benchmarks/calibration_share.py report
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cost" / "cpu-batch32-forward-repeat"
WRITTEN = OUT / "calibration_share.md"  # the report that run and report write
RUNS = OUT / "calibration_share"
ROUNDS = ("before", "now", "now", "before", "now", "before", "before", "now")
KEYS = ("memory_position_share", "step_position_share", "forward_position_share")


def one(mode: str, threads: int, path: Path) -> None:
    """One card in this process, its calibration as it is or as before."""
    import torch
    from cost import MAX_LENGTH, SEED, TASKS

    import layercard.cost as cost
    from layercard import CardConfig, load_model, load_task, measure_card
    from layercard.artifacts import machine_info, write_json

    torch.set_num_threads(threads)
    if mode == "before":
        timed = cost.forward_seconds

        def as_before(model: Any, batch: Any, *, warm: bool, repeats: int = 1) -> float:
            if warm:  # a placement's forward after its steps: unchanged
                return timed(model, batch, warm=True, repeats=repeats)
            if batch["input_ids"].shape[0] < 16:  # the half-batch base forward did not exist
                return 1.0
            return timed(model, batch, warm=False, repeats=1)

        cost.forward_seconds = as_before
    loaded = load_model("smollm2")
    task = load_task(TASKS["sst2"]).subset(256, seed=SEED)
    cfg = CardConfig(roles="all-linear", examples=16, batch_size=16, max_length=MAX_LENGTH, calibrate=True)
    card = measure_card(loaded, task, cfg)
    c = card.cost or {}
    write_json(
        path,
        {
            "mode": mode,
            "threads": threads,
            **{k: c.get(k) for k in KEYS},
            "batch_scaling": c.get("batch_scaling"),
            # what each calibration placement added over its window's start (rounds 5-8 on)
            "added_by_placement_mib": [
                {
                    "layers": [r["layers"][0], r["layers"][-1]],
                    "rank": r["rank"],
                    "added_mib": round(r["peak_memory_mib"] - r["resident_mib"], 1),
                }
                for r in c.get("measured", [])
            ],
            "calibrate_s": card.timings.get("calibrate_s"),
            "machine": machine_info(),
        },
    )
    print(mode, {k: c.get(k) for k in KEYS}, flush=True)


def report() -> dict[str, Any]:
    from rounds import round_path

    from layercard.artifacts import read_json, write_json, write_text

    rounds = [read_json(round_path(RUNS, i, m)) for i, m in enumerate(ROUNDS)]
    out = {"benchmark": "calibration_share", "rounds": rounds}
    write_json(OUT / "calibration_share.json", out)
    lines = [
        "# The calibration's base-model forwards and the memory share it measures",
        "",
        f"smollm2, sst2, cost.py's card for a training batch of 32 (16 probe examples, batch 16, up to 128 "
        f"tokens), {rounds[0]['threads']} torch threads, one fresh process per card. `now`: the calibration "
        "as it is (the base model's forward on the whole batch and on half of it, the fastest of two passes "
        "each); `before`: one pass on the whole batch after a warm-up, none on the half. The all-layer "
        "rank-8 placement's added memory (MiB) on the whole batch and on half of it gives the memory share.",
        "",
        "| round | calibration | added MiB, whole / half | memory share | step share | calibration s | "
        "added MiB by placement: top, bottom, middle layer, all r8, all r32 |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(rounds):
        b = r["batch_scaling"] or {}
        lines.append(
            f"| {i + 1} | {r['mode']} | {b.get('added_mib', float('nan')):,.0f} / "
            f"{b.get('half_added_mib', float('nan')):,.0f} | {100 * r['memory_position_share']:.1f}% | "
            f"{100 * r['step_position_share']:.1f}% | {r['calibrate_s']:.0f} | "
            + (", ".join(f"{x['added_mib']:,.0f}" for x in r.get("added_by_placement_mib", [])) or "not kept")
            + " |"
        )
    means = {
        m: statistics.fmean(r["memory_position_share"] for r in rounds if r["mode"] == m)
        for m in ("before", "now")
    }
    lines += ["", f"Mean memory share: before {100 * means['before']:.1f}%, now {100 * means['now']:.1f}%."]
    write_text(WRITTEN, "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rounds import main

    raise SystemExit(main(sys.modules[__name__]))
