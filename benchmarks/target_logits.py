"""What running the LM head only at the loss's positions saves in a LoRA training step.

The loss reads the logits of the positions whose next token is a target; the prompt's and padding's
logits are computed and thrown away unless the head is told which positions to keep (transformers'
``logits_to_keep``, which ``layercard.tasks.forward_loss`` passes). This times one training step of the
reference placement (every linear module of every layer, rank 8) on smollm2 both ways, alternating the
two on the same micro-batches so the machine's drift falls on both, and reads each way's peak memory
in its own fresh process.

    .venv/bin/python benchmarks/target_logits.py run [--rounds 3] [--threads 2]
    .venv/bin/python benchmarks/target_logits.py report

Writes RESULTS/target_logits.json and .md. The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "target_logits.json"
SHARED = ROOT.parent / "shared" / "data"
# (task, micro-batch, max tokens, micro-batches): the cost benchmark's batch for the real tasks, the demo's
# for the built-in one.
CASES = {
    "e2e_nlg": (str(SHARED / "e2e_nlg" / "validation.jsonl"), 8, 128, 3),
    "sst2": (str(SHARED / "sst2" / "validation.jsonl"), 8, 128, 3),
    "facts": ("synthetic:facts", 4, 96, 4),
}
MODES = ("every_position", "target_positions")


def _setup(case: str, threads: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from layercard import load_model, load_task
    from layercard.tasks import batches, encode_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec, bsz, max_len, n = CASES[case]
    loaded = load_model("smollm2")
    task = load_task(spec).subset(bsz * n, seed=0)
    enc = encode_task(loaded.tokenizer, task, max_length=max_len)
    bl = list(batches(enc, bsz, loaded.tokenizer.pad_token_id))
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    return model, bl


def _step(model, bl, mode: str) -> float:
    """Forward and backward over the micro-batches, one way; seconds."""
    from layercard.tasks import forward_loss, loss_sum, target_count

    n = sum(target_count(b["labels"]) for b in bl)
    t = time.perf_counter()
    for b in bl:
        if mode == "every_position":
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            loss, _ = loss_sum(out.logits, b["labels"])
            del out
        else:
            loss, _ = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        (loss / n).backward()
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return dt


def time_case(case: str, rounds: int, threads: int) -> dict[str, Any]:
    """Both ways alternated on the same micro-batches in one process, after a warm-up of each."""
    from layercard.tasks import target_count

    model, bl = _setup(case, threads)
    for mode in MODES:
        _step(model, bl[:1], mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            times[mode].append(_step(model, bl, mode) / len(bl))
    return {
        "positions_per_micro_batch": statistics.mean(int(b["input_ids"].numel()) for b in bl),
        "targets_per_micro_batch": statistics.mean(target_count(b["labels"]) for b in bl),
        "s_per_micro_batch": {m: [round(x, 4) for x in v] for m, v in times.items()},
        "ratio_by_round": [
            round(a / b, 4) for a, b in zip(times["target_positions"], times["every_position"], strict=True)
        ],
    }


def memory_case(case: str, mode: str, threads: int) -> dict[str, Any]:
    """Peak resident memory of one training step, one way, in this (fresh) process."""
    import torch

    from layercard.cost import peak_memory, reset_peak_memory

    model, bl = _setup(case, threads)
    _step(model, bl[:1], mode)  # weights resident and one-off allocations made
    start = reset_peak_memory(torch.device("cpu"))
    _step(model, bl, mode)
    peak, kind = peak_memory(torch.device("cpu"))
    return {"start_mib": round(start or 0.0, 1), "peak_mib": round(peak, 1), "kind": kind}


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(rounds: int, threads: int) -> None:
    from layercard.artifacts import write_json

    data: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {"cases": {}}
    for res in data["cases"].values():
        # Cases stored before each kept its own settings were all measured at the file's rounds and threads.
        res.setdefault("rounds", data.get("rounds"))
        res.setdefault("threads", data.get("threads"))
    data.update(
        {
            "model": "smollm2",
            "placement": "every linear module of every layer, LoRA rank 8",
            "rounds": rounds,
            "threads": threads,
            "machine": f"{platform.machine()} · {os.cpu_count()} cores · {platform.platform()}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
    )
    for case in CASES:
        kept = data["cases"].get(case)
        if kept is not None and (kept["rounds"], kept["threads"]) == (rounds, threads):
            continue  # resumable: a case finished at these settings is kept; at others it is measured again
        print(f"{case}: timing", flush=True)
        res = _child(["_time", case, str(rounds), str(threads)])
        res |= {"rounds": rounds, "threads": threads}
        res["memory"] = {}
        for mode in MODES:
            print(f"{case}: memory, {mode}", flush=True)
            res["memory"][mode] = _child(["_memory", case, mode, str(threads)])
        data["cases"][case] = res
        OUT.parent.mkdir(parents=True, exist_ok=True)
        write_json(OUT, data)
    report()


def report() -> None:
    from layercard.artifacts import write_text

    data = json.loads(OUT.read_text())
    lines = [
        "# The LM head at the loss's positions only",
        "",
        f"{data['model']}, {data['placement']}; one forward+backward per micro-batch, {data['rounds']} "
        f"rounds alternating the two ways on the same micro-batches after a warm-up of each; "
        f"{data['threads']} torch threads; {data['machine']}; {data['date']}. Peak memory: the process's "
        "resident high-water mark over one pass of the micro-batches, each way in its own fresh process.",
        "",
        "| task | micro-batch positions | target tokens | s every position | s target positions | ratio "
        "(by round) | peak MiB every position | peak MiB target positions | peak saved MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for case, r in data["cases"].items():
        t = {m: statistics.median(v) for m, v in r["s_per_micro_batch"].items()}
        mem = r["memory"]
        by_round = ", ".join(f"{x:.2f}" for x in r["ratio_by_round"])
        pe, pt = mem["every_position"]["peak_mib"], mem["target_positions"]["peak_mib"]
        lines.append(
            f"| {case} | {r['positions_per_micro_batch']:.0f} | {r['targets_per_micro_batch']:.0f} | "
            f"{t['every_position']:.2f} | {t['target_positions']:.2f} | "
            f"{statistics.median(r['ratio_by_round']):.2f} ({by_round})"
            f" | {pe:,.0f} | {pt:,.0f} | {pe - pt:,.0f} |"
        )
    lines += [
        "",
        "Ratio: seconds with the head at the target positions over seconds with it at every position, "
        "pair by pair; the median is quoted.",
    ]
    write_text(RESULTS / "target_logits.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_time", "_memory"):
        kind, case, *rest = sys.argv[1:]
        if kind == "_time":
            res = time_case(case, int(rest[0]), int(rest[1]))
        else:
            res = memory_case(case, rest[0], int(rest[1]))
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.command == "run":
        if not SHARED.exists():
            raise SystemExit(f"benchmarks/target_logits.py: no data at {SHARED}")
        run(args.rounds, args.threads)
    else:
        report()


if __name__ == "__main__":
    main()
