"""Placement benchmark v2: layercard's recommendation against practitioners' rules and peer selectors, each
fitted to the same budget, on smollm2, measured.

Per task: a calibrated all-linear Layer Card, the base model's test loss, the reference (every linear
module of every layer at rank 8), and for every budget (relative to the reference) every candidate fitted
to it the way its users fit it. A candidate that cannot fit a budget is recorded as such (no run).
Candidates that come out as the same placement share one run. One JSON per run under
RESULTS/runs/<task>/, so the script resumes where it stopped and runs in parts; placement_v2_summary.py
rebuilds summary.json, placement_v2.md and the figures from them.

    .venv/bin/python benchmarks/placement_v2.py run --tasks e2e_nlg,sst2 [--part main|seeds|peers|trim]
    .venv/bin/python benchmarks/placement_v2.py plan --tasks e2e_nlg   # what would run, nothing trained
    .venv/bin/python benchmarks/placement_v2_summary.py

The quality model every plan here uses is layercard's default, the two-task model
(``layercard.plan.quality.TWO_TASK_MODEL``), fitted on e2e_nlg and sst2 (benchmarks/quality.py) and frozen
before this benchmark ran on any other task; :func:`planned` names it, so a re-run lands on the same
placements whatever the default becomes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "placement_v2"


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    name: str
    train: str  # load_task spec of the training data (the card probes it too)
    test: str  # load_task spec of the held-out data
    max_length: int
    batch_size: int
    test_examples: int
    why: str


TASKS: dict[str, TaskSetting] = {
    t.name: t
    for t in (
        TaskSetting(
            "e2e_nlg",
            "e2e_nlg:validation",
            "e2e_nlg:test",
            128,
            4,
            64,
            "128 tokens keep 91% of prompts whole",
        ),
        TaskSetting(
            "sst2",
            "sst2:train",
            "sst2:validation",
            96,
            4,
            96,
            "96 tokens cut 1% of prompts; 2 target tokens per example",
        ),
        TaskSetting(
            "gsm8k",
            "gsm8k:train",
            "gsm8k:test",
            256,
            2,
            48,
            "256 tokens (median 225); batch 2 keeps a step near e2e_nlg's cost",
        ),
        TaskSetting(
            "samsum",
            "samsum:validation",
            "samsum:test",
            192,
            2,
            64,
            "prompts capped at 160 tokens, 192 in all; batch 2",
        ),
        TaskSetting(
            "facts",
            "synthetic:facts:train",
            "synthetic:facts:test",
            96,
            4,
            64,
            "new knowledge; the test split asks the same facts in held-out wordings",
        ),
        TaskSetting(
            "format", "synthetic:format:train", "synthetic:format:test", 96, 4, 64, "a new output format"
        ),
    )
}
FIT_TASKS = ("e2e_nlg", "sst2")  # the tasks the quality model was fitted on; seeds are repeated there
STEPS, LR, TRAIN_EXAMPLES, CARD_EXAMPLES = 36, 2e-3, 1000, 32
SEEDS = (0, 1, 2)
# step_time=0.7x is the GPU profile's; on this CPU nothing fits 0.5x (the forward, the loss and the backward
# through the head already cost about 0.6 of the reference's step), so 0.7x is measured too.
BUDGETS = ("step_time=0.5x", "step_time=0.7x", "params=0.25x", "modules=0.25x")
RULES = ("peft-default", "all-linear", "last-n")  # the practitioners' defaults
CANDIDATES = ("recommend", *RULES, "uniform", "card-stratified")
PEERS = ("eva", "spectrum", "lora-drop", "houlsby", "parallel")  # at params=0.25x only
PEER_BUDGET = "params=0.25x"
REPEATED = ("recommend", *RULES, "reference")
TRIM_TOLERANCE = 0.01  # loss (nats/token) within which a boundary counts as tied with the best
LORA_DROP_WARMUP = 12  # steps of the all-layer warm-up whose LoRA output norms rank the layers


# ---------------------------------------------------------------------------------------------- plans


def _card(loaded: Any, task: Any, s: TaskSetting) -> Any:
    from layercard import CardConfig, measure_card
    from layercard.card import Card, write_card_folder

    folder = RESULTS / "cards" / s.name
    source = folder / "source_data_hash.txt"  # the card's own data hash is its probe subset's
    if (folder / "card.json").is_file() and source.is_file():
        card = Card.load(folder / "card.json")
        if card.model["hash"] == loaded.model_hash and source.read_text().strip() == task.data_hash:
            return card
    cfg = CardConfig(
        roles="all-linear",
        examples=CARD_EXAMPLES,
        max_length=s.max_length,
        batch_size=s.batch_size,
        calibrate=True,
        coupling=False,
        sketch=None,  # exact, as the committed cards were measured
    )
    t0 = time.perf_counter()
    card = measure_card(loaded, task, cfg)
    write_card_folder(card, folder)
    (folder / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    source.write_text(task.data_hash + "\n")
    return card


def _reference(card: Any) -> Any:
    from layercard import PlanConfig, make_plan

    return make_plan(card, PlanConfig(policy="all-linear", rank=8))


def _absolute(card: Any, budget: str) -> str:
    """A relative budget as the absolute one the layer policies take (reference costs from the card)."""
    kind, value = budget.split("=")
    share = float(value.rstrip("x"))
    ref = _reference(card).predicted
    cost = {"params": ref["params"], "modules": ref["modules"], "step_time": ref["step_time_s"]}[kind]
    return f"{kind}={cost * share:.4f}" if kind == "step_time" else f"{kind}={int(cost * share)}"


def _bottleneck(card: Any, kind: str, budget: str) -> Any:
    """Bottleneck adapters on every layer, the widest that fits the parameter budget."""
    from layercard import PlanConfig, make_plan

    cap = int(_absolute(card, budget).split("=")[1])
    for width in range(64, 0, -1):
        plan = make_plan(card, PlanConfig(policy="all", kind=kind, rank=width))
        if plan.predicted["params"] <= cap:
            return plan
    return None


def planned(card: Any, cfg: Any, model: Any = None) -> Any:
    """``make_plan`` as this benchmark's committed runs were planned: searches read ``model``, by default the
    two-task quality model (``TWO_TASK_MODEL``, the default when they were trained), so a re-run lands on
    the same placements."""
    from layercard.config import SEARCH_POLICIES
    from layercard.plan.make import make_plan
    from layercard.plan.quality import TWO_TASK_MODEL
    from layercard.plan.recommend import search_plan
    from layercard.plan.space import at_batch

    if cfg.policy in SEARCH_POLICIES:
        return search_plan(at_batch(card, cfg.batch_size), cfg, model=model or TWO_TASK_MODEL)
    return make_plan(card, cfg)


def plan_for(card: Any, candidate: str, budget: str | None) -> tuple[Any, str | None]:
    """(plan, None) or (None, why it cannot fit) for one candidate under one budget."""
    from layercard import PlanConfig
    from layercard.errors import LayercardError

    try:
        if candidate == "reference":
            return _reference(card), None
        if candidate in ("recommend", *RULES):
            return planned(card, PlanConfig(policy=candidate, budget=budget)), None
        if candidate == "depth-all":  # the recommendation taken among placements over all the depth only
            return planned(card, PlanConfig(policy="recommend", budget=budget, depth="all")), None
        if candidate in ("uniform", "card-stratified"):
            cfg = PlanConfig(policy=candidate, budget=_absolute(card, budget), roles="all-linear", rank=8)
            return planned(card, cfg), None
        if candidate in ("houlsby", "parallel"):
            plan = _bottleneck(card, candidate, budget)
            return (plan, None) if plan is not None else (None, "no width fits")
        if candidate == "eva":  # the all-linear rule's placement; EVA redistributes its ranks in training
            return planned(card, PlanConfig(policy="all-linear", budget=budget)), None
        if candidate == "spectrum":
            return planned(card, PlanConfig(policy="spectrum", budget=budget)), None
    except LayercardError as e:
        return None, str(e)
    raise SystemExit(f"unknown candidate {candidate!r}")


def signature(plan: Any, init: str = "default") -> str:
    """One run per distinct placement: candidates that land on the same units, ranks and kind share it."""
    key = json.dumps([plan.kind, init, sorted((u.name, u.rank) for u in plan.units)])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def predicted_quality(card: Any, plan: Any) -> float | None:
    """The default quality model's fraction for a LoRA plan (bottleneck adapters: none)."""
    from layercard.plan.quality import TWO_TASK_MODEL, features

    if plan.kind != "lora":
        return None
    model = TWO_TASK_MODEL
    return float(model.predict(features(card, {u.key: u.rank for u in plan.units}, score=model.score)))


