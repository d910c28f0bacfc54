"""Does a calibration placement's CPU memory window hold still when it is measured again in one process?

The calibration measures each placement's memory in its own window (freed heap handed back, resident
high-water mark reset), in one process, one placement after another. This measures cost.py's batch-32
card setting (sst2, 16 probe sequences of up to 128 tokens, every linear role, 2 torch threads) the
calibration's way: the top, bottom and middle layers alone and every layer at rank 8, in that order, for
several rounds in one process, each a fresh LoRA wrap with a warm-up step and two more steps. Per window
it keeps what the window's peak added over its start (``window``) and what the first step's peak plus
the optimizer state that step created added (``first step``). Each glibc setting of MODES runs in a
process of its own (resumable: one JSON per setting).

    .venv/bin/python benchmarks/memory_window.py run [--rounds 4] [--threads 2]
    .venv/bin/python benchmarks/memory_window.py report
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cost" / "memory_window"
PLACEMENTS = ("top", "bottom", "middle", "all")
# glibc as it starts, and the settings tried against the creep: a fixed mmap threshold of 32 MiB (the
# most glibc takes; its trim threshold twice that) or of 128 KiB, and one malloc arena
MODES = {
    "default": {},
    "mmap32m": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)},
    "arena1": {"MALLOC_ARENA_MAX": "1"},
    "mmap128k": {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10)},
}


def one(mode: str, rounds: int, threads: int) -> None:
    import torch
    from cost import MAX_LENGTH, SEED, TASKS

    from layercard import load_model, load_task, models
    from layercard.artifacts import machine_info, write_json
    from layercard.cost import _time_steps, touch_weights
    from layercard.tasks import batches
    from layercard.tasks.encode import encode_task

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    task = load_task(TASKS["sst2"]).subset(256, seed=SEED).subset(16, seed=0)  # the card's probe set
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = next(iter(batches(encode_task(tok, task, max_length=MAX_LENGTH), 16, pad)))
    touch_weights(model)
    roles = models.parse_roles("all-linear")
    n = models.num_layers(model)
    layers = {"top": [n - 1], "bottom": [0], "middle": [n // 2], "all": list(range(n))}
    model.train()
    windows = []
    for r in range(rounds):
        for name in PLACEMENTS:
            specs = models.units(model, roles, layers=layers[name])
            t = _time_steps(model, [s.name for s in specs], batch, 2, 8)
            windows.append(
                {
                    "round": r + 1,
                    "placement": name,
                    "resident_mib": round(t.resident_mib, 1),
                    "window_added_mib": round(t.peak_mib - t.resident_mib, 1),
                    "first_step_added_mib": round(t.first_step_mib - t.resident_mib, 1),
                    "s_per_step": [round(x, 3) for x in t.step_s],
                }
            )
            print(windows[-1], flush=True)
    write_json(
        OUT / f"{mode}.json",
        {
            "benchmark": "memory_window",
            "mode": mode,
            "environment": MODES[mode],
            "settings": {"task": "sst2", "rows": int(batch["input_ids"].shape[0]),
                         "positions": int(batch["input_ids"].numel()), "rank": 8, "rounds": rounds},
            "threads": threads,
            "windows": windows,
            "machine": machine_info(),
        },
    )  # fmt: skip


def report() -> None:
    from layercard.artifacts import read_json, write_json, write_text

    done = [read_json(OUT / f"{m}.json") for m in MODES if (OUT / f"{m}.json").is_file()]
    if not done:
        raise SystemExit(f"{OUT}: nothing measured; run `benchmarks/memory_window.py run` first")
    s = done[0]["settings"]
    lines = [
        "# A calibration placement's CPU memory window, measured again in one process",
        "",
        f"smollm2, sst2, {s['rows']} sequences ({s['positions']:,} padded positions), rank 8, "
        f"{done[0]['threads']} torch threads. In one process per glibc setting: the top, bottom and middle "
        f"layers alone and every layer, in that order, {s['rounds']} rounds. Each window is a fresh LoRA "
        "wrap, a warm-up step and two more steps, after the freed heap is handed back and the resident "
        "high-water mark reset. MiB added over the window's start: `window`, the peak over all three steps; "
        "`first`, the peak by the end of the first step plus the optimizer state it made. s/step: the "
        "fastest timed step.",
        "",
    ]
    summary = []
    for d in done:
        ws = d["windows"]
        env = ", ".join(f"`{k}={v}`" for k, v in d["environment"].items()) or "glibc as it starts"
        lines += [
            f"## {d['mode']} ({env})",
            "",
            "| placement | " + " | ".join(f"round {r}: window / first" for r in range(1, s["rounds"] + 1))
            + " | spread: window / first | s/step |",
            "|---|" + "---:|" * (s["rounds"] + 2),
        ]  # fmt: skip
        for name in PLACEMENTS:
            rows = [w for w in ws if w["placement"] == name]
            win = [w["window_added_mib"] for w in rows]
            first = [w["first_step_added_mib"] for w in rows]
            cells = [f"{a:,.0f} / {b:,.0f}" for a, b in zip(win, first, strict=True)]
            spread = f"{max(win) - min(win):,.0f} / {max(first) - min(first):,.0f}"
            step = statistics.median(min(w["s_per_step"]) for w in rows)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {spread} | {step:.2f} |")
        later = [w for w in ws if w["round"] > 1 and w["placement"] in ("bottom", "middle")]
        excess = [w["window_added_mib"] - w["first_step_added_mib"] for w in later]
        lines += [
            "",
            f"After the first round, the bottom and middle layers' windows exceeded their first step by "
            f"{statistics.fmean(excess):,.0f} MiB on average ({min(excess):,.0f} to {max(excess):,.0f}).",
            "",
        ]
        summary.append({"mode": d["mode"], "later_excess_mib": excess})
    write_json(OUT / "summary.json", {"benchmark": "memory_window", "modes": summary})
    write_text(OUT.with_suffix(".md"), "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every setting not yet measured, each in a fresh process, then report")
    o = sub.add_parser("one", help="one setting in this process (run starts it with its environment)")
    o.add_argument("mode", choices=list(MODES))
    for p in (r, o):
        p.add_argument("--rounds", type=int, default=4)
        p.add_argument("--threads", type=int, default=2)
    sub.add_parser("report", help="the report from the JSON written")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        one(args.mode, args.rounds, args.threads)
        return 0
    if args.cmd == "run":
        for mode, env in MODES.items():
            if not (OUT / f"{mode}.json").is_file():
                cmd = [sys.executable, __file__, "one", mode, "--rounds", str(args.rounds)]
                subprocess.run([*cmd, "--threads", str(args.threads)], env=os.environ | env, check=True)
    report()
    print(f"wrote {OUT.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    raise SystemExit(main())
