"""Does timing an unmerged forward after a training run move the next run's peak memory in the same process?

Every training run times one unmerged forward after its peak is read (train_metrics.json ``forward_s``).
On a CPU the peak is the process's resident high-water mark, which the C allocator's history can move, so
this trains three of benchmarks/cost.py's placements in turn (every linear module of every layer at rank
16, of the last 8 layers at rank 8, the MLP of the last 4 at rank 32) in one fresh process per round, with
the forward timed as usual (``on``) or replaced by nothing (``off``), rounds alternating on, off, off, on.
It reads the e2e_nlg card of results/cost/seventh (cost.py's settings: 6 steps of batch 8, up to 128
tokens, lr 1e-4, seed 0).

    .venv/bin/python benchmarks/forward_order.py run [--threads 2]
    .venv/bin/python benchmarks/forward_order.py report
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cost" / "seventh"
WRITTEN = OUT / "forward_order.md"  # the report that run and report write
RUNS = OUT / "forward_order"
ORDER = ("lin-all-r16", "lin-last8-r8", "mlp-last4-r32")
ROUNDS = ("on", "off", "off", "on")


def one(mode: str, threads: int, path: Path) -> None:
    """One round in this process: the three placements in turn, the forward timed or not."""
    import torch
    from cost import GRID, SEED, TASKS, _card, plan_and_settings

    import layercard.train.loop as loop
    from layercard import load_model, load_task
    from layercard.artifacts import machine_info, write_json
    from layercard.train import train

    torch.set_num_threads(threads)
    if mode == "off":
        loop.forward_seconds = lambda *a, **k: 0.0
    loaded = load_model("smollm2")
    task = load_task(TASKS["e2e_nlg"])
    card = _card(loaded, task.subset(256, seed=SEED), OUT / "e2e_nlg" / "card")
    by_name = {p.name: p for p in GRID}
    rows = []
    for name in ORDER:
        plan, cfg = plan_and_settings(card, by_name[name])
        with tempfile.TemporaryDirectory(prefix="order-") as tmp:
            m = train(loaded, plan, task, None, cfg, tmp, progress=False)
        rows.append(
            {
                "name": name,
                "peak_memory_mib": m["peak_memory_mib"],
                "peak_memory_start_mib": m["peak_memory_start_mib"],
                "predicted_peak_memory_scaled_mib": m["predicted_peak_memory_scaled_mib"],
                "forward_s": m["forward_s"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    write_json(path, {"mode": mode, "threads": threads, "runs": rows, "machine": machine_info()})


def report() -> dict[str, Any]:
    from rounds import round_path

    from layercard.artifacts import read_json, write_json, write_text

    rounds = [read_json(round_path(RUNS, i, m)) for i, m in enumerate(ROUNDS)]
    rows = []
    for name in ORDER:
        added = {
            mode: [
                r["peak_memory_mib"] - r["peak_memory_start_mib"]
                for rd in rounds
                if rd["mode"] == mode
                for r in rd["runs"]
                if r["name"] == name
            ]
            for mode in ("on", "off")
        }
        rows.append(
            {
                "name": name,
                "added_mib": added,
                "mean_on_minus_off_mib": statistics.fmean(added["on"]) - statistics.fmean(added["off"]),
                "spread_mib": {m: max(v) - min(v) for m, v in added.items()},
            }
        )
    out = {"benchmark": "forward_order", "order": list(ORDER), "rounds": list(ROUNDS), "rows": rows,
           "machine": rounds[0]["machine"], "threads": rounds[0]["threads"]}  # fmt: skip
    write_json(OUT / "forward_order.json", out)
    lines = [
        "# An unmerged forward after a run and the next run's peak memory",
        "",
        f"smollm2, e2e_nlg, cost.py's settings and the card of this folder, {out['threads']} torch threads; "
        f"each round one fresh process training {', '.join(ORDER)} in turn, with the forward after each "
        "run timed (`on`) or not (`off`), rounds in the order " + ", ".join(ROUNDS) + ". Memory added by "
        "training: its peak resident size minus the memory in use when it began (MiB).",
        "",
        "| placement (place in the round) | added, on | added, off | mean on − off | spread, on / off |",
        "|---|---|---|---:|---:|",
    ]
    for i, r in enumerate(rows):
        lines.append(
            f"| {r['name']} ({i + 1}) | {', '.join(f'{x:,.0f}' for x in r['added_mib']['on'])} | "
            f"{', '.join(f'{x:,.0f}' for x in r['added_mib']['off'])} | {r['mean_on_minus_off_mib']:+,.0f} | "
            f"{r['spread_mib']['on']:,.0f} / {r['spread_mib']['off']:,.0f} |"
        )
    write_text(WRITTEN, "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rounds import main

    raise SystemExit(main(sys.modules[__name__]))
