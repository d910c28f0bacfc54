"""What keeping the best validation's weights and early stopping give on a small training set.

smollm2, the MLP of every layer at rank 2, trained on 32 examples for 80 steps of batch 4 (10 epochs) at
lr 2e-3, up to 128 tokens, validated every 5 steps on 32 held-out examples: a run long enough to overfit.
Each task is trained four ways from the same seed: keeping the last step's weights (`last`, the
default), `keep_best`, `early_stopping: 3`, and `early_stopping: 3` counting only drops of more than
0.05 nats (`min_delta`, `early_stopping_min_delta: 0.05`). Each adapter is then scored by the
teacher-forced loss of 200 test examples disjoint from the validated ones (the same seeded shuffle, past
its first 32), beside the base model's.

    .venv/bin/python benchmarks/best_weights.py run
    .venv/bin/python benchmarks/best_weights.py summary

Each run is kept under results/best_weights/runs/ and skipped when present (resumable). Writes
results/best_weights/best_weights.{json,md,png}.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "best_weights"
# task: (training split, held-out split: the validated examples and, past them, the test examples)
TASKS = {
    "gsm8k": ("gsm8k:train", "gsm8k:test"),
    "e2e_nlg": ("e2e_nlg:validation", "e2e_nlg:test"),
    "sst2": ("sst2:train", "sst2:validation"),
}
MIN_DELTA = 0.05  # nats per token; set before any run with it
VARIANTS = {
    "last": {},
    "keep_best": {"keep_best": True},
    "early_stopping": {"early_stopping": 3},
    "min_delta": {"early_stopping": 3, "early_stopping_min_delta": MIN_DELTA},
}
TRAIN_EXAMPLES, VAL_EXAMPLES, TEST_EXAMPLES = 32, 32, 200
STEPS, EVERY, BATCH, LR, MAX_LENGTH, RANK = 80, 5, 4, 2e-3, 128, 2


def _tasks(name: str) -> tuple[Any, Any, Any]:
    """(training, validation, test) examples of task ``name``: the test examples follow the validated
    ones in the held-out split's seeded shuffle, so the two share none."""
    from layercard.tasks import load_task

    train_spec, held_spec = TASKS[name]
    held = load_task(held_spec)
    train = load_task(train_spec).subset(TRAIN_EXAMPLES)
    return train, held.subset(VAL_EXAMPLES), held.subset(TEST_EXAMPLES, offset=VAL_EXAMPLES)


def _plan(loaded: Any, task: Any) -> Any:
    """The MLP of every layer at rank 2 (a card of 8 examples, no calibration: the placement is fixed)."""
    from layercard import CardConfig, PlanConfig, make_plan, measure_card

    card = measure_card(
        loaded, task, CardConfig(roles="mlp", examples=8, max_length=MAX_LENGTH, calibrate=False)
    )
    return make_plan(card, PlanConfig(policy="all", budget=None, roles="mlp", rank=RANK))


def _test_loss(loaded: Any, test: Any, adapter: Path | None) -> float:
    from quality import adapter_test_loss  # this folder is on sys.path

    return adapter_test_loss(loaded, test, adapter, MAX_LENGTH)


def _path(task: str, variant: str) -> Path:
    return RESULTS / "runs" / f"{task}-{variant}.json"


def run() -> None:
    from layercard.artifacts import machine_info, write_json
    from layercard.config import TrainConfig
    from layercard.models import load_model
    from layercard.train import train

    loaded = load_model("smollm2")
    for name in TASKS:
        train_t, val_t, test_t = _tasks(name)
        base = RESULTS / "runs" / f"{name}-base.json"
        if not base.is_file():
            write_json(base, {"task": name, "test_loss": _test_loss(loaded, test_t, None)})
        plan = None
        for variant, settings in VARIANTS.items():
            path = _path(name, variant)
            if path.is_file():
                continue
            plan = plan or _plan(loaded, train_t)
            cfg = TrainConfig(
                steps=STEPS, batch_size=BATCH, lr=LR, max_length=MAX_LENGTH, eval_examples=VAL_EXAMPLES,
                eval_every=EVERY, checkpoint_every=0, **settings,
            )  # fmt: skip
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="best-weights-") as tmp:
                m = train(loaded, plan, train_t, val_t, cfg, tmp, progress=False)
                wall = time.perf_counter() - t0
                adapter = Path(tmp) / "adapter"
                digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
                loss = _test_loss(loaded, test_t, adapter)
            record = {
                "task": name, "variant": variant, "steps": m["steps"], "planned_steps": m["planned_steps"],
                "stopped_early": m["stopped_early"], "best_step": m["best_step"],
                "best_val_loss": m["best_val_loss"], "val_curve": m["val_curve"],
                "first_train_loss": m["first_train_loss"], "final_train_loss": m["final_train_loss"],
                "test_loss": loss, "adapter_sha256": digest, "train_wall_s": round(wall, 1),
                "s_per_step": m["s_per_step"], "load_1min": os.getloadavg()[0], "machine": machine_info(),
            }  # fmt: skip
            write_json(path, record)
            print(f"{name} {variant}: {m['steps']} steps, test loss {loss:.4f}", flush=True)


