"""What `train.group_by_length` saves, and whether the plan's step time follows it.

smollm2, the MLP of every layer at rank 2, 20 steps of batch 8 at lr 2e-3 on three tasks whose examples
differ in length: samsum (dialogues, up to 384 tokens), gsm8k (up to 256) and sst2 (up to 128). Each task
gets one calibrated card (8 probe examples at batch 4) and one plan; the plan is trained from two seeds,
with and without grouping, in turn (seed 0 ungrouped first, seed 1 grouped first, so that neither way
always runs second). Recorded per run: padded positions per step, the median step time against the plan's
price at the run's own positions, the tokens trained on, and the teacher-forced loss of 64 test examples.

    .venv/bin/python benchmarks/group_by_length.py run
    .venv/bin/python benchmarks/group_by_length.py summary

Each run is kept under results/group_by_length/runs/ and skipped when present (resumable). Writes
results/group_by_length/group_by_length.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "group_by_length"
# task: (training split, test split, max_length)
TASKS = {
    "samsum": ("samsum:validation", "samsum:test", 384),
    "gsm8k": ("gsm8k:train", "gsm8k:test", 256),
    "sst2": ("sst2:train", "sst2:validation", 128),
}
SEEDS = (0, 1)
STEPS, BATCH, LR, RANK, TEST_EXAMPLES = 20, 8, 2e-3, 2, 64
WAYS = {"off": False, "on": True}


def _path(task: str, seed: int, way: str) -> Path:
    return RESULTS / "runs" / f"{task}-{seed}-{way}.json"


def _order(seed: int) -> list[str]:
    return ["off", "on"] if seed % 2 == 0 else ["on", "off"]


def _plan(loaded: Any, task: Any, max_length: int) -> Any:
    """The MLP of every layer at rank 2, priced by a card calibrated at batch 4."""
    from layercard import CardConfig, PlanConfig, make_plan, measure_card

    card = measure_card(
        loaded, task, CardConfig(roles="mlp", examples=8, max_length=max_length, batch_size=4, calibrate=True)
    )
    return make_plan(card, PlanConfig(policy="all", budget=None, roles="mlp", rank=RANK))


def run() -> None:
    from quality import adapter_test_loss  # this folder is on sys.path

    from layercard.artifacts import machine_info, write_json
    from layercard.config import TrainConfig
    from layercard.models import load_model
    from layercard.tasks import load_task
    from layercard.train import train

    loaded = load_model("smollm2")
    for name, (train_spec, test_spec, max_length) in TASKS.items():
        train_t, test_t = load_task(train_spec), load_task(test_spec).subset(TEST_EXAMPLES)
        base = RESULTS / "runs" / f"{name}-base.json"
        if not base.is_file():
            loss = adapter_test_loss(loaded, test_t, None, max_length)
            write_json(base, {"task": name, "test_loss": loss, "test_data": test_t.data_hash})
        plan = None
        for seed in SEEDS:
            for way in _order(seed):
                path = _path(name, seed, way)
                if path.is_file():
                    continue
                plan = plan or _plan(loaded, train_t, max_length)
                cfg = TrainConfig(
                    steps=STEPS, batch_size=BATCH, lr=LR, max_length=max_length, eval_examples=0,
                    checkpoint_every=0, seed=seed, group_by_length=WAYS[way],
                )  # fmt: skip
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="group-by-length-") as tmp:
                    m = train(loaded, plan, train_t, None, cfg, tmp, progress=False)
                    wall = time.perf_counter() - t0
                    loss = adapter_test_loss(loaded, test_t, Path(tmp) / "adapter", max_length)
                record = {
                    "task": name, "seed": seed, "way": way, "steps": m["steps"],
                    "positions_per_step": m["batch_positions_per_step"],
                    "largest_positions": m["max_batch_positions"], "tokens_seen": m["tokens_seen"],
                    "s_per_step": m["s_per_step"], "s_per_step_spread": m["s_per_step_spread"],
                    "predicted_s_per_step": m["predicted_step_time_scaled_s"],
                    "peak_memory_mib": m["peak_memory_mib"],
                    "predicted_peak_memory_mib": m["predicted_peak_memory_scaled_mib"],
                    "first_train_loss": m["first_train_loss"], "final_train_loss": m["final_train_loss"],
                    "test_loss": loss, "train_wall_s": round(wall, 1), "load_1min": os.getloadavg()[0],
                    "machine": machine_info(),
                }  # fmt: skip
                write_json(path, record)
                print(
                    f"{name} seed {seed} {way}: {m['batch_positions_per_step']:.0f} positions/step, "
                    f"{m['s_per_step']:.3f} s/step, test loss {loss:.4f}",
                    flush=True,
                )


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def summarize(records: list[dict[str, Any]], bases: dict[str, float]) -> dict[str, Any]:
    """Per task: each way's mean positions, step time, price error, wall time and test loss over the
    seeds, and the grouped run's ratios to the ungrouped one of the same seed."""
    out: dict[str, Any] = {}
    for task in TASKS:
        by = {(r["seed"], r["way"]): r for r in records if r["task"] == task}
        seeds = [s for s in SEEDS if (s, "off") in by and (s, "on") in by]
        if not seeds:
            continue
        ways = {}
        for way in WAYS:
            rs = [by[(s, way)] for s in seeds]
            errors = [
                r["s_per_step"] / r["predicted_s_per_step"] - 1 for r in rs if r["predicted_s_per_step"]
            ]
            ways[way] = {
                "positions_per_step": round(_mean([r["positions_per_step"] for r in rs]), 1),
                "s_per_step": round(_mean([r["s_per_step"] for r in rs]), 4),
                "predicted_s_per_step": round(_mean([r["predicted_s_per_step"] for r in rs]), 4)
                if len(errors) == len(rs)
                else None,
                "step_time_errors": [round(e, 4) for e in errors],
                "train_wall_s": round(_mean([r["train_wall_s"] for r in rs]), 1),
                "tokens_per_train_s": round(_mean([r["tokens_seen"] / r["train_wall_s"] for r in rs]), 1),
                "test_losses": [round(r["test_loss"], 4) for r in rs],
                "tokens_seen": [r["tokens_seen"] for r in rs],
            }
        ratio = {
            key: [round(by[(s, "on")][key] / by[(s, "off")][key], 4) for s in seeds]
            for key in ("positions_per_step", "s_per_step", "train_wall_s", "tokens_seen")
        }
        diffs = [by[(s, "on")]["test_loss"] - by[(s, "off")]["test_loss"] for s in seeds]
        out[task] = {
            "seeds": seeds,
            "base_test_loss": round(bases[task], 4) if task in bases else None,
            "ways": ways,
            "on_over_off": ratio,
            "test_loss_on_minus_off": [round(d, 4) for d in diffs],
        }
    return out


