"""What the card's top module is worth when trained, on the demo's two tasks.

On every smollm2 card of the committed benchmarks, one module holds most of the default score's squared
weight: layer 11's down projection, 89–96% (`card_draws.md`). The default quality model's capacity term
weighs units by that squared score. This measures what the module adds to a trained placement: the
demo's recommendation (the MLP of every layer at rank 2), the same without layer 11's down projection,
the down projections alone and the gate and up projections alone, all at rank 2 on every layer, beside
the reference (every linear module of every layer at rank 8), each trained with the demo's settings
(24 steps of batch 4, lr 2e-3, up to 96 tokens) at three seeds on the built-in `facts` and `format`
tasks. Scored by the test split's loss (every test example, teacher-forced) and the fraction of the
reference's drop from the base model, each seed's against the same seed's reference.

    .venv/bin/python benchmarks/top_module.py run [--seeds 0,1,2]
    .venv/bin/python benchmarks/top_module.py summary

Each run is kept under results/top_module/runs/ and skipped when present (resumable). Writes
results/top_module/top_module.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "top_module"
TASKS = ("facts", "format")
TOP = "11.down"
# name: (roles, rank, units left out)
PLACEMENTS = {
    "mlp": ("mlp", 2, ()),
    "mlp-without-top": ("mlp", 2, (TOP,)),
    "down": ("down", 2, ()),
    "gate-up": ("gate,up", 2, ()),
    "reference": ("all-linear", 8, ()),
}
# the demo's settings (src/layercard/configs/demo.yaml)
CARD_EXAMPLES, MAX_LENGTH, BATCH, STEPS, LR = 16, 96, 4, 24, 2e-3


def _card(loaded: Any, task: Any) -> Any:
    from layercard import CardConfig, measure_card
    from layercard.card import Card, write_card_folder

    folder = RESULTS / "cards" / task.name
    if (folder / "card.json").is_file():
        return Card.load(folder / "card.json")
    cfg = CardConfig(roles="all-linear", examples=CARD_EXAMPLES, max_length=MAX_LENGTH, calibrate=False)
    card = measure_card(loaded, task, cfg)
    write_card_folder(card, folder)
    return card


def plan_for(card: Any, name: str) -> Any:
    """The placement ``name`` as a plan: every layer's units of its roles at its rank, less the units it
    leaves out (the LoRA config rebuilt from the units kept)."""
    from layercard import PlanConfig, make_plan
    from layercard.plan.ranks import lora_config

    roles, rank, without = PLACEMENTS[name]
    plan = make_plan(card, PlanConfig(policy="all", budget=None, roles=roles, rank=rank))
    if not without:
        return plan
    units = [u for u in plan.units if u.key not in without]
    if len(units) != len(plan.units) - len(without):
        raise SystemExit(f"{name}: the plan holds no unit {without}")
    lc = plan.lora_config or {}
    return dataclasses.replace(
        plan, units=units, lora_config=lora_config(units, None, float(lc.get("lora_dropout", 0.0)))
    )


def predicted(card: Any, name: str) -> tuple[float, float | None]:
    """The default quality model's predicted fraction for placement ``name`` on ``card``, and its
    expected error."""
    from layercard.plan import quality as Q

    model = Q.default_model()
    f = Q.Basis(card).features({u.key: u.rank for u in plan_for(card, name).units})
    return model.predict(f), model.error(f)


def _test_loss(loaded: Any, test: Any, adapter: Path | None) -> float:
    from quality import adapter_test_loss  # this folder is on sys.path

    return adapter_test_loss(loaded, test, adapter, MAX_LENGTH)


def _saved_card(task: str) -> Any:
    from layercard.card import Card

    path = RESULTS / "cards" / task / "card.json"
    return Card.load(path) if path.is_file() else None


def _path(task: str, name: str, seed: int) -> Path:
    return RESULTS / "runs" / f"{task}-{name}-seed{seed}.json"


def run(seeds: list[int]) -> None:
    from layercard.artifacts import machine_info, write_json
    from layercard.config import TrainConfig
    from layercard.models import load_model
    from layercard.tasks import load_task
    from layercard.train import train

    loaded = load_model("smollm2")
    for task_name in TASKS:
        task = load_task(f"synthetic:{task_name}", split="train")
        test = load_task(f"synthetic:{task_name}", split="test")
        card = _card(loaded, task)
        base = RESULTS / "runs" / f"{task_name}-base.json"
        if not base.is_file():
            write_json(base, {"task": task_name, "test_loss": _test_loss(loaded, test, None)})
        for seed in seeds:
            for name in PLACEMENTS:
                path = _path(task_name, name, seed)
                if path.is_file():
                    continue
                plan = plan_for(card, name)
                cfg = TrainConfig(
                    steps=STEPS, batch_size=BATCH, lr=LR, max_length=MAX_LENGTH, eval_examples=0,
                    checkpoint_every=0, seed=seed,
                )  # fmt: skip
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="top-module-") as tmp:
                    metrics = train(loaded, plan, task, None, cfg, tmp, progress=False)
                    loss = _test_loss(loaded, test, Path(tmp) / "adapter")
                params = sum(
                    u.rank * (c.d_in + c.d_out) for u in plan.units for c in card.units if c.key == u.key
                )
                record = {
                    "task": task_name, "name": name, "seed": seed, "modules": len(plan.units),
                    "params": params, "test_loss": loss, "s_per_step": metrics["s_per_step"],
                    "wall_s": round(time.perf_counter() - t0, 1), "load_1min": os.getloadavg()[0],
                    "machine": machine_info(),
                }  # fmt: skip
                write_json(path, record)
                print(f"{task_name} {name} seed {seed}: test loss {loss:.4f}", flush=True)


def summary() -> dict[str, Any]:
    from layercard.artifacts import machine_text, write_json, write_text

    rows: dict[str, dict[str, Any]] = {}
    machine = None
    for task in TASKS:
        base_path = RESULTS / "runs" / f"{task}-base.json"
        if not base_path.is_file():
            continue
        base = json.loads(base_path.read_text(encoding="utf-8"))["test_loss"]
        card = _saved_card(task)
        runs = [
            json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((RESULTS / "runs").glob(f"{task}-*-seed*.json"))
        ]
        ref = {r["seed"]: r["test_loss"] for r in runs if r["name"] == "reference"}
        per: dict[str, Any] = {"base_loss": base, "placements": {}}
        for name in PLACEMENTS:
            mine = sorted(
                (r for r in runs if r["name"] == name and r["seed"] in ref), key=lambda r: r["seed"]
            )
            if not mine:
                continue
            machine = machine or mine[0]["machine"]
            fr = [(base - r["test_loss"]) / (base - ref[r["seed"]]) for r in mine]
            q, err = predicted(card, name) if card is not None else (None, None)
            per["placements"][name] = {
                "predicted": None if q is None else round(q, 4),
                "expected_error": None if err is None else round(err, 4),
                "seeds": [r["seed"] for r in mine],
                "modules": mine[0]["modules"],
                "params": mine[0]["params"],
                "test_loss": [round(r["test_loss"], 4) for r in mine],
                "fraction": [round(f, 4) for f in fr],
                "fraction_mean": round(statistics.fmean(fr), 4),
                "loss_mean": round(statistics.fmean(r["test_loss"] for r in mine), 4),
            }
        rows[task] = per
    data = {"benchmark": "top_module", "machine": machine, "tasks": rows}
    lines = [
        "# What the card's top module is worth when trained",
        "",
        "`benchmarks/top_module.py`: smollm2 on the built-in facts and format tasks with the demo's "
        "settings (24 steps of batch 4, lr 2e-3, up to 96 tokens), three seeds; every placement on every "
        "layer at rank 2, the reference every linear module at rank 8. "
        f"{machine_text(machine) if machine else ''}. Test loss over every test example (teacher-forced); "
        "fraction: the drop from the base model over the same seed's reference's. `mlp-without-top`: the "
        "MLP less layer 11's down projection, the module holding 89–96% of the cards' squared default score.",
        "",
        "| task | placement | modules | params | test loss per seed | mean | fraction per seed | mean "
        "| predicted (default model) |",
        "|---|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for task, per in rows.items():
        for name, p in per["placements"].items():
            lines.append(
                f"| {task} | {name} | {p['modules']} | {p['params']:,} | "
                f"{', '.join(f'{x:.4f}' for x in p['test_loss'])} | {p['loss_mean']:.4f} | "
                f"{', '.join(f'{x:.3f}' for x in p['fraction'])} | {p['fraction_mean']:.3f} | "
                + ("—" if p["predicted"] is None else f"{p['predicted']:.3f} ± {p['expected_error']:.3f}")
                + " |"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    if rows:
        _figure(rows, RESULTS / "top_module.png")
        lines += ["", "![measured against predicted, per placement](top_module.png)"]
    write_json(RESULTS / "top_module.json", data)
    write_text(RESULTS / "top_module.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return data


def _figure(rows: dict[str, Any], path: Path) -> None:
    """Per task, each placement's measured fraction (its seeds and their mean) beside its prediction."""
    from layercard.plotting import new_figure, save_png

    fig, axes = new_figure(1, len(rows), figsize=(4.2 * len(rows), 3.0), squeeze=False)
    for ax, (task, per) in zip(axes[0], rows.items(), strict=True):
        names = list(per["placements"])
        for i, name in enumerate(names):
            pl = per["placements"][name]
            ax.plot([i] * len(pl["fraction"]), pl["fraction"], "o", color="tab:blue", ms=4, alpha=0.6)
            ax.plot([i - 0.25, i + 0.25], [pl["fraction_mean"]] * 2, color="tab:blue", lw=2)
            if pl["predicted"] is not None:
                ax.errorbar(
                    i + 0.3, pl["predicted"], yerr=pl["expected_error"], fmt="s", color="tab:orange", ms=4
                )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}: measured (blue) and predicted (orange)", fontsize=9)
    axes[0][0].set_ylabel("fraction of the reference's drop")
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("run", "summary"))
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    if args.what == "run":
        run([int(s) for s in args.seeds.split(",")])
    summary()


if __name__ == "__main__":
    main()
