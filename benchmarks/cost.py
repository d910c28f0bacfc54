"""Cost model check: predicted against measured step time, peak memory and unmerged forward on smollm2.

For each task, measures one calibrated Layer Card (every linear role) and then trains a fixed set of
placements of different matrices, layers and ranks for a few steps each with `layercard train`'s own
loop, in the same process (``--fresh``: each in a process of its own that loads the card), recording
what train_metrics.json records: measured s/step, peak memory and one unmerged forward after training
next to the plan's predictions rescaled to the run's positions. One JSON per placement under
RESULTS/TASK/runs/, so the script resumes where it stopped; ``report`` rebuilds
cost.json, cost.md and cost_predicted.png from them.

    .venv/bin/python benchmarks/cost.py run [--threads 2] [--tasks e2e_nlg,sst2] [--out FOLDER]
        [--model smollm2] [--device cpu] [--dtype float32] [--steps 6] [--batch 8] [--fresh]
    .venv/bin/python benchmarks/cost.py report [--out FOLDER]

Settings: tasks e2e_nlg and sst2 (validation splits), card on 16 examples (batch 8, 128 tokens) with
the default calibration, training batch 8 of up to 128 tokens, 6 steps per placement, lr 1e-4, seed 0.
The machine should be otherwise idle: step time is shared CPU time. On a GPU the card and the runs use
the device and dtype given; ``--model`` can be a folder from ``random_weights.py`` (smollm2's shapes, or
another configuration's with ``--shapes``, random weights: valid for time and memory, not for quality).
``--dropout P`` trains every placement with LoRA dropout P (the plan's ``dropout``; default 0).
``--checkpointing`` calibrates the card and trains every placement with activation checkpointing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality import (  # one grid-point type and card cache for both benchmarks (this folder is on sys.path)
    Placement,
    cached_card,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cost"
TASKS = {"e2e_nlg": "e2e_nlg:validation", "sst2": "sst2:validation"}
STEPS, BATCH, MAX_LENGTH, SEED = 6, 8, 128, 0
RANDOM_MARK = "random_weights.json"  # written by random_weights.py beside the weights it makes


# Matrices, depth reached by backward and rank all vary; none of these is a calibration placement.
GRID = (
    Placement("qv-all-r8", "q,v", "all", None, 8),
    Placement("attn-all-r4", "attention", "all", None, 4),
    Placement("mlp-all-r2", "mlp", "all", None, 2),
    Placement("lin-all-r16", "all-linear", "all", None, 16),
    Placement("lin-last8-r8", "all-linear", "top", "layers=8", 8),
    Placement("mlp-last4-r32", "mlp", "top", "layers=4", 32),
    Placement("qv-uni8-r8", "q,v", "uniform", "layers=8", 8),
    Placement("lin-mid1-r8", "all-linear", "middle", "layers=1", 8),
    Placement("attn-last16-r16", "attention", "top", "layers=16", 16),
    Placement("lin-last2-r64", "all-linear", "top", "layers=2", 64),
    Placement("mlp-first4-r8", "mlp", "bottom", "layers=4", 8),
    Placement("attn-uni8-r4", "attention", "uniform", "layers=8", 4),
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a cost run is measured on and with; recorded in every run's JSON."""

    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    steps: int = STEPS
    batch: int = BATCH
    random_weights: bool = False  # the model folder came from random_weights.py
    calibrate_rounds: int = 1  # the card's calibration rounds (memory: the median over them)
    shapes: str | None = None  # the shapes file random_weights.py replaced smollm2's configuration with
    dropout: float = 0.0  # LoRA dropout of every placement's plan
    calibrate_dropout: float = 0.0  # LoRA dropout the card's calibration trains with
    checkpointing: bool = False  # activation checkpointing in the card's calibration and every run
    fresh: bool = False  # each placement trained in a process of its own (run --fresh)
    threads: int = 2  # torch threads