def summary() -> dict[str, Any]:
    from layercard.artifacts import machine_text, write_json, write_text

    runs = RESULTS / "runs"
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(runs.glob("*-o*.json"))]
    bases = {}
    for p in sorted(runs.glob("*-base.json")):
        b = json.loads(p.read_text(encoding="utf-8"))
        bases[b["task"]] = b["test_loss"]
    tasks = summarize(records, bases)
    machine = records[0]["machine"] if records else None
    data = {"benchmark": "group_by_length", "machine": machine, "tasks": tasks}
    lines = [
        "# Grouping training examples by length",
        "",
        f"`benchmarks/group_by_length.py`: smollm2, the MLP of every layer at rank {RANK}, {STEPS} steps of "
        f"batch {BATCH} at lr {LR:g}, no validation; each task's plan priced by one card calibrated at "
        f"batch 4; seeds {', '.join(map(str, SEEDS))}, each trained without and with `group_by_length`; "
        f"test loss teacher-forced on {TEST_EXAMPLES} test examples. Means over the seeds. "
        f"{machine_text(machine) if machine else ''}.",
        "",
        "| task (max length) | grouping | padded positions per step | s/step measured | predicted | "
        "measured over predicted | training s | tokens per training s | test loss per seed |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for task, t in tasks.items():
        for way, w in t["ways"].items():
            pred = f"{w['predicted_s_per_step']:.3f}" if w["predicted_s_per_step"] is not None else "—"
            errs = ", ".join(f"{e:+.1%}" for e in w["step_time_errors"]) or "—"
            lines.append(
                f"| {task} ({TASKS[task][2]}) | {way} | {w['positions_per_step']:,.0f} "
                f"| {w['s_per_step']:.3f} "
                f"| {pred} | {errs} | {w['train_wall_s']:.0f} | {w['tokens_per_train_s']:.0f} "
                f"| {', '.join(f'{x:.4f}' for x in w['test_losses'])} |"
            )
    lines += [
        "",
        "| task | positions per step, grouped over ungrouped | s/step | training time | tokens trained on "
        "| test loss, grouped minus ungrouped | base model's test loss |",
        "|---|---|---|---|---|---|---:|",
    ]
    for task, t in tasks.items():
        r = t["on_over_off"]
        lines.append(
            f"| {task} | {', '.join(f'{x:.3f}' for x in r['positions_per_step'])} "
            f"| {', '.join(f'{x:.3f}' for x in r['s_per_step'])} "
            f"| {', '.join(f'{x:.3f}' for x in r['train_wall_s'])} "
            f"| {', '.join(f'{x:.3f}' for x in r['tokens_seen'])} "
            f"| {', '.join(f'{x:+.4f}' for x in t['test_loss_on_minus_off'])} "
            f"| {t['base_test_loss']:.4f} |"
        )
    lines += [
        "",
        "Ratios and differences are per seed, in seed order. Both ways train on the same number of "
        "examples per step and on every example once per epoch; within part of an epoch, as here, a "
        "grouped run draws other examples (its micro-batches are shuffled within windows of "
        "400 examples), so the tokens trained on differ, and its test loss differs by the data order as "
        "a second seed's would. s/step is the median step: a grouped run's steps spread with their "
        "batches' lengths (on samsum from under 4 s to over 15 s), so its training time says more of "
        "what grouping saves. Training seconds include attaching the adapter, the final unmerged "
        "forward and saving; one machine that was not kept otherwise idle.",
        "",
        "![padded positions and step time per task, without and with grouping](group_by_length.png)",
    ]
    write_json(RESULTS / "group_by_length.json", data)
    write_text(RESULTS / "group_by_length.md", "\n".join(lines) + "\n")
    _figure(tasks)
    return data


def _figure(tasks: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tasks:
        return
    names = list(tasks)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in (
        (axes[0], "positions_per_step", "padded positions per step"),
        (axes[1], "s_per_step", "seconds per step (median)"),
    ):
        for i, way in enumerate(WAYS):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(names))]
            ax.bar(xs, [tasks[n]["ways"][way][key] for n in names], width=0.38, label=f"grouping {way}")
        if key == "s_per_step":
            for j, n in enumerate(names):
                for i, way in enumerate(WAYS):
                    pred = tasks[n]["ways"][way]["predicted_s_per_step"]
                    if pred is not None:
                        x = j + (i - 0.5) * 0.38
                        ax.plot([x - 0.17, x + 0.17], [pred, pred], color="black", lw=1.5)
            ax.plot([], [], color="black", lw=1.5, label="predicted")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "group_by_length.png", dpi=120)
    plt.close(fig)


def main() -> None:
    from usage import run_or_summary  # this folder is on sys.path

    run_or_summary(__doc__, run, summary)


if __name__ == "__main__":
    main()
