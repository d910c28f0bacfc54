"""How the C allocator moves a CPU training run's measured peak memory and step time.

On Linux the CPU peak that training reports is the process's resident high-water mark, so what the C
allocator keeps or hands back is part of it. This trains two of benchmarks/cost.py's sst2 placements
(6 steps of batch 8, its calibrated card's predictions beside them), each round in fresh processes, one
per allocator setting, in turn:

- ``default``: glibc as it starts;
- ``mmap128k``: ``MALLOC_MMAP_THRESHOLD_=131072``, every allocation above 128 KiB mapped on its own and
  handed back when freed (this also stops glibc from raising the threshold as it runs);
- ``trim``: ``malloc_trim(0)`` after every optimizer step (train's step callback), freed heap pages handed
  back between steps.

    .venv/bin/python benchmarks/allocator.py run [--rounds 2] [--threads 2]
    .venv/bin/python benchmarks/allocator.py report

Needs benchmarks/results/cost/sst2/card/card.json (``cost.py run``). Writes RESULTS/allocator.json and .md.
The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "allocator.json"
PLACEMENTS = ("qv-all-r8", "lin-last8-r8")
MODES = ("default", "mmap128k", "trim")


def one(mode: str, threads: int) -> dict[str, Any]:
    """Train every placement of PLACEMENTS in this process under ``mode``; what train_metrics records."""
    import ctypes
    import tempfile

    import torch
    from cost import GRID, TASKS, plan_and_settings
    from cost import RESULTS as COST

    from layercard import load_model, load_task
    from layercard.card import Card
    from layercard.train import train

    torch.set_num_threads(threads)
    callback = None
    if mode == "trim":
        libc = ctypes.CDLL("libc.so.6")

        def callback(step: int, loss: float, model: Any) -> None:
            libc.malloc_trim(0)

    loaded = load_model("smollm2")
    task = load_task(TASKS["sst2"])
    card = Card.load(COST / "sst2" / "card" / "card.json")
    out = {}
    for name in PLACEMENTS:
        p = next(x for x in GRID if x.name == name)
        plan, cfg = plan_and_settings(card, p)
        with tempfile.TemporaryDirectory(prefix="allocator-") as tmp:
            m = train(loaded, plan, task, None, cfg, tmp, progress=False, callback=callback)
        keys = ("s_per_step", "peak_memory_mib", "predicted_peak_memory_scaled_mib", "peak_memory_start_mib")
        out[name] = {k: m[k] for k in keys}
    return out


def run(rounds: int, threads: int) -> None:
    from layercard.artifacts import machine_info, read_json, write_json

    data = read_json(OUT) if OUT.is_file() else {"rounds": [], "machine": machine_info(), "threads": threads}
    for _ in range(rounds):
        row = {}
        for mode in MODES:
            env = {**os.environ}
            if mode == "mmap128k":
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            res = subprocess.run(
                [sys.executable, __file__, "one", mode, "--threads", str(threads)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            row[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            print(mode, row[mode], flush=True)
        data["rounds"].append(row)
        write_json(OUT, data)
    report()


def _table(rounds: list[dict[str, Any]]) -> list[str]:
    import statistics

    lines = [
        "| placement | setting | peak MiB per round | predicted MiB | error per round | s/step per round "
        "| s/step ÷ default's, same round |",
        "|---|---|---|---:|---|---|---|",
    ]
    for name in PLACEMENTS:
        for mode in MODES:
            rs = [r[mode][name] for r in rounds]
            preds = sorted({round(r["predicted_peak_memory_scaled_mib"]) for r in rs})
            ratio = [r[mode][name]["s_per_step"] / r["default"][name]["s_per_step"] for r in rounds]
            peaks = ", ".join(f"{r['peak_memory_mib']:,.0f}" for r in rs)
            errors = ", ".join(
                f"{r['peak_memory_mib'] / r['predicted_peak_memory_scaled_mib'] - 1:+.1%}" for r in rs
            )
            steps = ", ".join(f"{r['s_per_step']:.2f}" for r in rs)
            ratios = ", ".join(f"{x:.2f}" for x in ratio)
            lines.append(
                f"| {name} | {mode} | {peaks} | {', '.join(f'{p:,}' for p in preds)} | {errors} | {steps} | "
                f"{ratios} (median {statistics.median(ratio):.2f}) |"
            )
    return lines


def report() -> None:
    from layercard.artifacts import read_json, write_text

    data = read_json(OUT)
    lines = [
        "# The C allocator and a CPU training run's peak memory and step time",
        "",
        f"smollm2, sst2 (benchmarks/cost.py's settings: 6 steps of batch 8, up to 128 tokens), "
        f"{data['threads']} torch threads, every run in a fresh process, the settings in turn within each "
        f"round ({len(data['rounds'])} rounds). Predicted: the cost benchmark's calibrated card, rescaled "
        "to the run's largest micro-batch; each round's error is against its own prediction.",
        "",
        *_table(data["rounds"]),
    ]
    if data.get("rounds_before_head_change"):
        lines += [
            "",
            "Earlier rounds, before the LM head ran at the target positions only (the card of that time):",
            "",
            *_table(data["rounds_before_head_change"]),
        ]
    lines.append("")
    write_text(RESULTS / "allocator.md", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "one", "report"))
    ap.add_argument("mode", nargs="?", choices=MODES)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.what == "one":
        sys.path.insert(0, str(Path(__file__).parent))
        print(json.dumps(one(a.mode, a.threads)))
    elif a.what == "run":
        run(a.rounds, a.threads)
    else:
        report()


if __name__ == "__main__":
    main()