def stored_setup(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The settings of Setup a run's JSON at ``path`` records. Runs recorded before Setup existed were
    measured at its defaults then (model to batch); a run recorded before a later field holds none of it and
    is compared on those it holds, but for two: the torch threads, recorded beside the setup, and ``fresh``,
    which every committed folder of runs trained in processes of their own names (twelfth-fresh, ...)."""
    base = ("model", "device", "dtype", "steps", "batch")
    setup = dict(record.get("setup") or {k: getattr(Setup, k) for k in base})
    setup.setdefault("threads", record.get("threads", Setup.threads))
    setup.setdefault("fresh", "fresh" in path.parent.parent.parent.name)
    return setup


def setup_differs(stored: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The settings two setups both hold and differ in."""
    return sorted(k for k in stored.keys() & other.keys() if stored[k] != other[k])


def _card(
    loaded: Any,
    task: Any,
    folder: Path,
    batch: int = BATCH,
    rounds: int = 1,
    dropout: float = 0.0,
    checkpointing: bool = False,
) -> Any:
    from layercard import CardConfig

    cfg = CardConfig(
        roles="all-linear", examples=16, batch_size=batch, max_length=MAX_LENGTH, calibrate=True,
        calibrate_rounds=rounds, calibrate_dropout=dropout, calibrate_checkpointing=checkpointing,
    )  # fmt: skip
    return cached_card(loaded, task, cfg, folder)


def plan_and_settings(card: Any, p: Placement, setup: Setup = Setup()) -> tuple[Any, Any]:
    """The plan of grid point ``p`` and the training settings every cost run shares (allocator.py too)."""
    from layercard import PlanConfig, make_plan
    from layercard.config import TrainConfig

    plan = make_plan(
        card, PlanConfig(policy=p.policy, budget=p.budget, roles=p.roles, rank=p.rank, dropout=setup.dropout)
    )
    cfg = TrainConfig(
        steps=setup.steps, batch_size=setup.batch, lr=1e-4, max_length=MAX_LENGTH, eval_examples=0,
        checkpoint_every=0, seed=SEED, gradient_checkpointing=setup.checkpointing,
    )  # fmt: skip
    return plan, cfg


def _run(loaded: Any, card: Any, task: Any, p: Placement, path: Path, setup: Setup = Setup()) -> None:
    from layercard.artifacts import machine_info, write_json
    from layercard.train import train

    plan, cfg = plan_and_settings(card, p, setup)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cost-") as tmp:
        m = train(loaded, plan, task, None, cfg, tmp, progress=False)
    keys = (
        "s_per_step", "predicted_step_time_s", "predicted_step_time_scaled_s", "batch_tokens_per_step",
        "batch_positions_per_step", "max_batch_positions", "predicted_batch_tokens", "peak_memory_mib",
        "peak_memory_kind",
        "peak_memory_start_mib",
        "predicted_peak_memory_mib", "predicted_peak_memory_scaled_mib", "predicted_training_memory_mib",
        "training_memory_ratio", "trainable_params", "forward_s", "forward_positions", "predicted_forward_s",
        "predicted_forward_scaled_s", "predicted_peak_memory_at_start_mib", "peak_memory_at_start_ratio",
        "s_per_step_spread", "predicted_memory_figure", "s_per_step_data",
    )  # fmt: skip
    write_json(
        path,
        {
            "name": p.name,
            "placement": dataclasses.asdict(p),
            "layers": plan.layers,
            "modules": plan.predicted["modules"],
            "input_width": plan.predicted.get("input_width"),
            "params": plan.predicted["params"],
            **{k: m[k] for k in keys},
            "wall_s": round(time.perf_counter() - t0, 1),
            "load_1min": os.getloadavg()[0],
            "threads": __import__("torch").get_num_threads(),
            "setup": dataclasses.asdict(setup),
            "machine": machine_info(),
        },
    )
    print(
        f"{p.name}: {m['s_per_step']:.2f} s/step (predicted {m['predicted_step_time_scaled_s']:.2f}), "
        f"peak {m['peak_memory_mib']:.0f} MiB (predicted {m['predicted_peak_memory_scaled_mib']:.0f}), "
        f"forward {m['forward_s']:.3f} s (predicted {m['predicted_forward_scaled_s']:.3f})",
        flush=True,
    )


def run(
    threads: int, tasks: list[str], setup: Setup = Setup(), only: Sequence[str] = (), fresh: bool = False
) -> None:
    """Each task's card, then its placements trained in this process after it, or with ``fresh`` each in
    a process of its own that loads the card (a CPU's resident peak moves with what the process did before;
    the card's calibration leaves its heap wide)."""
    import torch

    from layercard import load_model, load_task

    torch.set_num_threads(threads)
    loaded = load_model(setup.model, device=setup.device, dtype=setup.dtype)
    for name in tasks:
        task = load_task(TASKS[name])
        card = _card(
            loaded,
            task.subset(256, seed=SEED),
            RESULTS / name / "card",
            setup.batch,
            setup.calibrate_rounds,
            setup.calibrate_dropout,
            setup.checkpointing,
        )
        for p in GRID:
            path = RESULTS / name / "runs" / f"{p.name}.json"
            if only and p.name not in only:
                continue
            if path.is_file():
                differ = setup_differs(
                    stored_setup(json.loads(path.read_text()), path), dataclasses.asdict(setup)
                )
                if differ:
                    raise SystemExit(
                        f"{path} was measured with another setup ({', '.join(differ)}): give the same "
                        "settings, or another --out"
                    )
                continue  # measured with this setup: kept
            if not fresh:
                _run(loaded, card, task, p, path, setup)
                continue
            cmd = [
                sys.executable, __file__, "run", "--threads", str(threads), "--tasks", name, "--fresh-child",
                "--model", setup.model, "--device", setup.device, "--dtype", setup.dtype,
                "--steps", str(setup.steps), "--batch", str(setup.batch),
                "--calibrate-rounds", str(setup.calibrate_rounds), "--only", p.name, "--out", str(RESULTS),
                "--dropout", str(setup.dropout), "--calibrate-dropout", str(setup.calibrate_dropout),
                *(["--checkpointing"] if setup.checkpointing else []),
            ]  # fmt: skip
            subprocess.run(cmd, check=True)


def _rel(measured: float, predicted: float) -> float:
    return (predicted - measured) / measured


def task_run_folders(results: Path) -> list[Path]:
    """Every task-run folder under ``results`` (a card and its runs), sorted, without those whose runs
    trained at another LoRA dropout than their card's calibration: such a folder measures what that
    mismatch costs (``dropout0.05``), not how well a calibration prices the runs it was made for. Folders
    trained with activation checkpointing (``checkpointing``) are left out too: the rules these folders
    chose were set on steps that keep their activations."""
    out = []
    for card_path in results.glob("**/card/card.json"):
        folder = card_path.parent.parent
        calibrated = (json.loads(card_path.read_text()).get("cost") or {}).get("dropout", 0.0)
        runs = sorted((folder / "runs").glob("*.json"))
        setup = json.loads(runs[0].read_text()).get("setup", {}) if runs else {}
        trained = setup.get("dropout", 0.0) if runs else calibrated
        if abs(trained - calibrated) < 1e-9 and not setup.get("checkpointing"):
            out.append(folder)
    return sorted(out)


def _task_rows(name: str) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """The task's card, its finished runs as written, and one row per run with its errors."""
    from layercard.artifacts import read_json
    from layercard.card import Card

    folder = RESULTS / name
    card = Card.load(folder / "card" / "card.json")
    runs = [
        read_json(folder / "runs" / f"{p.name}.json")
        for p in GRID
        if (folder / "runs" / f"{p.name}.json").is_file()
    ]
    rows = []
    for r in runs:
        added = r["peak_memory_mib"] - r["peak_memory_start_mib"]
        rows.append(
            {
                **_proportional(card.cost or {}, r),
                **_unclipped(card.cost or {}, r),
                **_other_rule(card.cost or {}, r),
                "task": name,
                "name": r["name"],
                "modules": r["modules"],
                "params": r["params"],
                "lowest_layer": min(r["layers"]),
                "s_per_step": r["s_per_step"],
                "predicted_s_per_step": r["predicted_step_time_scaled_s"],
                "step_time_error": _rel(r["s_per_step"], r["predicted_step_time_scaled_s"]),
                "peak_memory_mib": r["peak_memory_mib"],
                "predicted_peak_memory_mib": r["predicted_peak_memory_scaled_mib"],
                "peak_memory_error": _rel(r["peak_memory_mib"], r["predicted_peak_memory_scaled_mib"]),
                "training_memory_mib": added,
                "predicted_training_memory_mib": r["predicted_training_memory_mib"],
                "training_memory_error": _rel(added, r["predicted_training_memory_mib"]),
                **_at_start(r),
                **_forward(r),
                **_data(r),
            }
        )
    return card, runs, rows


def _at_start(r: dict[str, Any]) -> dict[str, Any]:
    """The peak restated from the memory in use when the run began: as training recorded it, or for runs
    recorded before it did, that start plus the memory training was predicted to add (the same sum,
    train.metrics.predictions)."""
    at_start = r.get("predicted_peak_memory_at_start_mib")
    start, added = r.get("peak_memory_start_mib"), r.get("predicted_training_memory_mib")
    if at_start is None and start is not None and added:
        at_start = start + added
    return {"peak_memory_at_start_error": _rel(r["peak_memory_mib"], at_start)} if at_start else {}


def _data(r: dict[str, Any]) -> dict[str, Any]:
    """The share of the measured step its data took, where the run kept it."""
    return {"data_share": r["s_per_step_data"] / r["s_per_step"]} if r.get("s_per_step_data") else {}


def _forward(r: dict[str, Any]) -> dict[str, Any]:
    """The unmerged forward's error where the run timed one: against the plan's forward rescaled to the
    positions it was timed on, and against the forward as planned (the card's positions)."""
    if r.get("forward_s") is None or not r.get("predicted_forward_scaled_s"):
        return {}
    return {
        "forward_positions": r["forward_positions"],
        "forward_s": r["forward_s"],
        "predicted_forward_s": r["predicted_forward_scaled_s"],
        "forward_error": _rel(r["forward_s"], r["predicted_forward_scaled_s"]),
        "unscaled_forward_error": _rel(r["forward_s"], r["predicted_forward_s"]),
    }


def priced(model: Any, r: dict[str, Any]) -> dict[str, Any]:
    """Training's own predictions for run ``r`` from ``model`` (its step time, memory and forward, with the
    shares it carries), rescaled to the run's positions as train_metrics.json records them, memory by the
    figure the run was priced by (``predicted_memory_figure``)."""
    from layercard.plan.predict import calibration_batch
    from layercard.train.metrics import predictions

    layers, modules, params = r["layers"], r["modules"], r["params"]
    rank = (r.get("placement") or {}).get("rank")  # every grid placement has one rank
    width = params / rank if isinstance(rank, int) and rank > 0 else None  # Σ (d_in + d_out)
    planned = calibration_batch(model.to_dict()) | {
        "step_time_s": model.step_time(layers, modules, params, width),
        "memory": model.memory(layers, modules, params, r.get("input_width")),
        "forward_s": model.forward_time(modules),
    }
    return predictions(
        planned, r["s_per_step"], None, r["peak_memory_mib"], r["peak_memory_start_mib"],
        r["batch_positions_per_step"], r["max_batch_positions"], r.get("forward_s"),
        r.get("forward_positions"), first_step=r.get("predicted_memory_figure") == "first_step",
    )  # fmt: skip


def _proportional(cost: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """Where the card measured how much of a step grows with positions: the errors that the earlier rule
    (step time proportional to positions, only the depth term as activations) would have given this run,
    from the card's cost model without its shares and training's own rescaling."""
    from layercard.cost import CostModel

    if cost.get("step_position_share") is None or not cost.get("batch_positions"):
        return {}
    earlier = CostModel.from_dict(cost | {"step_position_share": None, "memory_position_share": None})
    out = priced(earlier, r)
    return {
        "proportional_step_time_error": _rel(r["s_per_step"], out["predicted_step_time_scaled_s"]),
        "proportional_peak_memory_error": _rel(r["peak_memory_mib"], out["predicted_peak_memory_scaled_mib"]),
    }


def _unclipped(cost: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """Where the card's line through its two batches put more than the whole step on the positions (a step
    growing faster than them), which the card clips to all of it: the step-time error this run would have
    had from that share unclipped."""
    from layercard.cost import CostModel, position_share

    b = cost.get("batch_scaling") or {}
    if cost.get("step_position_share") is None or b.get("half_s_per_step") is None:
        return {}
    share = position_share(
        b["s_per_step"], b["half_s_per_step"], b["positions"], b["half_positions"], clip=False
    )
    if share <= 1.0:
        return {}
    out = priced(CostModel.from_dict(cost | {"step_position_share": share}), r)
    return {
        "unclipped_step_share": share,
        "unclipped_step_time_error": _rel(r["s_per_step"], out["predicted_step_time_scaled_s"]),
    }


# A card's calibration rows kept a second memory figure beside the one its model was fitted to: cards
# calibrated with the first step's memory kept each window's whole peak, and the cards after them the other
# way round. (row key by round, the key's row median, batch_scaling's full and half batch, label)
_OTHER_MEMORY = {
    "window_peak_by_round_mib": (
        "window_peak_memory_mib", "window_added_mib", "half_window_added_mib", "each window's whole peak",
    ),
    "first_step_peak_by_round_mib": (
        "first_step_peak_memory_mib", "first_step_added_mib", "half_first_step_added_mib",
        "the first step's peak plus the optimizer state it made",
    ),
}  # fmt: skip


def _other_memory(cost: dict[str, Any]) -> tuple[str, ...] | None:
    rows = cost.get("measured") or []
    for by_round, rest in _OTHER_MEMORY.items():
        if rows and all(by_round in x and x["resident_mib"] is not None for x in rows):
            return (by_round, *rest)
    return None


def _other_rule(cost: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """Where the card kept a second memory figure per calibration placement (``_OTHER_MEMORY``): the
    peak-memory error this run would have had from the card's memory terms refitted to that figure. The
    share of memory that grows with positions is the figure's own where the card kept it for the half
    batch too, else the card's. A run priced by the card's first-step terms is priced again by its window's
    terms instead."""
    import numpy as np

    from layercard.cost import CostModel, refit_memory

    if r.get("predicted_memory_figure") == "first_step":
        # priced by the first step's terms: the other figure is the window's, the card's own terms
        out = priced(CostModel.from_dict(cost), r | {"predicted_memory_figure": "window"})
        return {
            "other_figure": "window",
            "other_predicted_peak_memory_mib": out["predicted_peak_memory_scaled_mib"],
            "other_peak_memory_error": _rel(r["peak_memory_mib"], out["predicted_peak_memory_scaled_mib"]),
        }
    other = _other_memory(cost)
    if other is None:
        return {}
    by_round, key, full, half, _ = other
    rows = [x | {"other": x.get(key, float(np.median(x[by_round])))} for x in cost["measured"]]
    terms = refit_memory(rows, cost["n_layers"], cost["memory_resident_mib"], cost, "other", full, half)
    # the refitted terms alone: a card's own first-step terms would otherwise price a run that took them
    out = priced(CostModel.from_dict(cost | terms | {"memory_first_step": None}), r)
    return {
        "other_figure": key,
        "other_predicted_peak_memory_mib": out["predicted_peak_memory_scaled_mib"],
        "other_peak_memory_error": _rel(r["peak_memory_mib"], out["predicted_peak_memory_scaled_mib"]),
    }


_ERRORS = ("step_time_error", "peak_memory_error", "training_memory_error")
_OTHER = ("other_peak_memory_error",)
_PROPORTIONAL = ("proportional_step_time_error", "proportional_peak_memory_error")
_UNCLIPPED = ("unclipped_step_time_error",)
_FORWARD = ("forward_error", "unscaled_forward_error")
_AT_START = ("peak_memory_at_start_error",)


def _errors(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = _ERRORS + (_PROPORTIONAL if all(_PROPORTIONAL[0] in x for x in rows) else ())
    keys += _FORWARD if all(_FORWARD[0] in x for x in rows) else ()
    keys += _OTHER if all(_OTHER[0] in x for x in rows) else ()
    keys += _UNCLIPPED if all(_UNCLIPPED[0] in x for x in rows) else ()
    keys += _AT_START if all(_AT_START[0] in x for x in rows) else ()
    return {
        "mean_abs_error": {k: statistics.fmean(abs(x[k]) for x in rows) for k in keys},
        "max_abs_error": {k: max(abs(x[k]) for x in rows) for k in keys},
    }


def _shares(cal: dict[str, Any]) -> str:
    b = cal.get("batch_scaling")
    if not b:
        return ""
    return (
        f" Calibrated on {cal['batch_size']} sequences: the all-layer rank-8 step took "
        f"{b['s_per_step']:.3g} s on their {b['positions']:,} padded positions and "
        f"{b['half_s_per_step']:.3g} s on half of them: {_pct(cal['step_position_share'])} of a step grows "
        f"with positions, and {_pct(cal['memory_position_share'])} of the memory training adds."
        + (
            f" The base model's unmerged forward took {b['forward_s']:.3g} s and "
            f"{b['half_forward_s']:.3g} s: {_pct(cal['forward_position_share'])} of it grows with positions."
            if cal.get("forward_position_share") is not None
            else ""
        )
    )


def _other_line(mae: dict[str, float], cost: dict[str, Any], runs: Sequence[dict[str, Any]]) -> list[str]:
    other = _other_memory(cost)
    if _OTHER[0] not in mae or other is None:
        return []
    if all(r.get("other_figure") == "window" for r in runs):
        return [
            "Priced by the card's memory terms fitted to each window's peak, as a run in the card's own "
            f"process is (these runs took the first step's figure; same runs): peak memory "
            f"{_pct(mae[_OTHER[0]])}.",
            "",
        ]
    mixed = (
        " or, for runs priced by those, each window's peak"
        if any(r.get("other_figure") == "window" for r in runs)
        else ""
    )
    return [
        f"Priced with the memory terms refitted to {other[-1]}{mixed} (kept beside the card's own figure; "
        f"same runs): peak memory {_pct(mae[_OTHER[0]])}.",
        "",
    ]


def _unclipped_line(mae: dict[str, float], runs: Sequence[dict[str, Any]]) -> list[str]:
    if _UNCLIPPED[0] not in mae:
        return []
    shares = sorted({round(100 * r["unclipped_step_share"], 1) for r in runs})
    return [
        f"The card's line through its two batches put {' and '.join(f'{s:g}%' for s in shares)} of the step "
        f"on the positions, priced as 100%; left unclipped: step time {_pct(mae[_UNCLIPPED[0]])}.",
        "",
    ]


def _proportional_line(mae: dict[str, float]) -> list[str]:
    if _PROPORTIONAL[0] not in mae:
        return []
    return [
        "Priced by the rule of cards that did not time half a batch (step time proportional to positions, "
        f"only the depth term growing with them): step time {_pct(mae[_PROPORTIONAL[0]])}, peak memory "
        f"{_pct(mae[_PROPORTIONAL[1]])}.",
        "",
    ]


def report() -> dict[str, Any]:
    """cost.json, cost.md and cost_predicted.png from each task's card and finished runs."""
    from layercard.artifacts import write_json, write_text

    tasks: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    machine, threads = None, None
    setups: dict[str, dict[str, Any]] = {}
    for name in TASKS:
        if not (RESULTS / name / "card" / "card.json").is_file():
            continue
        card, runs, rows = _task_rows(name)
        if not rows:
            continue
        machine, threads = runs[0]["machine"], runs[0]["threads"]
        setups |= {
            f"{name}/{r['name']}": stored_setup(r, RESULTS / name / "runs" / f"{r['name']}.json")
            for r in runs
        }
        memory_kind = runs[0]["peak_memory_kind"]
        cost = card.cost or {}
        tasks[name] = {
            "task": TASKS[name],
            "card_calibration": {k: v for k, v in cost.items() if k not in ("formula", "memory_formula")},
            "card_timings": card.timings,
            "runs": rows,
            **_errors(rows),
        }
        all_rows += rows
    if not all_rows:
        raise SystemExit(f"{RESULTS}: no finished runs; run `benchmarks/cost.py run` first")
    setup = agreed_setup(setups, RESULTS)
    out = {
        "benchmark": "cost",
        "model": _model_name(setup),
        "settings": {
            "steps": setup["steps"],
            "batch": setup["batch"],
            "max_length": MAX_LENGTH,
            "seed": SEED,
            "device": setup["device"],
            "dtype": setup["dtype"],
            **(
                {"dropout": setup["dropout"], "calibrate_dropout": setup.get("calibrate_dropout", 0.0)}
                if setup.get("dropout") or setup.get("calibrate_dropout")
                else {}
            ),
            **({"checkpointing": True} if setup.get("checkpointing") else {}),
            **(
                {"calibrate_rounds": setup["calibrate_rounds"]}
                if setup.get("calibrate_rounds", 1) > 1
                else {}
            ),
        },  # fmt: skip
        "peak_memory_kind": memory_kind,
        "machine": machine,
        "threads": threads,
        "tasks": tasks,
        **_errors(all_rows),
    }
    write_json(RESULTS / "cost.json", out)
    write_text(RESULTS / "cost.md", _markdown(out))
    _plot(all_rows, RESULTS / "cost_predicted.png")
    return out


def agreed_setup(setups: dict[str, dict[str, Any]], where: Path) -> dict[str, Any]:
    """The setup of the first run (by name; Setup's defaults for what it does not record), when every run
    agrees with it on the settings both record; otherwise the report ends, naming the settings and runs
    that differ."""
    first_name, first = next(iter(setups.items()))
    odd = {n: setup_differs(first, s) for n, s in setups.items()}
    odd = {n: keys for n, keys in odd.items() if keys}
    if odd:
        keys = sorted({k for ks in odd.values() for k in ks})
        raise SystemExit(
            f"{where}: runs measured with different setups ({', '.join(keys)}): {', '.join(sorted(odd))} "
            f"against {first_name}"
        )
    return dataclasses.asdict(Setup()) | first


def _model_name(setup: dict[str, Any]) -> str:
    """The model a run's setup names: a built-in name or folder, or whose shapes its random weights have."""
    if not setup.get("random_weights"):
        return setup["model"]
    shapes = setup.get("shapes")
    return f"{Path(shapes).stem if shapes else Setup.model} shapes, random weights"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _markdown(out: dict[str, Any]) -> str:
    m, st = out["machine"], out["settings"]
    on_gpu = st.get("device", "cpu").startswith("cuda")
    where = (
        f"one {m.get('cuda_device')}, {st['dtype']}"
        if on_gpu
        else f"{out['threads']} torch threads, {m.get('cpu_count')} CPUs ({m.get('platform')})"
    )
    memory = (
        "Memory is the CUDA allocator's peak during training (tensors only, not the allocator's cache)"
        if on_gpu
        else "Memory is the process's peak resident size during training"
    )
    lines = [
        "# Cost model: predicted against measured step time and peak training memory",
        "",
        f"{out['model']}, {st['steps']} training steps of batch {st['batch']} (up to {st['max_length']} "
        f"tokens) per placement, {where}. "
        f"Each task has its own card (16 probe examples, batch {st['batch']}, "
        + (
            f"calibration in {st['calibrate_rounds']} rounds"
            if st.get("calibrate_rounds", 1) > 1
            else "default calibration"
        )
        + ": 5 short LoRA placements, each timed after an untimed warm-up step); predictions are rescaled to "
        f"each run's positions (batch × padded length) per step. {memory}; "
        "'added' is that peak minus the memory in use when training began.",
        "",
    ]
    if out["model"].endswith("random weights"):
        shaped = out["model"].split(" shapes")[0]
        lines[2:2] = [
            f"The weights are random (the model has {shaped}'s layer shapes, and smollm2's vocabulary and "
            "tokenizer): the figures are valid for time and memory, and say nothing about quality.",
            "",
        ]
    if st.get("checkpointing"):
        lines[-2] += " The card's calibration and every placement train with activation checkpointing."
    if "dropout" in st:
        lines[-2] += (
            f" Every placement trains with LoRA dropout {st['dropout']:g}; the card's calibration trained "
            f"with {st['calibrate_dropout']:g}."
        )
    for t in out["tasks"].values():
        timings = t["card_timings"] or {}
        lines += [
            f"## {t['task']}",
            "",
            f"Card: probe {timings.get('probe_s', float('nan')):.0f} s, calibration "
            f"{timings.get('calibrate_s', float('nan')):.0f} s.{_shares(t['card_calibration'])}",
            "",
            "| placement | modules | params | lowest layer | s/step | predicted | error | peak MiB | "
            "predicted | error | added MiB | predicted | error |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in t["runs"]:
            lines.append(
                f"| {r['name']} | {r['modules']} | {r['params']:,} | {r['lowest_layer']} | "
                f"{r['s_per_step']:.2f} | {r['predicted_s_per_step']:.2f} | "
                f"{100 * r['step_time_error']:+.1f}% | "
                f"{r['peak_memory_mib']:,.0f} | "
                f"{r['predicted_peak_memory_mib']:,.0f} | {100 * r['peak_memory_error']:+.1f}% | "
                f"{r['training_memory_mib']:,.0f} | {r['predicted_training_memory_mib']:,.0f} | "
                f"{100 * r['training_memory_error']:+.1f}% |"
            )
        mae, worst = t["mean_abs_error"], t["max_abs_error"]
        lines += [
            "",
            f"Mean absolute error over {len(t['runs'])} placements: step time {_pct(mae['step_time_error'])} "
            f"(worst {_pct(worst['step_time_error'])}), peak memory {_pct(mae['peak_memory_error'])} (worst "
            f"{_pct(worst['peak_memory_error'])}), memory added by training "
            f"{_pct(mae['training_memory_error'])} (worst {_pct(worst['training_memory_error'])}).",
            "",
            *_at_start_line(mae, worst),
            *_data_line(t["runs"]),
            *_other_line(mae, t["card_calibration"], t["runs"]),
            *_unclipped_line(mae, t["runs"]),
            *_proportional_line(mae),
            *_forward_table(t),
        ]
    mae = out["mean_abs_error"]
    n = sum(len(t["runs"]) for t in out["tasks"].values())
    lines += [
        f"**All {n} runs:** step time {_pct(mae['step_time_error'])}, peak memory "
        f"{_pct(mae['peak_memory_error'])}, memory added by training {_pct(mae['training_memory_error'])} "
        "mean absolute error.",
        "",
        *_at_start_line(mae, out["max_abs_error"]),
        *_other_line(
            mae,
            next(iter(out["tasks"].values()))["card_calibration"],
            [r for t in out["tasks"].values() for r in t["runs"]],
        ),
        *_proportional_line(mae),
        *(
            [
                f"Unmerged forward, all {n} runs: {_pct(mae['forward_error'])} mean absolute error (worst "
                f"{_pct(out['max_abs_error']['forward_error'])}) at the positions it was timed on; "
                f"{_pct(mae['unscaled_forward_error'])} taken at the card's positions, as plans priced it "
                "before the forward had its own share.",
                "",
            ]
            if "forward_error" in mae
            else []
        ),
    ]
    return "\n".join(lines)


def _data_line(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Where every run kept it: how much of a measured step its data took, which the calibration's steps,
    on one batch already on the device, do not time."""
    shares = [r.get("data_share") for r in runs]
    if not shares or None in shares:
        return []
    return [
        f"Building each step's batch and copying it to the device took {100 * min(shares):.3f}%–"
        f"{100 * max(shares):.3f}% of the measured step (median {100 * statistics.median(shares):.3f}%), "
        "a part the calibration's steps do not time.",
        "",
    ]


def _at_start_line(mae: dict[str, float], worst: dict[str, float]) -> list[str]:
    if "peak_memory_at_start_error" not in mae:
        return []
    return [
        "Peak memory restated from each run's start (the memory in use when it began plus the memory "
        f"training was predicted to add): {_pct(mae['peak_memory_at_start_error'])} (worst "
        f"{_pct(worst['peak_memory_at_start_error'])}).",
        "",
    ]


def _forward_table(t: dict[str, Any]) -> list[str]:
    """Predicted against measured unmerged forward, where the runs timed one (each on its first
    micro-batch, after training)."""
    mae, worst = t["mean_abs_error"], t["max_abs_error"]
    if "forward_error" not in mae:
        return []
    lines = [
        "Unmerged forward (one no-grad pass over the run's first micro-batch, the fastest of three after a "
        "warm-up), against the plan's prediction rescaled to its positions and as planned:",
        "",
        "| placement | modules | positions | forward s | predicted | error | as planned: error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in t["runs"]:
        lines.append(
            f"| {r['name']} | {r['modules']} | {r['forward_positions']:,} | {r['forward_s']:.3f} | "
            f"{r['predicted_forward_s']:.3f} | {100 * r['forward_error']:+.1f}% | "
            f"{100 * r['unscaled_forward_error']:+.1f}% |"
        )
    return [
        *lines,
        "",
        f"Mean absolute error {_pct(mae['forward_error'])} (worst {_pct(worst['forward_error'])}); "
        f"as planned {_pct(mae['unscaled_forward_error'])}.",
        "",
    ]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("s_per_step", "predicted_s_per_step", "seconds per step"),
        ("training_memory_mib", "predicted_training_memory_mib", "memory added by training (MiB)"),
    ]
    if all("forward_s" in r for r in rows):
        panels.append(("forward_s", "predicted_forward_s", "unmerged forward (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (m, p, title) in zip(axes, panels, strict=True):
        xs, ys = [r[m] for r in rows], [r[p] for r in rows]
        lo, hi = min(xs + ys) * 0.9, max(xs + ys) * 1.1
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15)
        for task, marker in zip(sorted({r["task"] for r in rows}), "os^v", strict=False):
            sub = [r for r in rows if r["task"] == task]
            ax.scatter([r[m] for r in sub], [r[p] for r in sub], marker=marker, label=task)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"measured {title}")
        ax.set_ylabel(f"predicted {title}")
        ax.set_title(f"{title} (band: ±10%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="card + training runs (resumable), then the report")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    r.add_argument("--model", default=Setup.model, help="built-in name or model folder")
    r.add_argument("--device", default=Setup.device)
    r.add_argument("--dtype", default=Setup.dtype)
    r.add_argument("--steps", type=int, default=Setup.steps, help="training steps per placement")
    r.add_argument("--batch", type=int, default=Setup.batch, help="card and training batch size")
    r.add_argument("--calibrate-rounds", type=int, default=1, help="the card's calibration rounds")
    r.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout of every placement (default 0)")
    r.add_argument(
        "--calibrate-dropout",
        type=float,
        default=None,
        help="LoRA dropout of the card's calibration (default: --dropout)",
    )
    r.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing in the calibration and runs"
    )
    r.add_argument("--only", default="", help="comma-separated grid placements to train (default: all)")
    r.add_argument(
        "--fresh", action="store_true", help="each placement trained in a process of its own, the card loaded"
    )
    r.add_argument("--fresh-child", action="store_true", help=argparse.SUPPRESS)  # the process --fresh starts
    rep = sub.add_parser("report", help="rebuild cost.json, cost.md and the figure from the runs")
    for p in (r, rep):
        p.add_argument("--out", type=Path, default=RESULTS, help="results folder (a repeat run: another one)")
    args = ap.parse_args(argv)
    RESULTS = args.out.resolve()
    if args.cmd == "run":
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            ap.error(f"--tasks: unknown task {unknown[0]!r} (choose from {', '.join(TASKS)})")
        mark = Path(args.model) / RANDOM_MARK
        setup = Setup(
            args.model, args.device, args.dtype, args.steps, args.batch,
            random_weights=mark.is_file(), calibrate_rounds=args.calibrate_rounds,
            shapes=json.loads(mark.read_text()).get("shapes") if mark.is_file() else None,
            dropout=args.dropout,
            calibrate_dropout=args.dropout if args.calibrate_dropout is None else args.calibrate_dropout,
            fresh=args.fresh or args.fresh_child, threads=args.threads, checkpointing=args.checkpointing,
        )  # fmt: skip
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in only if n not in {p.name for p in GRID}]
        if unknown:
            ap.error(
                f"--only: unknown placement {unknown[0]!r} (choose from {', '.join(p.name for p in GRID)})"
            )
        run(args.threads, tasks, setup, only, args.fresh and not args.fresh_child)
    report()
    print(f"wrote {RESULTS / 'cost.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
