"""Machine noise: how much this machine's speed moves while nothing else runs.

Times one fixed workload (ten products of two 2048 × 2048 float32 matrices, the threads given) many times
in a row and reports the spread. A timing-based prediction cannot be checked more finely than this
spread: it bounds what any calibrated cost model can be expected to hit on the machine.

    .venv/bin/python benchmarks/machine_noise.py [--repeats 30] [--threads 2]

Writes results/machine_noise.{json,md,png}.
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

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=gen)
    a @ a  # warm-up: the first product pays one-off costs
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        "benchmark": "machine_noise",
        "workload": "10 × (2048×2048 @ 2048×2048), float32",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "times_s": [round(x, 4) for x in times],
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "spread_over_median": (max(times) - min(times)) / med,
        "mean_abs_deviation_from_median": statistics.fmean(abs(x / med - 1) for x in times),
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layercard.artifacts import machine_info, write_json, write_text

    out = {**out, "machine": machine_info()}
    write_json(RESULTS / "machine_noise.json", out)
    m = out["machine"]
    write_text(
        RESULTS / "machine_noise.md",
        "\n".join(
            [
                "# Machine noise",
                "",
                f"{out['workload']}, {out['threads']} torch threads, {out['repeats']} repeats in a row on "
                f"{m.get('cpu_count')} CPUs ({m.get('platform')}), {out['date']}; 1-min load average "
                f"{out['load_1min_before']:.1f} before, {out['load_1min_after']:.1f} after.",
                "",
                f"- median {out['median_s']:.3f} s, fastest {out['min_s']:.3f} s, "
                f"slowest {out['max_s']:.3f} s",
                f"- slowest − fastest = **{100 * out['spread_over_median']:.0f}%** of the median; "
                f"mean absolute deviation from the median {100 * out['mean_abs_deviation_from_median']:.1f}%",
                "",
                "Every repeat does the same arithmetic on the same data, so the spread is the machine's.",
                "",
            ]
        ),
    )
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(out["times_s"]) + 1), out["times_s"], marker="o")
    ax.axhline(out["median_s"], color="grey", lw=1)
    ax.set_xlabel("repeat")
    ax.set_ylabel("seconds")
    ax.set_title("one fixed workload, timed in a row")
    fig.tight_layout()
    fig.savefig(RESULTS / "machine_noise.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.repeats < 2 or args.threads < 1:
        ap.error("--repeats must be ≥ 2 and --threads ≥ 1")
    write(measure(args.repeats, args.threads))
    print(f"wrote {RESULTS / 'machine_noise.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