# ----------------------------------------------------------------------------------------------- runs


def _run_path(task: str, sig: str, seed: int, runs: Path | None = None) -> Path:
    return (runs or RESULTS / "runs") / task / f"{sig}-s{seed}.json"


def _test_loss(loaded: Any, test: Any, s: TaskSetting, adapter: Path | None) -> float:
    from quality import adapter_test_loss  # this folder is on sys.path

    return adapter_test_loss(loaded, test, adapter, s.max_length)


def _train_cfg(s: TaskSetting, seed: int, steps: int = STEPS, **extra: Any) -> Any:
    from layercard.config import TrainConfig

    return TrainConfig(
        steps=steps,
        batch_size=s.batch_size,
        lr=LR,
        max_length=s.max_length,
        train_examples=TRAIN_EXAMPLES,
        eval_examples=0,
        checkpoint_every=0,
        seed=seed,
        **extra,
    )


def train_and_score(
    ctx: dict[str, Any],
    plan: Any,
    seed: int,
    *,
    init: str = "default",
    label: str,
    extra: dict | None = None,
    keep: Path | None = None,
    runs: Path | None = None,
) -> dict[str, Any]:
    """Train ``plan`` with ``seed`` (unless its run is on disk) and return the run record; ``keep``: copy
    the trained adapter there (the trim part sweeps the reference's); ``runs``: another folder of runs
    than this benchmark's own."""
    from layercard.artifacts import machine_info, read_json, write_json
    from layercard.train import train

    s: TaskSetting = ctx["setting"]
    sig = signature(plan, init)
    path = _run_path(s.name, sig, seed, runs)
    if path.is_file() and (keep is None or keep.is_dir()):
        return read_json(path)
    cfg_extra = {"init": init} if init != "default" else {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="placement-v2-") as tmp:
        metrics = train(
            ctx["loaded"], plan, ctx["train"], None, _train_cfg(s, seed, **cfg_extra), tmp, progress=False
        )
        loss = _test_loss(ctx["loaded"], ctx["test"], s, Path(tmp) / "adapter")
        if keep is not None:
            import shutil

            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(Path(tmp) / "adapter", keep)
    record = {
        "task": s.name,
        "signature": sig,
        "seed": seed,
        "label": label,
        "init": init,
        "kind": plan.kind,
        "policy": plan.config.get("policy"),
        "layers": plan.layers,
        "units": [[u.layer, u.role, u.rank] for u in plan.units],
        "params": metrics.get("trainable_params") or plan.predicted["params"],
        "planned_params": plan.predicted["params"],
        "modules": plan.predicted["modules"],
        "predicted_quality": predicted_quality(ctx["card"], plan),
        "test_loss": loss,
        "metrics": metrics,
        "wall_s": round(time.perf_counter() - t0, 1),
        "load_1min": os.getloadavg()[0],
        "threads": __import__("torch").get_num_threads(),
        "machine": machine_info(),
        **(extra or {}),
    }
    if not (loss == loss and abs(loss) != float("inf")):
        raise SystemExit(f"{s.name} {label}: non-finite test loss {loss}; nothing written")
    write_json(path, record)
    print(
        f"{s.name} {label} seed {seed}: test loss {loss:.4f}, {metrics['s_per_step']:.2f} s/step, "
        f"{record['wall_s']:.0f} s",
        flush=True,
    )
    return record