def summarize(records: list[dict[str, Any]], bases: dict[str, float]) -> dict[str, Any]:
    """Per task: each variant's steps, the step its adapter is from, its test loss and that loss's drop
    from the base model's, and which adapters are the same file."""
    out: dict[str, Any] = {}
    for task in TASKS:
        mine = {r["variant"]: r for r in records if r["task"] == task}
        if task not in bases or not mine:
            continue
        rows = {}
        for variant in VARIANTS:
            r = mine.get(variant)
            if r is None:
                continue
            rows[variant] = {
                "steps": r["steps"],
                "adapter_step": r["best_step"] if r["best_step"] is not None else r["steps"],
                "val_loss_of_adapter": r["best_val_loss"]
                if r["best_step"] is not None
                else r["val_curve"][-1][1],
                "test_loss": round(r["test_loss"], 4),
                "drop_from_base": round(bases[task] - r["test_loss"], 4),
                "train_wall_s": r["train_wall_s"],
                "same_adapter_as": [
                    v for v, o in mine.items() if v != variant and o["adapter_sha256"] == r["adapter_sha256"]
                ],
            }
        out[task] = {"base_test_loss": round(bases[task], 4), "variants": rows}
    return out


def summary() -> dict[str, Any]:
    from layercard.artifacts import machine_text, write_json, write_text

    runs = RESULTS / "runs"
    records = [
        json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(runs.glob("*.json"))
        if "-base" not in p.name
    ]
    bases = {
        json.loads(p.read_text(encoding="utf-8"))["task"]: json.loads(p.read_text(encoding="utf-8"))[
            "test_loss"
        ]
        for p in sorted(runs.glob("*-base.json"))
    }
    tasks = summarize(records, bases)
    machine = records[0]["machine"] if records else None
    data = {"benchmark": "best_weights", "machine": machine, "tasks": tasks}
    lines = [
        "# Keeping the best validation's weights, and early stopping",
        "",
        f"`benchmarks/best_weights.py`: smollm2, the MLP of every layer at rank {RANK}, {TRAIN_EXAMPLES} "
        f"training examples, {STEPS} steps of batch {BATCH} at lr {LR:g}, up to {MAX_LENGTH} tokens, "
        f"validated every {EVERY} steps on {VAL_EXAMPLES} held-out examples; test loss: teacher-forced, on "
        f"{TEST_EXAMPLES} other held-out examples. One seed. "
        f"{machine_text(machine) if machine else ''}.",
        "",
        "| task | weights | steps trained | adapter from step | its val loss | test loss | drop from base "
        "| training s | same adapter as |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, t in tasks.items():
        lines.append(f"| {task} | base model | | | | {t['base_test_loss']:.4f} | | | |")
        for variant, v in t["variants"].items():
            lines.append(
                f"| {task} | {variant} | {v['steps']} | {v['adapter_step']} | {v['val_loss_of_adapter']:.4f} "
                f"| {v['test_loss']:.4f} | {v['drop_from_base']:+.4f} | {v['train_wall_s']:.0f} "
                f"| {', '.join(v['same_adapter_as']) or '—'} |"
            )
    lines += [
        "",
        f"Training seconds include the validations (one of {VAL_EXAMPLES} examples every {EVERY} steps) "
        "and the final unmerged forward; one run each, on a machine that was not kept otherwise idle. "
        "Early stopping chooses among the validations it has seen: where the validation loss swings "
        "from one validation to the next, a swing can end the run before a later, lower loss, which "
        "`keep_best` over every step still finds. A minimum improvement makes the count start sooner, "
        "never later, so it can only end a run at the same step or before. What the table does not "
        "show: a run whose validation loss still falls at its last step keeps the same weights either "
        "way, and early stopping then trains every step.",
        "",
        "![validation loss per step, the best step and the early stop](best_weights.png)",
    ]
    write_json(RESULTS / "best_weights.json", data)
    write_text(RESULTS / "best_weights.md", "\n".join(lines) + "\n")
    _figure(records)
    return data


def _figure(records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = [r for r in records if r["variant"] == "last"]
    if not last:
        return
    fig, axes = plt.subplots(1, len(last), figsize=(5 * len(last), 3.6), squeeze=False)
    for ax, r in zip(axes[0], last, strict=True):
        steps, losses = zip(*r["val_curve"], strict=True)
        ax.plot(steps, losses, marker="o", ms=3, label="validation loss")
        others = {o["variant"]: o for o in records if o["task"] == r["task"]}
        best = others.get("keep_best")
        if best is not None and best["best_step"] is not None:
            ax.axvline(best["best_step"], color="tab:green", ls="--", label=f"best: step {best['best_step']}")
        for variant, color, name in (
            ("early_stopping", "tab:red", "early stop"),
            ("min_delta", "tab:purple", f"early stop, min delta {MIN_DELTA:g}"),
        ):
            stop = others.get(variant)
            if stop is not None and stop["stopped_early"]:
                ax.axvline(stop["steps"], color=color, ls=":", label=f"{name}: step {stop['steps']}")
        ax.set_title(r["task"])
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats per target token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "best_weights.png", dpi=120)
    plt.close(fig)


def main() -> None:
    from usage import run_or_summary  # this folder is on sys.path

    run_or_summary(__doc__, run, summary)


if __name__ == "__main__":
    main()