def _base(ctx: dict[str, Any]) -> float:
    from layercard.artifacts import read_json, write_json

    s = ctx["setting"]
    path = RESULTS / "runs" / s.name / "base.json"
    if path.is_file():
        return float(read_json(path)["test_loss"])
    loss = _test_loss(ctx["loaded"], ctx["test"], s, None)
    write_json(path, {"task": s.name, "test_loss": loss, "test_data": ctx["test"].data_hash})
    return loss


def _lora_drop(ctx: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]] | tuple[None, str]:
    """LoRA-drop: a short all-layer warm-up ranks the layers by their LoRA output norm; keep the most
    important layers (every linear module at rank 8) that fit the parameter budget."""
    from layercard.adapters import attached
    from layercard.artifacts import read_json, write_json
    from layercard.train import train
    from layercard.train.importance import layer_importance, select_layers

    s, card = ctx["setting"], ctx["card"]
    ref = _reference(card)
    path = RESULTS / "runs" / s.name / f"lora-drop-importance-s{seed}.json"
    if path.is_file():
        info = read_json(path)
    else:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="placement-v2-") as tmp:
            train(
                ctx["loaded"],
                ref,
                ctx["train"],
                None,
                _train_cfg(s, seed, steps=LORA_DROP_WARMUP),
                tmp,
                progress=False,
            )
            with attached(ctx["loaded"].model, Path(tmp) / "adapter") as net:
                imp = layer_importance(
                    net,
                    ctx["loaded"].tokenizer,
                    ctx["train"],
                    ctx["train"].examples[:16],
                    max_length=s.max_length,
                )
        info = {
            "importance": {str(k): v for k, v in imp.items()},
            "warmup_steps": LORA_DROP_WARMUP,
            "warmup_s": round(time.perf_counter() - t0, 1),
        }
        write_json(path, info)
    imp = {int(k): float(v) for k, v in info["importance"].items()}
    cap = int(_absolute(card, PEER_BUDGET).split("=")[1])
    per_layer = ref.predicted["params"] / len(ref.layers)
    k = max(1, int(cap // per_layer))
    return ref.restricted(select_layers(imp, k), card, policy="lora-drop"), info


def _kept(task: str) -> Path:
    return RESULTS / "adapters" / task / "reference"  # ignored by git: 10 MB per task


def trim_part(ctx: dict[str, Any]) -> None:
    """The boundary sweep on the reference (K chosen on a selection subset disjoint from the test subset:
    the fewest layers whose loss is within TRIM_TOLERANCE of the best), its test loss at every K; then the
    reference trained on layers ≤ K only from the start, against the reference trimmed at K."""
    from layercard import load_task
    from layercard.adapters import attached
    from layercard.artifacts import read_json, write_json
    from layercard.trim.mask import adapted_layers
    from layercard.trim.sweep import choose_boundary, loss_scorer, sweep

    s, card, loaded = ctx["setting"], ctx["card"], ctx["loaded"]
    path = RESULTS / "runs" / s.name / "trim.json"
    if path.is_file():
        info = read_json(path)
    else:
        test_inputs = {e.input for e in ctx["test"].examples}
        pool = [
            e
            for e in load_task(s.test).subset(2 * s.test_examples + 64, seed=1).examples
            if e.input not in test_inputs
        ][: s.test_examples]
        t0 = time.perf_counter()
        with attached(loaded.model, _kept(s.name)) as net:
            ks = sorted({*range(2, card.n_layers, 3), card.n_layers - 1})
            kw = {"batch_size": 16, "max_length": s.max_length}
            select = sweep(net, ks, loss_scorer(loaded.tokenizer, ctx["test"], pool, **kw), progress=False)
            test = sweep(
                net,
                ks,
                loss_scorer(loaded.tokenizer, ctx["test"], ctx["test"].examples, **kw),
                progress=False,
            )
            n_adapted = len(adapted_layers(net))
        k = choose_boundary(select, "loss", higher_is_better=False, tolerance=TRIM_TOLERANCE)
        info = {
            "ks": ks,
            "k": k,
            "tolerance": TRIM_TOLERANCE,
            "selection_examples": len(pool),
            "selection_loss": {r["k"]: r["loss"] for r in select},
            "test_loss": {r["k"]: r["loss"] for r in test},
            "adapted_layers": n_adapted,
            "sweep_s": round(time.perf_counter() - t0, 1),
        }
        write_json(path, info)
    k = int(info["k"])
    if k == card.n_layers - 1:
        # No boundary trims for free; compare at a fixed two-thirds depth so the question still gets data.
        k = min(info["ks"], key=lambda x: abs(x - (2 * card.n_layers) // 3))
    below = _reference(card).restricted(list(range(k + 1)), card, policy="bottom")
    _record_cell(s.name, f"trim@{k}", "train-below-k", signature(below), None)
    r = train_and_score(ctx, below, 0, label=f"trained on layers <= {k}")
    at_k = {int(key): v for key, v in info["test_loss"].items()}[k]
    print(
        f"{s.name} trim: chosen K={info['k']}; at K={k}: reference trimmed {at_k:.4f}, "
        f"trained on layers <= K {r['test_loss']:.4f}",
        flush=True,
    )


def _record_cell(task: str, budget: str | None, candidate: str, sig: str | None, why: str | None) -> None:
    """The (budget, candidate) → run ledger the summary reads (a cell that cannot fit keeps its reason)."""
    from layercard.artifacts import read_json, write_json

    path = RESULTS / "cells" / f"{task}.json"
    cells = read_json(path) if path.is_file() else {}
    cells[f"{budget or 'reference'}|{candidate}"] = {"signature": sig, "why": why}
    write_json(path, cells)


def run_task(loaded: Any, s: TaskSetting, parts: set[str], only: set[str] | None) -> None:
    from layercard import load_task

    train_task = load_task(s.train).subset(TRAIN_EXAMPLES, seed=0)
    test = load_task(s.test).subset(s.test_examples, seed=0)
    card = _card(loaded, train_task, s)
    ctx = {"loaded": loaded, "setting": s, "train": train_task, "test": test, "card": card}
    print(f"{s.name}: base test loss {_base(ctx):.4f}", flush=True)
    want = lambda c: only is None or c in only  # noqa: E731

    def cell(candidate: str, budget: str | None, seeds: tuple[int, ...]) -> None:
        plan, why = plan_for(card, candidate, budget)
        init = "eva" if candidate == "eva" else "default"
        _record_cell(s.name, budget, candidate, None if plan is None else signature(plan, init), why)
        if plan is None:
            print(f"{s.name} {budget} {candidate}: does not fit ({why})", flush=True)
            return
        for seed in seeds:
            train_and_score(ctx, plan, seed, init=init, label=f"{budget or 'reference'} {candidate}")

    if "main" in parts or "trim" in parts:
        _record_cell(s.name, None, "reference", signature(_reference(card)), None)
        train_and_score(ctx, _reference(card), 0, label="reference", keep=_kept(s.name))
    if "main" in parts:
        for budget in BUDGETS:
            for c in CANDIDATES:
                if want(c):
                    cell(c, budget, (0,))
    if "seeds" in parts and s.name in FIT_TASKS:
        cell("reference", None, SEEDS)
        for budget in BUDGETS:
            for c in REPEATED:
                if c != "reference" and want(c):
                    cell(c, budget, SEEDS)
    if "trim" in parts:
        trim_part(ctx)
    if "peers" in parts:
        for c in PEERS:
            if not want(c):
                continue
            if c == "lora-drop":
                plan, info = _lora_drop(ctx, 0)
                _record_cell(s.name, PEER_BUDGET, c, signature(plan), None)
                train_and_score(ctx, plan, 0, label=f"{PEER_BUDGET} lora-drop", extra={"lora_drop": info})
            else:
                cell(c, PEER_BUDGET, (0,))


def plan_only(loaded: Any, s: TaskSetting) -> None:
    """Print each cell's placement and whether its run is on disk (needs the card; trains nothing)."""
    from layercard import load_task

    card = _card(loaded, load_task(s.train).subset(TRAIN_EXAMPLES, seed=0), s)
    for budget in (None, *BUDGETS):
        for c in (
            ("reference",) if budget is None else (*CANDIDATES, *(PEERS if budget == PEER_BUDGET else ()))
        ):
            if c == "lora-drop":
                continue
            plan, why = plan_for(card, c, budget)
            if plan is None:
                print(f"{s.name:8s} {budget!s:15s} {c:16s} does not fit: {why}")
                continue
            sig = signature(plan, "eva" if c == "eva" else "default")
            done = _run_path(s.name, sig, 0).is_file()
            roles = ",".join(sorted({u.role for u in plan.units}))
            ranks = sorted({u.rank for u in plan.units})
            print(
                f"{s.name:8s} {budget!s:15s} {c:16s} {sig} {'done' if done else 'todo'} layers "
                f"{len(plan.layers):2d} from {min(plan.layers):2d} roles {roles} ranks {ranks} "
                f"params {plan.predicted['params']:,} modules {plan.predicted['modules']}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The summary is its own script (placement_v2_summary.py), which reads this one's constants.
    ap.add_argument("what", choices=("run", "plan"))
    ap.add_argument("--tasks", default=",".join(FIT_TASKS), help=f"comma-separated of {', '.join(TASKS)}")
    ap.add_argument("--part", default="main", help="comma-separated of main, seeds, peers, trim")
    ap.add_argument("--only", default=None, help="comma-separated candidates")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args()
    import torch

    from layercard import load_model

    torch.set_num_threads(a.threads)
    print(f"python {platform.python_version()}, {sys.platform}, {a.threads} threads", flush=True)
    loaded = load_model("smollm2")
    for name in a.tasks.split(","):
        if name not in TASKS:
            raise SystemExit(f"--tasks: unknown task {name!r}; valid: {', '.join(TASKS)}")
        if a.what == "plan":
            plan_only(loaded, TASKS[name])
        else:
            run_task(loaded, TASKS[name], set(a.part.split(",")), set(a.only.split(",")) if a.only else None)


if __name__ == "__main__":
    main()
