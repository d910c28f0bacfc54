"""Quality data for the planner: measured loss drops of placements across matrices × layers × rank.

For each task (default e2e_nlg and sst2, the tasks used to choose the quality model's form) it measures an
all-linear Layer Card, the base model's test loss, and then trains every placement of a fixed grid on smollm2
with the same steps, lr, batch, tokens and seed, recording the test-loss drop and its fraction of the
reference's drop (every linear unit of every layer at rank 8). One JSON per run under RESULTS/runs/, so the
script resumes where it stopped; the summary is rebuilt from them by ``summary``.

    .venv/bin/python benchmarks/quality.py run [--tasks e2e_nlg,sst2] [--only NAME,...] [--seed N]
    .venv/bin/python benchmarks/quality.py summary
    .venv/bin/python benchmarks/quality.py noise
    .venv/bin/python benchmarks/quality.py seedmean
    .venv/bin/python benchmarks/quality.py curve --only ref
    .venv/bin/python benchmarks/quality.py warp
    .venv/bin/python benchmarks/quality.py saturation
    .venv/bin/python benchmarks/quality.py decide
    .venv/bin/python benchmarks/quality.py band
    .venv/bin/python benchmarks/quality.py run --scheduler linear --seed N --only NAME,...
    .venv/bin/python benchmarks/quality.py noise --scheduler linear
    .venv/bin/python benchmarks/quality.py noisecoverage
    .venv/bin/python benchmarks/quality.py couplingcoverage    # after coupled_cards.py
    .venv/bin/python benchmarks/quality.py targetcoverage      # after target_stats.py
    .venv/bin/python benchmarks/quality.py run --steps 108 --only NAME,... && ... longer --steps 108

``--seed N`` (N > 0) repeats runs with another training seed (data order and LoRA initialisation; the test
examples stay the same) under RESULTS/runs/seed{N}/; ``noise`` then reports how much the measured fraction
itself moves between seeds, the floor under any predictor's error. ``curve`` re-runs placements (seed 0) with
the test loss measured after each of CURVE_STEPS (RESULTS/curves/); ``warp`` scores the form that reads a
placement's fraction off the reference's curve. ``decide`` scores every form by what a planner loses when it
picks by the form (decision regret) as well as by its error, and applies the rule that sets the default.
``run --scheduler linear`` (or cosine) trains with that learning-rate schedule instead of the constant
one, under RESULTS/runs/<schedule>/; ``noise --scheduler`` reports those runs' spread over seeds
(noise_<schedule>.md).

Settings (the CPU placement benchmark's, so the two agree): 36 steps, batch 4, AdamW lr 2e-3 constant,
LoRA alpha = 2·rank, seed 0, training on a seeded subset of 1000 examples, test loss on 64 (e2e_nlg) or
96 (sst2) held-out examples. The card: 32 examples, all linear roles, no coupling, no calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality"


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    name: str
    train_split: str
    test_split: str
    max_length: int
    test_examples: int
    wide_examples: int | None = None  # ``run --wide``'s larger test set; None: the whole split


TASKS = {
    # e2e_nlg's whole test split (630 examples of up to 128 tokens) would triple a run's time; 256 of it.
    "e2e_nlg": TaskSetting("e2e_nlg", "validation", "test", 128, 64, 256),
    "sst2": TaskSetting("sst2", "train", "validation", 96, 96),
}
STEPS, BATCH, LR, SEED, TRAIN_EXAMPLES = 36, 4, 2e-3, 0, 1000
SCHEDULER = "constant"  # the learning-rate schedule of every run but ``run --scheduler``'s


@dataclasses.dataclass(frozen=True)
class Placement:
    """One grid point: which matrices, which layers (a policy and budget of the planner) and which rank."""

    name: str
    roles: str
    policy: str
    budget: str | None
    rank: int


# The reference first: every other run is reported as a fraction of its drop.
GRID = (
    Placement("ref", "all-linear", "all", None, 8),
    Placement("qv-all-r8", "q,v", "all", None, 8),
    Placement("qv-all-r2", "q,v", "all", None, 2),
    Placement("attn-all-r4", "attention", "all", None, 4),
    Placement("mlp-all-r2", "mlp", "all", None, 2),
    Placement("mlp-all-r8", "mlp", "all", None, 8),
    Placement("lin-all-r2", "all-linear", "all", None, 2),
    Placement("lin-last8-r8", "all-linear", "top", "layers=8", 8),
    Placement("lin-uni8-r8", "all-linear", "uniform", "layers=8", 8),
    Placement("qv-uni8-r8", "q,v", "uniform", "layers=8", 8),
    Placement("mlp-last4-r8", "mlp", "top", "layers=4", 8),
    Placement("lin-uni4-r4", "all-linear", "uniform", "layers=4", 4),
    Placement("qv-last8-r8", "q,v", "top", "layers=8", 8),
    Placement("mlp-uni8-r2", "mlp", "uniform", "layers=8", 2),
    Placement("lin-strat8-r8", "all-linear", "card-stratified", "layers=8", 8),
    Placement("lin-mid1-r8", "all-linear", "middle", "layers=1", 8),
)


def _same_config(recorded: dict[str, Any], cfg: Any) -> bool:
    """Whether a card recorded with ``recorded`` was measured with ``cfg``: a setting CardConfig gained
    after the card was made counts as its default, which is how the card was measured."""
    wanted = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return set(recorded) <= set(wanted) and all(
        recorded.get(k, defaults.get(k)) == v for k, v in wanted.items()
    )


def cached_card(loaded: Any, task: Any, cfg: Any, folder: Path) -> Any:
    """The card of ``task`` under ``cfg`` from ``folder`` when one measured so is there, else measured and
    written there (cost.py shares it)."""
    from layercard import measure_card
    from layercard.card import Card, write_card_folder

    if (folder / "card.json").is_file():
        card = Card.load(folder / "card.json")
        # The card's data hash is its probe subset's; its config is what it was measured with.
        probe = task.subset(cfg.examples, seed=cfg.seed)
        same = card.model["hash"] == loaded.model_hash and card.task["data_hash"] == probe.data_hash
        if same and _same_config(card.config, cfg):
            return card
    card = measure_card(loaded, task, cfg)
    write_card_folder(card, folder)
    return card


def _card(loaded: Any, task: Any, setting: TaskSetting) -> Any:
    from layercard import CardConfig

    # weight_snr and exact covariances as the committed cards were measured, so they are reused.
    cfg = CardConfig(
        roles="all-linear",
        examples=32,
        max_length=setting.max_length,
        calibrate=False,
        weight_snr=True,
        sketch=None,
    )
    return cached_card(loaded, task, cfg, RESULTS / "cards" / setting.name)


def adapter_test_loss(loaded: Any, test: Any, adapter: Path | None, max_length: int) -> float:
    """The test loss of every example of ``test`` (teacher-forced), with the adapter at ``adapter``
    attached, or of the base model for None: what the quality-benchmark family scores runs by."""
    import contextlib

    from layercard.adapters import attached
    from layercard.inference import eval_loss

    ctx = attached(loaded.model, adapter) if adapter is not None else contextlib.nullcontext(loaded.model)
    with ctx as net:
        return eval_loss(net, loaded.tokenizer, test, test.examples, batch_size=16, max_length=max_length)


def _test_loss(loaded: Any, test: Any, setting: TaskSetting, adapter: Path | None) -> float:
    return adapter_test_loss(loaded, test, adapter, setting.max_length)


def _base(loaded: Any, test: Any, setting: TaskSetting) -> float:
    from layercard.artifacts import read_json, write_json

    path = RESULTS / "runs" / f"{setting.name}-base.json"
    if path.is_file():
        return float(read_json(path)["test_loss"])
    loss = _test_loss(loaded, test, setting, None)
    write_json(path, {"task": setting.name, "name": "base", "test_loss": loss, "test_data": test.data_hash})
    return loss


def run_seeds(folder: Path) -> list[int]:
    """The training seeds with runs in ``folder``: SEED's at its top level, others' in its seed{N}/."""
    return sorted({SEED} | {int(d.name[4:]) for d in folder.glob("seed*") if d.is_dir()})


def _run_path(
    task: str,
    name: str,
    seed: int = SEED,
    steps: int = STEPS,
    scheduler: str = SCHEDULER,
    wide: bool = False,
    root: Path | None = None,
) -> Path:
    """Where a run is kept: under ``root`` (default RESULTS/runs), by schedule, test set, seed and steps."""
    root = RESULTS / "runs" if root is None else root
    folder = root if scheduler == SCHEDULER else root / scheduler
    folder = folder / "wide" if wide else folder
    folder = folder if seed == SEED else folder / f"seed{seed}"
    if steps != STEPS:
        folder = folder / f"steps{steps}"
    return folder / f"{task}-{name}.json"


def _plan_and_settings(
    card: Any, setting: TaskSetting, p: Placement, seed: int, steps: int = STEPS, scheduler: str = SCHEDULER
) -> tuple[Any, Any]:
    """The plan of grid point ``p`` and the training settings every quality run shares."""
    from layercard import PlanConfig, make_plan

    plan = make_plan(card, PlanConfig(policy=p.policy, budget=p.budget, roles=p.roles, rank=p.rank))
    return plan, train_settings(setting.max_length, seed, steps, scheduler)


def train_settings(max_length: int, seed: int, steps: int = STEPS, scheduler: str = SCHEDULER) -> Any:
    """The training settings every quality run shares."""
    from layercard.config import TrainConfig

    return TrainConfig(
        steps=steps, batch_size=BATCH, lr=LR, max_length=max_length, train_examples=TRAIN_EXAMPLES,
        eval_examples=0, checkpoint_every=0, seed=seed, scheduler=scheduler,
    )  # fmt: skip


def _run(
    loaded: Any,
    card: Any,
    train_task: Any,
    test: Any,
    setting: TaskSetting,
    p: Placement,
    seed: int = SEED,
    steps: int = STEPS,
    scheduler: str = SCHEDULER,
    wide: Any = None,
    root: Path | None = None,
) -> None:
    from layercard.artifacts import machine_info, write_json
    from layercard.train import train

    path = _run_path(setting.name, p.name, seed, steps, scheduler, wide=wide is not None, root=root)
    if path.is_file():
        return
    plan, cfg = _plan_and_settings(card, setting, p, seed, steps, scheduler)
    t0 = time.perf_counter()
    extra = {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        metrics = train(loaded, plan, train_task, None, cfg, tmp, progress=False)
        loss = _test_loss(loaded, test, setting, Path(tmp) / "adapter")
        if wide is not None:
            extra = {"test_loss_wide": _test_loss(loaded, wide, setting, Path(tmp) / "adapter"),
                     "wide_examples": len(wide.examples)}  # fmt: skip
    write_json(
        path,
        {
            "task": setting.name,
            "name": p.name,
            "seed": seed,
            "steps": steps,
            "scheduler": scheduler,
            "placement": dataclasses.asdict(p),
            "layers": plan.layers,
            "units": [[u.layer, u.role, u.rank] for u in plan.units],
            "params": plan.predicted["params"],
            "modules": plan.predicted["modules"],
            "predicted": {k: plan.predicted.get(k) for k in ("score", "gain", "fraction", "captured")},
            "test_loss": loss,
            **extra,
            "s_per_step": metrics["s_per_step"],
            "peak_memory_mib": metrics["peak_memory_mib"],
            "final_train_loss": metrics["final_train_loss"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "load_1min": os.getloadavg()[0],
            "threads": __import__("torch").get_num_threads(),
            "machine": machine_info(),
        },
    )
    print(
        f"{setting.name} {p.name} seed {seed} ({scheduler}): test loss {loss:.4f}, "
        f"{metrics['s_per_step']:.2f} s/step",
        flush=True,
    )


# Steps after which ``curve`` measures the test loss.
CURVE_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 36)


def _curve(loaded: Any, card: Any, train_task: Any, test: Any, setting: TaskSetting, p: Placement) -> None:
    """Like ``_run`` (same settings and seed), with the test loss measured after each of CURVE_STEPS."""
    from layercard.artifacts import write_json
    from layercard.inference import eval_loss
    from layercard.train import train

    path = RESULTS / "curves" / f"{setting.name}-{p.name}.json"
    if path.is_file():
        return
    plan, cfg = _plan_and_settings(card, setting, p, SEED)
    curve: list[list[float]] = []

    def at_step(step: int, loss: float, model: Any) -> None:
        if step in CURVE_STEPS:
            test_loss = eval_loss(
                model, loaded.tokenizer, test, test.examples, batch_size=16, max_length=setting.max_length
            )
            curve.append([step, test_loss])

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        metrics = train(loaded, plan, train_task, None, cfg, tmp, progress=False, callback=at_step)
    write_json(
        path,
        {"task": setting.name, "name": p.name, "seed": SEED, "placement": dataclasses.asdict(p),
         "test_curve": curve, "train_curve": metrics["loss_curve"],
         "wall_s": round(time.perf_counter() - t0, 1)},
    )  # fmt: skip
    print(f"{setting.name} {p.name}: test loss curve {[round(v, 4) for _, v in curve]}", flush=True)


def run(
    tasks: list[str],
    only: set[str] | None,
    threads: int,
    seed: int = SEED,
    curves: bool = False,
    steps: int = STEPS,
    scheduler: str = SCHEDULER,
    wide: bool = False,
) -> None:
    import torch

    from layercard import load_model, load_task

    # On a shared machine more threads than idle cores spin-wait; a fixed count keeps s/step comparable.
    torch.set_num_threads(threads)

    loaded = load_model("smollm2")
    for name in tasks:
        s = TASKS[name]
        train_task = load_task(f"{name}:{s.train_split}")
        test = load_task(f"{name}:{s.test_split}").subset(s.test_examples, seed=SEED)
        card = _card(loaded, train_task.subset(TRAIN_EXAMPLES, seed=SEED), s)
        base = _base(loaded, test, s)
        print(f"{name}: base test loss {base:.4f}", flush=True)
        whole = _wide_base(loaded, name, s) if wide else None
        for p in GRID:
            if only is None or p.name in only:
                if curves:
                    _curve(loaded, card, train_task, test, s, p)
                else:
                    _run(loaded, card, train_task, test, s, p, seed, steps, scheduler, whole)


def _wide_base(loaded: Any, name: str, s: TaskSetting) -> Any:
    """The task's larger test set (its whole test split, or ``wide_examples`` of it), with the base model's
    loss on it written once under RESULTS/runs/wide/."""
    from layercard import load_task
    from layercard.artifacts import write_json

    whole = load_task(f"{name}:{s.test_split}")
    if s.wide_examples is not None:
        whole = whole.subset(s.wide_examples, seed=SEED)
    path = RESULTS / "runs" / "wide" / f"{name}-base.json"
    if not path.is_file():
        loss = _test_loss(loaded, whole, s, None)
        write_json(path, {"task": name, "name": "base", "test_loss": loss, "examples": len(whole.examples)})
    return whole


def rows() -> list[dict[str, Any]]:
    """Every finished run with its drop and its fraction of the reference's drop (same task)."""
    from layercard.artifacts import read_json

    out = []
    for name in TASKS:
        base_path = RESULTS / "runs" / f"{name}-base.json"
        ref_path = RESULTS / "runs" / f"{name}-ref.json"
        if not (base_path.is_file() and ref_path.is_file()):
            continue
        base = read_json(base_path)["test_loss"]
        ref_drop = base - read_json(ref_path)["test_loss"]
        for p in GRID:
            path = RESULTS / "runs" / f"{name}-{p.name}.json"
            if path.is_file():
                r = read_json(path)
                r["drop"] = base - r["test_loss"]
                r["fraction"] = r["drop"] / ref_drop
                out.append(r)
    return out


def summary() -> None:
    for r in rows():
        print(
            f"{r['task']:8s} {r['name']:14s} params {r['params']:>9,} modules {r['modules']:>4} "
            f"loss {r['test_loss']:.4f} fraction {r['fraction']:.3f} s/step {r['s_per_step']:.2f}"
        )


def _features(task: str, r: dict[str, Any]) -> Any:
    from layercard.card import Card
    from layercard.plan.quality import features

    card = Card.load(RESULTS / "cards" / task / "card.json")
    by_pos = {(u.layer, u.role): u.key for u in card.units}
    return features(card, {by_pos[(layer, role)]: rank for layer, role, rank in r["units"]})


def fit() -> dict[str, Any]:
    """Each form fitted on one task and scored on the other; the planner's old set-gain fraction beside them.

    Writes RESULTS/fit.json, RESULTS/quality.md and RESULTS/quality_predicted.png.
    """
    from layercard.artifacts import write_json, write_text
    from layercard.plan.quality import FORMS, fit

    data: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for r in rows():
        if r["name"] != "ref":  # its fraction is 1 by definition
            data.setdefault(r["task"], []).append((r, _features(r["task"], r)))
    tasks = sorted(data)
    out: dict[str, Any] = {"tasks": {t: len(v) for t, v in data.items()}, "forms": {}, "runs": []}
    out["old_set_gain_fraction_mae"] = {
        t: float(
            sum(abs((r["predicted"]["fraction"] or 0.0) - r["fraction"]) for r, _ in data[t]) / len(data[t])
        )
        for t in tasks
    }
    for name, res in _cross_task(data).items():
        pooled_x = [f for t in tasks for _, f in data[t]]
        pooled_y = [r["fraction"] for t in tasks for r, _ in data[t]]
        params, err = fit(FORMS[name], pooled_x, pooled_y)
        res["pooled"] = {"params": list(params), "fit_mae": err}
        out["forms"][name] = res
    scored = {n: r["cross_task_mae"] for n, r in out["forms"].items() if r["cross_task_mae"] is not None}
    if scored:
        best = min(scored, key=scored.get)
        out["chosen"] = {"form": best, "params": out["forms"][best]["pooled"]["params"],
                         "expected_error": scored[best]}  # fmt: skip
    for t in tasks:
        for r, f in data[t]:
            other = next((o for o in tasks if o != t), t)  # the prediction of the fit on the other task
            pred = {
                name: FORMS[name].fn(f, out["forms"][name][f"fit_on_{other}"]["params"]) for name in FORMS
            }
            out["runs"].append(
                {"task": t, "name": r["name"], "measured": r["fraction"], "old": r["predicted"]["fraction"],
                 "predicted_by_other_task_fit": pred, "params_share": f.params, "coverage": f.coverage}
            )  # fmt: skip
    write_json(RESULTS / "fit.json", out)
    write_text(RESULTS / "quality.md", _markdown(out))
    _plot(out)
    return out


def _cross_task(
    data: dict[str, list[tuple[dict[str, Any], Any]]], *, regret: bool = False, forms: Any = None
) -> dict[str, dict[str, Any]]:
    """Per form (``forms``, default the card-only FORMS): fitted on each task's (run, features) pairs, scored
    on every other task's (held out); with ``regret``, by its decision regret there too (budgets in
    parameter share)."""
    from layercard.plan.quality import FORMS, decision_regret, fit, mean_abs_error

    tasks = sorted(data)
    out: dict[str, dict[str, Any]] = {}
    for name, form in (FORMS if forms is None else forms).items():
        res: dict[str, Any] = {"description": form.description}
        for fit_task in tasks:
            xs, ys = [f for _, f in data[fit_task]], [r["fraction"] for r, _ in data[fit_task]]
            params, err = fit(form, xs, ys)
            others = [t for t in tasks if t != fit_task]
            held = {
                t: mean_abs_error(form, params, [f for _, f in data[t]], [r["fraction"] for r, _ in data[t]])
                for t in others
            }
            res[f"fit_on_{fit_task}"] = {"params": list(params), "fit_mae": err, "held_out_mae": held}
            if regret:
                scored = {
                    t: decision_regret(
                        [form.fn(f, params) for _, f in data[t]],
                        [r["fraction"] for r, _ in data[t]],
                        [f.params for _, f in data[t]],
                    )
                    for t in others
                }
                res[f"fit_on_{fit_task}"] |= {
                    "held_out_regret": {t: v[0] for t, v in scored.items()},
                    "regret_by_budget": {t: v[1] for t, v in scored.items()},
                }
        cross = [v for t in tasks for v in res[f"fit_on_{t}"]["held_out_mae"].values()]
        res["cross_task_mae"] = sum(cross) / len(cross) if cross else None
        if regret:
            cross = [v for t in tasks for v in res[f"fit_on_{t}"]["held_out_regret"].values()]
            res["cross_task_regret"] = sum(cross) / len(cross) if cross else None
        out[name] = res
    return out


def _only(by_task: dict[str, float]) -> float:
    """The one held-out value of a fit on one of two tasks."""
    return next(iter(by_task.values()))


def _markdown(out: dict[str, Any]) -> str:
    tasks = sorted(out["tasks"])
    lines = [
        "# Quality model: predicted against measured fraction of the reference's loss drop",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g}, seed {SEED}; reference: every linear module of "
        "every layer at rank 8. Runs: " + ", ".join(f"{t} {n}" for t, n in out["tasks"].items()) + ".",
        "Each form is fitted on one task and scored on the other (held out). `old` is the planner's set-gain "
        "fraction before the quality model.",
        "",
        "| form | " + " | ".join(f"fit on {t}: fit MAE / held-out MAE" for t in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for name, res in out["forms"].items():
        cells = []
        for t in tasks:
            f = res[f"fit_on_{t}"]
            held = next(iter(f["held_out_mae"].values()), float("nan"))
            cells.append(
                f"{f['fit_mae']:.3f} / {held:.3f} (params {', '.join(f'{x:g}' for x in f['params'])})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    old = ", ".join(f"{t} {v:.3f}" for t, v in out["old_set_gain_fraction_mae"].items())
    lines += ["", f"Old set-gain fraction, mean absolute error: {old}.", ""]
    lines += [
        "| form | cross-task MAE (mean of both directions) | pooled fit: params / MAE |",
        "|---|---:|---:|",
    ]
    for name, res in out["forms"].items():
        cross = res["cross_task_mae"]
        pooled = res["pooled"]
        lines.append(
            f"| {name} | {'—' if cross is None else f'{cross:.3f}'} | "
            f"{', '.join(f'{x:g}' for x in pooled['params'])} / {pooled['fit_mae']:.3f} |"
        )
    if "chosen" in out:
        c = out["chosen"]
        lines += [
            "",
            f"Least cross-task error: **{c['form']}**, parameters from the pooled fit "
            f"{', '.join(f'{x:g}' for x in c['params'])}; error {c['expected_error']:.3f}. The default is "
            "chosen from these forms by the placements they pick as well: decision.md (`decide`).",
        ]
    lines += ["", "## Runs", ""]
    forms = list(out["forms"])
    lines += [
        "| task | run | measured | old | " + " | ".join(forms) + " |",
        "|---|---|---:|---:|" + "---:|" * len(forms),
    ]
    for r in out["runs"]:
        preds = " | ".join(f"{r['predicted_by_other_task_fit'][f]:.3f}" for f in forms)
        lines.append(f"| {r['task']} | {r['name']} | {r['measured']:.3f} | {r['old'] or 0:.3f} | {preds} |")
    return "\n".join(lines) + "\n"


def _plot(out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = list(out["forms"])
    fig, axes = plt.subplots(1, len(forms) + 1, figsize=(4 * (len(forms) + 1), 4), sharey=True)
    for ax, title in zip(axes, ["old set gain", *forms], strict=True):
        for task, marker in zip(sorted(out["tasks"]), ("o", "s"), strict=False):
            rs = [r for r in out["runs"] if r["task"] == task]
            xs = [
                (r["old"] or 0.0) if title == "old set gain" else r["predicted_by_other_task_fit"][title]
                for r in rs
            ]
            ax.scatter(xs, [r["measured"] for r in rs], marker=marker, label=task)
        ax.plot([0, 1.15], [0, 1.15], color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted (fit on the other task)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("measured fraction of the reference's drop")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_predicted.png", dpi=100)
    plt.close(fig)


def seed_gaps(fractions: list[float]) -> list[float]:
    """Each seed's fraction against the mean of the same placement's other seeds: what even a predictor
    that had seen those runs would miss by, scored against one run."""
    import statistics

    return [abs(v - statistics.fmean(fractions[:i] + fractions[i + 1 :])) for i, v in enumerate(fractions)]


def _seed_spread(
    task: str, base: float, losses: dict[tuple[str, int], float]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Per GRID placement run at two or more seeds (``losses``: test loss by name and seed), its fraction at
    each seed against the same seed's reference, their mean, mean absolute deviation and range (for the
    reference, its drop per seed instead); and over the placements, the mean deviation and the mean gap of
    one run to its other seeds' mean (None without two placements' seeds)."""
    import statistics

    ref = {sd: base - v for (n, sd), v in losses.items() if n == "ref"}
    rows: list[dict[str, Any]] = []
    devs: list[float] = []
    loo: list[float] = []
    by_name = seed_fractions(base, losses)
    for pl in GRID:
        fr = {sd: 1.0 for sd in ref} if pl.name == "ref" else by_name.get(pl.name, {})
        if len(fr) < 2:
            continue
        mean = statistics.fmean(fr.values())
        mad = statistics.fmean(abs(v - mean) for v in fr.values())
        row = {
            "task": task,
            "name": pl.name,
            "fractions": {str(k): v for k, v in fr.items()},
            "mean": mean,
            "mean_abs_dev": mad,
            "range": max(fr.values()) - min(fr.values()),
        }
        if pl.name == "ref":  # its fraction is 1 at every seed: report its drop instead
            drops = list(ref.values())
            row |= {"drops": {str(k): v for k, v in sorted(ref.items())},
                    "drop_rel_range": (max(drops) - min(drops)) / statistics.fmean(drops)}  # fmt: skip
        else:
            devs.append(mad)
            loo.extend(seed_gaps(list(fr.values())))
        rows.append(row)
    if not devs:
        return rows, None
    spread = {
        "placements": len(devs),
        "mean_abs_dev": statistics.fmean(devs),
        "one_run_vs_other_seeds_mean": statistics.fmean(loo),
    }
    return rows, spread


def noise(scheduler: str = SCHEDULER) -> dict[str, Any]:
    """How far the measured fraction moves when only the training seed changes.

    For every placement run at two or more seeds: its fraction at each seed (against the same seed's
    reference) and the mean absolute deviation of those fractions from their mean. Writes RESULTS/noise.json
    and RESULTS/noise.md; for the runs of another learning-rate schedule (``run --scheduler``),
    RESULTS/noise_<schedule>.json and .md.
    """

    from layercard.artifacts import read_json, write_json, write_text

    folder = RESULTS / "runs" if scheduler == SCHEDULER else RESULTS / "runs" / scheduler
    seeds = run_seeds(folder)
    out: dict[str, Any] = {"scheduler": scheduler, "seeds": seeds, "runs": [], "tasks": {}}
    for task in TASKS:
        base_path = RESULTS / "runs" / f"{task}-base.json"
        if not base_path.is_file():
            continue
        base = read_json(base_path)["test_loss"]
        losses = {
            (pl.name, sd): read_json(p)["test_loss"]
            for pl in GRID
            for sd in seeds
            if (p := _run_path(task, pl.name, sd, scheduler=scheduler)).is_file()
        }
        rows, spread = _seed_spread(task, base, losses)
        out["runs"].extend(rows)
        if spread:
            out["tasks"][task] = spread
    stem = "noise" if scheduler == SCHEDULER else f"noise_{scheduler}"
    write_json(RESULTS / f"{stem}.json", out)
    lines = [
        "# Quality model: how much the measured fraction moves with the training seed",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g} ({scheduler} schedule); the same test examples; "
        "training seeds "
        f"{', '.join(map(str, seeds))}. Each fraction is against the same seed's reference.",
        "",
        "| task | run | fraction per seed | mean | mean abs deviation | range |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in out["runs"]:
        per = ", ".join(f"{k}: {v:.3f}" for k, v in r["fractions"].items())
        if r["name"] == "ref":
            per = "drop " + ", ".join(f"{k}: {v:.4f}" for k, v in r["drops"].items())
        lines.append(
            f"| {r['task']} | {r['name']} | {per} | {r['mean']:.3f} | {r['mean_abs_dev']:.3f} | "
            f"{r['range']:.3f} |"
        )
    lines += [""] + [
        f"- {t}: mean absolute deviation of a placement's fraction from its mean over seeds, averaged over "
        f"{v['placements']} placements: **{v['mean_abs_dev']:.3f}**."
        for t, v in out["tasks"].items()
    ]
    lines += [""] + [
        f"- {t}: one run's fraction against the mean of the same placement's runs at the other seeds, "
        f"averaged over every run of those placements: **{v['one_run_vs_other_seeds_mean']:.3f}**. A model "
        "scored against single runs misses by about this much even when it predicts the other seeds' mean "
        "exactly."
        for t, v in out["tasks"].items()
    ]
    write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    return out


def wide() -> dict[str, Any]:
    """Whether a run's fraction moves between seeds because of the trained model or because of the few test
    examples it is measured on: the runs of ``run --wide`` (RESULTS/runs/wide/) were each measured on the
    task's usual test subset and on a larger test set (TaskSetting.wide_examples), with the same adapter.
    Per placement and test set, its fraction at each seed (against the same seed's reference on the same
    set), the mean absolute deviation from their mean, and the gap of one run to the mean of its other
    seeds, against its own seed's reference and against the mean of the reference's drops; and the forms'
    cross-task scores on both sets, with both references (``_wide_cross_task``). Writes RESULTS/wide.json
    and .md."""
    import statistics

    from layercard.artifacts import read_json, write_json, write_text

    folder = RESULTS / "runs" / "wide"
    seeds = run_seeds(folder)
    sets = {"usual": ("test_loss", RESULTS / "runs"), "larger": ("test_loss_wide", folder)}
    out: dict[str, Any] = {"seeds": seeds, "tasks": {}}
    for task in TASKS:
        runs = {
            (pl.name, sd): read_json(p)
            for pl in GRID
            for sd in seeds
            if (p := _run_path(task, pl.name, sd, wide=True)).is_file()
        }
        if not runs:
            continue
        res: dict[str, Any] = {}
        for label, (key, base_folder) in sets.items():
            base = float(read_json(base_folder / f"{task}-base.json")["test_loss"])
            losses = {k: r[key] for k, r in runs.items()}
            rows, spread = _seed_spread(task, base, losses)
            gaps = [g for fr in seed_fractions(base, losses, "mean").values() if len(fr) > 1
                    for g in seed_gaps(list(fr.values()))]  # fmt: skip
            gap_key = "one_run_vs_other_seeds_mean_against_mean_reference"
            res[label] = {
                "base_loss": base,
                "examples": next(iter(runs.values())).get("wide_examples") if label == "larger" else None,
                "rows": rows,
                **(spread or {}),
                **({gap_key: statistics.fmean(gaps)} if gaps else {}),
            }
        out["tasks"][task] = res
    out["cross_task"] = _wide_cross_task(seeds)
    out["cross_task_mean_reference"] = _wide_cross_task(seeds, "mean")
    write_json(RESULTS / "wide.json", out)
    lines = [
        "# Quality runs measured on the usual test subset and on a larger test set",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g} constant; training seeds "
        f"{', '.join(map(str, seeds))}; each adapter measured on both sets, each fraction against the same "
        "seed's reference on the same set.",
        "",
        "| task | test set | run | fraction per seed (reference: its drop) | mean | mean abs deviation |",
        "|---|---|---|---|---:|---:|",
    ]
    for task, res in out["tasks"].items():
        for label, v in res.items():
            n = v["examples"] if v["examples"] else TASKS[task].test_examples
            for r in v["rows"]:
                vals = r["drops"] if r["name"] == "ref" else r["fractions"]
                per = ", ".join(f"{k}: {x:.3f}" for k, x in vals.items())
                lines.append(
                    f"| {task} | {label} ({n}) | {r['name']} | {per} | {r['mean']:.3f} | "
                    f"{r['mean_abs_dev']:.3f} |"
                )
    lines.append("")
    for task, res in out["tasks"].items():
        for label, v in res.items():
            if "placements" in v:
                lines.append(
                    f"- {task}, {label} test set: mean absolute deviation over seeds "
                    f"{v['mean_abs_dev']:.3f}; "
                    "one run against the mean of its other seeds "
                    f"**{v['one_run_vs_other_seeds_mean']:.3f}**; "
                    "the same with every fraction against the mean of the reference's drops over its seeds "
                    f"**{v['one_run_vs_other_seeds_mean_against_mean_reference']:.3f}**."
                )
    for key, reference in (("cross_task", "own"), ("cross_task_mean_reference", "mean")):
        if out[key]:
            lines += _wide_cross_task_markdown(out[key], reference)
    write_text(RESULTS / "wide.md", "\n".join(lines) + "\n")
    return out


def _wide_cross_task_markdown(ct: dict[str, Any], reference: str) -> list[str]:
    """wide.md's section on the forms' cross-task scores under one way of labelling (``reference``)."""
    against = (
        "each fraction against the same seed's reference"
        if reference == "own"
        else "each fraction against the mean of the reference's drops over its seeds on the same set"
    )
    lines: list[str] = ["", f"## Labels {against}"]
    keys = list(next(iter(ct["forms"].values())))
    lines += [
        "",
        f"Every form fitted on one task and scored on the other (as decision.md), with "
        f"{', '.join(ct['wide_tasks'])} labelled four ways: on the usual test subset or on the larger "
        f"test set, by the seed-0 run or by the mean over the seeds measured there ({ct['placements']} "
        "placements each; a task without wide runs keeps its usual labels). Cells: cross-task mean "
        "absolute error / cross-task regret.",
        "",
        "| form | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, v in ct["forms"].items():
        cells = [f"{v[k]['cross_task_mae']:.3f} / {v[k]['cross_task_regret']:.3f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Each placement's measured fraction under the four labels:", "",
              "| task | run | " + " | ".join(keys) + " | seeds on the larger set |",
              "|---|---|" + "---:|" * (len(keys) + 1)]  # fmt: skip
    for task, by_label in ct["labels"].items():
        for name in by_label[keys[0]]:
            vals = " | ".join(f"{by_label[k][name]:.3f}" for k in keys)
            lines.append(f"| {task} | {name} | {vals} | {ct['seeds_per_placement'][task][name]} |")
    d, dec = ct["default"], ct["decision"]
    lines += [
        "",
        "The frozen default (fitted on both tasks' usual subsets) against each label set: "
        + ", ".join(f"{k} {d[k]:.3f}" for k in keys)
        + ".",
        "",
        f"decision.md's rule on the larger test set's labels: eligible {', '.join(dec['eligible'])}; "
        f"chosen **{dec['chosen']}**, parameters pooled on its seed means "
        f"({', '.join(f'{x:g}' for x in dec['params'])}); its cross-task error "
        + ", ".join(f"{k} {dec['cross_task_mae'][k]:.3f}" for k in keys)
        + ".",
    ]
    return lines


def seed_fractions(
    base: float, losses: dict[tuple[str, int], float], reference: str = "own"
) -> dict[str, dict[int, float]]:
    """Each run's fraction of the reference's drop, by placement name and seed (``losses``: test loss by
    name and seed). ``reference="own"``: against its own seed's reference (a seed without one gives no
    fraction); ``"mean"``: against the mean of the reference's drops over every seed it ran at."""
    refs = {sd: base - v for (name, sd), v in losses.items() if name == "ref"}
    if reference not in ("own", "mean"):
        raise ValueError(f"reference: expected 'own' or 'mean', got {reference!r}")
    mean_ref = sum(refs.values()) / len(refs) if refs else None
    out: dict[str, dict[int, float]] = {}
    for (name, sd), loss in sorted(losses.items()):
        if name == "ref" or not refs or (reference == "own" and sd not in refs):
            continue
        out.setdefault(name, {})[sd] = (base - loss) / (refs[sd] if reference == "own" else mean_ref)
    return out


_Labels = dict[str, list[tuple[dict[str, Any], Any]]]  # per task: (run, features) pairs


def _wide_labels(seeds: list[int], reference: str = "own") -> tuple[list[str], dict[str, _Labels]]:
    """The tasks whose seed-0 runs ``run --wide`` measured for every GRID placement, and four label sets
    over the same placements: the usual test subset and the larger test set, each by the seed-0 run and by
    the mean over every seed measured there; each fraction against the reference on the same set, at the
    same seed or as the mean of its drops over the seeds (``reference``, as ``seed_fractions``). A task
    without wide runs keeps its usual labels on both sets."""
    import statistics

    from layercard.artifacts import read_json

    usual_seeds = run_seeds(RESULTS / "runs")
    labels: dict[str, _Labels] = {}
    done = []
    for task, pairs in _labelled()["seed 0"].items():
        wide = all(_run_path(task, pl.name, SEED, wide=True).is_file() for pl in GRID)
        done += [task] if wide else []
        for label, (is_wide, key, ss) in {
            "usual": (False, "test_loss", usual_seeds),
            "larger": (wide, "test_loss_wide" if wide else "test_loss", seeds if wide else usual_seeds),
        }.items():
            folder = RESULTS / "runs" / ("wide" if is_wide else "")
            base = float(read_json(folder / f"{task}-base.json")["test_loss"])
            loss = {
                (pl.name, sd): float(read_json(p)[key])
                for pl in GRID
                for sd in ss
                if (p := _run_path(task, pl.name, sd, wide=is_wide)).is_file()
            }
            fr = seed_fractions(base, loss, reference)
            at0, means = [], []
            for r, f in pairs:
                by_seed = fr[r["name"]]
                at0.append(({**r, "fraction": by_seed[SEED]}, f))
                mean = statistics.fmean(by_seed.values())
                means.append(({**r, "fraction": mean, "seeds": len(by_seed)}, f))
            labels.setdefault(f"{label} seed 0", {})[task] = at0
            labels.setdefault(f"{label} seed mean", {})[task] = means
    return done, labels


def _wide_cross_task(seeds: list[int], reference: str = "own") -> dict[str, Any] | None:
    """The card-only forms' cross-task scores (error and regret) on each label set of ``_wide_labels``; the
    frozen default's error on each; and ``decide``'s rule applied to the larger test set's labels (eligible
    by the error against seed 0, chosen by the regret against seed means, parameters pooled on both tasks'
    seed means), with the chosen form's cross-task error there; fractions against the reference as
    ``reference`` (``seed_fractions``). None until some task's seed-0 wide runs are all there."""
    import statistics

    from layercard.plan.quality import FORMS, TWO_TASK_MODEL, fit

    done, labels = _wide_labels(seeds, reference)
    if not done:
        return None
    tasks = sorted(labels["usual seed 0"])
    scored = {k: _cross_task(v, regret=True) for k, v in labels.items()}
    model = TWO_TASK_MODEL
    eligible, chosen = decide_rule(
        {n: scored["larger seed 0"][n]["cross_task_mae"] for n in FORMS},
        {n: scored["larger seed mean"][n]["cross_task_regret"] for n in FORMS},
    )
    data = labels["larger seed mean"]
    params, _ = fit(FORMS[chosen], [f for t in tasks for _, f in data[t]],
                    [r["fraction"] for t in tasks for r, _ in data[t]])  # fmt: skip
    return {
        "wide_tasks": done,
        "placements": len(labels["usual seed 0"][done[0]]),
        "seeds_per_placement": {
            t: {r["name"]: r["seeds"] for r, _ in labels["larger seed mean"][t]} for t in done
        },
        "labels": {
            t: {k: {r["name"]: r["fraction"] for r, _ in v[t]} for k, v in labels.items()} for t in done
        },
        "forms": {n: {k: scored[k][n] for k in scored} for n in FORMS},
        "default": {
            k: statistics.fmean(abs(model.predict(f) - r["fraction"]) for t in done for r, f in v[t])
            for k, v in labels.items()
        },
        "decision": {
            "eligible": eligible,
            "chosen": chosen,
            "params": list(params),
            "cross_task_mae": {k: scored[k][chosen]["cross_task_mae"] for k in scored},
            "cross_task_regret": {k: scored[k][chosen]["cross_task_regret"] for k in scored},
        },
    }


def seedmean() -> dict[str, Any]:
    """The forms scored against seed-averaged fractions: where a placement ran at two or more training
    seeds (``run --seed N``), its measured fraction is the mean over them, else its seed-0 run's.

    The same cross-task protocol as ``fit``, on less noisy targets: how much of the held-out error is the
    runs' own noise. Nothing is refitted for the planner. Writes RESULTS/seedmean.json and .md, and
    refreshes noise.json and .md, whose seed means it reads.
    """
    from layercard.artifacts import write_json, write_text

    means = {(r["task"], r["name"]): r for r in noise()["runs"]}
    data: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    single: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for r in rows():
        if r["name"] == "ref":
            continue
        m = means.get((r["task"], r["name"]))
        avg = {**r, "fraction": m["mean"], "seeds": len(m["fractions"])} if m else {**r, "seeds": 1}
        f = _features(r["task"], r)
        data.setdefault(r["task"], []).append((avg, f))
        single.setdefault(r["task"], []).append((r, f))
    out: dict[str, Any] = {
        "placements": {t: len(v) for t, v in data.items()},
        "seed_averaged": {t: sum(r["seeds"] > 1 for r, _ in v) for t, v in data.items()},
        "seed_averaged_forms": _cross_task(data),
        "single_seed_forms": _cross_task(single),
    }
    write_json(RESULTS / "seedmean.json", out)
    tasks = sorted(data)
    lines = [
        "# Quality model against seed-averaged measurements",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g}. "
        "Placements per task (seed-averaged among them): "
        + ", ".join(f"{t} {out['placements'][t]} ({out['seed_averaged'][t]})" for t in tasks)
        + ". Each form is fitted on one task and scored on the other, once against the seed-0 runs "
        "(as in quality.md) and once against the seed means.",
        "",
        "| form | "
        + " | ".join(f"fit on {t}, held-out MAE: seed 0 / seed mean" for t in tasks)
        + " | cross-task MAE: seed 0 / seed mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name, res in out["seed_averaged_forms"].items():
        one = out["single_seed_forms"][name]
        cells = [
            f"{_only(one[f'fit_on_{t}']['held_out_mae']):.3f} / "
            f"{_only(res[f'fit_on_{t}']['held_out_mae']):.3f}"
            for t in tasks
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {one['cross_task_mae']:.3f} / {res['cross_task_mae']:.3f} |"
        )
    write_text(RESULTS / "seedmean.md", "\n".join(lines) + "\n")
    return out


# Probe lengths (steps of the reference's measured curve a fit may see) that ``warp`` scores.
PROBE_STEPS = (4, 6, 8, 12, 16, 24, 36)


@dataclasses.dataclass(frozen=True)
class _CurveData:
    """What the curve-reading forms are scored on: the tasks with a measured reference curve, each task's
    base loss and curve points, its placements with their features, the seed means where there are repeats,
    and the fractions against seed 0 and against seed means (seed 0 where a placement has no repeats)."""

    tasks: list[str]
    base: dict[str, float]
    points: dict[str, list[tuple[float, float]]]
    data: dict[str, list[tuple[dict[str, Any], Any]]]
    means: dict[tuple[str, str], float]
    targets: dict[str, dict[str, list[float]]]


def _curve_data(what: str) -> _CurveData:
    from layercard.artifacts import read_json

    curves = {t: RESULTS / "curves" / f"{t}-ref.json" for t in TASKS}
    tasks = sorted(t for t, p in curves.items() if p.is_file())
    if len(tasks) < 2:
        raise SystemExit(f"{what}: needs the reference curves of two tasks (quality.py curve --only ref)")
    base = {t: float(read_json(RESULTS / "runs" / f"{t}-base.json")["test_loss"]) for t in tasks}
    points = {t: [(float(a), float(b)) for a, b in read_json(curves[t])["test_curve"]] for t in tasks}
    means = {(r["task"], r["name"]): r["mean"] for r in noise()["runs"]}
    data = {t: [(r, _features(t, r)) for r in rows() if r["task"] == t and r["name"] != "ref"] for t in tasks}
    targets = {
        "seed 0": {t: [r["fraction"] for r, _ in data[t]] for t in tasks},
        "seed mean": {t: [means.get((t, r["name"]), r["fraction"]) for r, _ in data[t]] for t in tasks},
    }
    return _CurveData(tasks, base, points, data, means, targets)


def warp() -> dict[str, Any]:
    """The `warp` form scored like the card-only forms: γ fitted on one task, scored on the other, each task
    read through its own reference curve (``curve --only ref``) fitted on its first k steps, for every k in
    PROBE_STEPS; against the seed-0 runs and against seed means. Writes RESULTS/warp.json, .md and a plot.
    """
    from layercard.artifacts import write_json, write_text
    from layercard.plan.quality import WARP, fit_progress_curve, fit_warp, mean_abs_error

    d = _curve_data("warp")
    tasks, base, points, data, targets = d.tasks, d.base, d.points, d.data, d.targets
    out: dict[str, Any] = {"steps": STEPS, "probe_steps": {}, "curves": points, "base": base}
    for k in PROBE_STEPS:
        fitted = {t: fit_progress_curve([p for p in points[t] if p[0] <= k], base[t], STEPS) for t in tasks}
        res: dict[str, Any] = {
            "probe_share_of_run": k / STEPS,
            "curve": {t: dataclasses.asdict(c) for t, c in fitted.items()},
        }
        for label, ys in targets.items():
            per: dict[str, Any] = {}
            for ft in tasks:
                g, err = fit_warp([fitted[ft]], [[f for _, f in data[ft]]], [ys[ft]])
                held = {
                    o: mean_abs_error(WARP, fitted[o].warp_params(g), [f for _, f in data[o]], ys[o])
                    for o in tasks
                    if o != ft
                }
                per[f"fit_on_{ft}"] = {"gamma": g, "fit_mae": err, "held_out_mae": held}
            per["cross_task_mae"] = float(
                sum(v for ft in tasks for v in per[f"fit_on_{ft}"]["held_out_mae"].values()) / len(tasks)
            )
            res[label] = per
        out["probe_steps"][str(k)] = res
    write_json(RESULTS / "warp.json", out)
    write_text(RESULTS / "warp.md", _warp_markdown(out, tasks))
    _warp_plot(out, tasks)
    return out


def _warp_markdown(out: dict[str, Any], tasks: list[str]) -> str:
    lines = [
        "# Quality model read off the reference's measured loss curve (`warp`)",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g}. The reference's held-out loss was measured "
        f"after steps {', '.join(str(int(p[0])) for p in out['curves'][tasks[0]])} "
        "(`quality.py curve --only ref`, seed 0). A placement's predicted fraction is the reference's "
        "smoothed curve L(t) = L∞ + (L₀ − L∞)·exp(−(t/τ)^κ) read at α·T, α = (parameter share)^γ: "
        "q = (L₀ − L(αT)) / (L₀ − L(T)). τ and κ are fitted to the curve's first k steps; γ is fitted on "
        "one task's placements and scored on the other's.",
        "",
        "| k (steps of the reference seen) | k / run | "
        + " | ".join(f"{t}: τ, κ" for t in tasks)
        + " | cross-task MAE, seed 0 | cross-task MAE, seed mean | γ (fit on "
        + " / ".join(tasks)
        + ", seed mean) |",
        "|---:|---:|" + "---|" * len(tasks) + "---:|---:|---|",
    ]
    for k, res in out["probe_steps"].items():
        cells = [f"{res['curve'][t]['tau']:.3g}, {res['curve'][t]['kappa']:.2f}" for t in tasks]
        gam = " / ".join(f"{res['seed mean'][f'fit_on_{t}']['gamma']:g}" for t in tasks)
        lines.append(
            f"| {k} | {res['probe_share_of_run']:.0%} | "
            + " | ".join(cells)
            + f" | {res['seed 0']['cross_task_mae']:.3f} | {res['seed mean']['cross_task_mae']:.3f} | {gam} |"
        )
    lines += [
        "",
        "Card-only forms on the same placements (quality.md, seedmean.md): `params` 0.066 against seed 0, "
        "0.081 against seed means; no card-only form came under 0.080 against seed means.",
        "",
    ]
    return "\n".join(lines)


def _warp_plot(out: dict[str, Any], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from layercard.plan.quality import ProgressCurve

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    ts = np.linspace(0, STEPS, 200)
    for ax, t in zip(axes, tasks, strict=True):
        pts = np.array([[0.0, out["base"][t]], *out["curves"][t]])
        ax.plot(pts[:, 0], pts[:, 1], "o", color="black", ms=3, label="measured")
        for k, style in ((str(STEPS), "-"), ("12", "--"), ("8", ":")):
            c = ProgressCurve(**out["probe_steps"][k]["curve"][t])
            ax.plot(ts, [c.loss(x) for x in ts], style, label=f"fit on steps ≤ {k}")
        ax.set_title(f"{t}: reference held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("test loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "warp_curves.png", dpi=120)
    plt.close(fig)


# τ_card variants ``saturation`` scores beside the library's (plan.quality.time_constant): what the reference
# can reach over its first step's decrease, with other numerators, and no card at all. (The first step's
# rate with its quadratic term sums to a negative number on both cards: it cannot be the denominator.)
def _tau_variants(card: Any) -> dict[str, float]:
    from layercard.plan.quality import time_constant

    lin = sum(u.rate_linear for u in card.units) * LR / float(card.config["lr"])
    tau = float(time_constant(card, LR))
    out = {
        "reach at rank 8 / first-step rate (chosen)": tau,
        "full-rank reach / first-step rate": 0.5 * card.n_target_tokens
        * sum(u.resnorm**2 for u in card.units) / lin,
        "probe loss / first-step rate": card.loss / lin,
        "no card (the fitting task's τ as is)": 1.0,
    }  # fmt: skip
    noise = _noise_scale(card.task["name"])
    if noise is not None:  # the gradient noise scale alone: noisecurve
        out["reach / first-step rate × (1 + B_noise/B)"] = tau * (1.0 + noise / BATCH)
    return out


def _noise_scale(task: str) -> float | None:
    """The task's gradient noise scale B_noise (benchmarks/noise_scale.py), None when not measured."""
    from layercard.artifacts import read_json

    path = RESULTS / "noise_scale.json"
    if not path.is_file():
        return None
    rows = [r for r in read_json(path)["rows"] if r["benchmark"] == "quality" and r["task"] == task]
    return float(rows[0]["b_noise"]) if rows else None


def saturation() -> dict[str, Any]:
    """The `saturation` form (plan.quality.SATURATION) scored like every other form: c and κ from the fitting
    task's measured reference curve (``curve --only ref``), γ from its placements, scored on the other task,
    against the seed-0 runs and against seed means; τ_card variants beside the chosen one; then the pooled fit
    on both tasks that plans use. Writes RESULTS/saturation.json and .md.
    """
    from layercard.artifacts import write_json, write_text
    from layercard.card import Card
    from layercard.plan.quality import SATURATION, fit_progress_curve, fit_saturation, mean_abs_error

    d = _curve_data("saturation")
    tasks, base, points, data, means, targets = d.tasks, d.base, d.points, d.data, d.means, d.targets
    curve = {t: fit_progress_curve(points[t], base[t], STEPS) for t in tasks}
    taus = {t: _tau_variants(Card.load(RESULTS / "cards" / t / "card.json")) for t in tasks}
    out: dict[str, Any] = {
        "steps": STEPS, "lr": LR,
        "curves": {t: dataclasses.asdict(c) for t, c in curve.items()},
        "tau_card": taus, "variants": {},
    }  # fmt: skip
    chosen = next(iter(taus[tasks[0]]))

    def xs(t: str, v: str) -> list[Any]:
        """Task ``t``'s placement features with T/τ_card from τ_card variant ``v``."""
        return [dataclasses.replace(f, steps_over_tau=STEPS / taus[t][v]) for _, f in data[t]]

    preds: dict[str, dict[str, list[float]]] = {}
    for variant in taus[tasks[0]]:
        res: dict[str, Any] = {}
        for label, ys in targets.items():
            per: dict[str, Any] = {}
            for ft in tasks:
                params, err = fit_saturation([curve[ft]], [taus[ft][variant]], [xs(ft, variant)], [ys[ft]])
                held = {
                    o: mean_abs_error(SATURATION, params, xs(o, variant), ys[o]) for o in tasks if o != ft
                }
                per[f"fit_on_{ft}"] = {"params": list(params), "fit_mae": err, "held_out_mae": held}
                if label == "seed mean" and variant == chosen:
                    for o in held:
                        preds[o] = {"by_other_task_fit": [SATURATION.fn(x, params) for x in xs(o, chosen)]}
            per["cross_task_mae"] = float(
                sum(v for ft in tasks for v in per[f"fit_on_{ft}"]["held_out_mae"].values()) / len(tasks)
            )
            res[label] = per
        out["variants"][variant] = res
    pooled: dict[str, Any] = {}
    for label, ys in targets.items():
        params, err = fit_saturation([curve[t] for t in tasks], [taus[t][chosen] for t in tasks],
                                     [xs(t, chosen) for t in tasks], [ys[t] for t in tasks])  # fmt: skip
        pooled[label] = {"params": list(params), "fit_mae": err}
    out["pooled"] = pooled
    out["runs"] = [
        {"task": t, "name": r["name"], "seed_0": r["fraction"], "seed_mean": means.get((t, r["name"])),
         "params_share": f.params, "predicted_by_other_task_fit": preds[t]["by_other_task_fit"][i]}
        for t in tasks for i, (r, f) in enumerate(data[t])
    ]  # fmt: skip
    write_json(RESULTS / "saturation.json", out)
    write_text(RESULTS / "saturation.md", _saturation_markdown(out, tasks))
    return out


def _saturation_markdown(out: dict[str, Any], tasks: list[str]) -> str:
    measured = {t: out["curves"][t]["tau"] for t in tasks}
    lines = [
        "# Quality model with the reference's saturation estimated from the card (`saturation`)",
        "",
        f"smollm2, {out['steps']} steps of batch {BATCH}, lr {out['lr']:g}; the placements of quality.md. "
        "A placement's fraction is the reference's loss curve L(t) = L∞ + (L₀ − L∞)·exp(−(t/τ)^κ) read at "
        "α·T, α = (parameter share)^γ, with τ = c·τ_card from the card. Fitted on one task: c (its measured "
        "τ over its τ_card) and κ from its measured reference curve, γ from its placements; scored on the "
        "other task, which contributes only its card.",
        "",
        "Measured reference τ (full curve): "
        + ", ".join(f"{t} {measured[t]:.2f} steps (κ {out['curves'][t]['kappa']:.2f})" for t in tasks)
        + f"; ratio {measured[tasks[0]] / measured[tasks[1]]:.2f}.",
        "",
        f"| τ_card | {tasks[0]} / {tasks[1]} ratio | cross-task MAE, seed 0 (fit on "
        + " / ".join(tasks)
        + ") | cross-task MAE, seed mean (fit on "
        + " / ".join(tasks)
        + ") |",
        "|---|---:|---|---|",
    ]
    for v, res in out["variants"].items():
        ratio = out["tau_card"][tasks[0]][v] / out["tau_card"][tasks[1]][v]
        cells = []
        for label in ("seed 0", "seed mean"):
            per = res[label]
            held = [_only(per[f"fit_on_{t}"]["held_out_mae"]) for t in tasks]
            cells.append(f"**{per['cross_task_mae']:.3f}** (" + " / ".join(f"{h:.3f}" for h in held) + ")")
        lines.append(f"| {v} | {ratio:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Held-out MAE per direction: the error on the other task when fitted on the one named.",
        "",
        "Pooled fit on both tasks (what plans use): "
        + "; ".join(
            f"{label}: γ {p['params'][0]:g}, c {p['params'][1]:.4g}, κ {p['params'][2]:.3f}, "
            f"fit MAE {p['fit_mae']:.3f}"
            for label, p in out["pooled"].items()
        )
        + ".",
        "",
        "| task | run | params share | measured, seed 0 | measured, seed mean | predicted (fit on the other "
        "task, seed means) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in out["runs"]:
        sm = "—" if r["seed_mean"] is None else f"{r['seed_mean']:.3f}"
        lines.append(
            f"| {r['task']} | {r['name']} | {r['params_share']:.3f} | {r['seed_0']:.3f} | {sm} | "
            f"{r['predicted_by_other_task_fit']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


# The saturation forms with the reference's time constant from the task's gradient noise scale instead of the
# card's first step (benchmarks/noise_scale.py): τ = c·(1 + B_noise/B) for training batches of B examples. A
# placement is read off that curve at α·T, α from its parameter share (as `saturation`) or from the default's
# capacity and coverage (α = x^γ·c^β, score² weights), which orders placements as the default does.
def _alpha_capcov(f: Any, gamma: float, beta: float) -> float:
    from layercard.plan.quality import _power

    return _power(f.capacity_at(2.0), gamma) * _power(f.coverage, beta)


def _noise_forms() -> dict[str, tuple[Any, tuple[tuple[float, ...], ...]]]:
    """Each noise-scale form's q = fn(features, (α exponents…, c, κ)) and the grids of its α exponents."""
    from layercard.plan.quality import _BETA, _GAMMA, _power, warp_fraction

    return {
        "share": (lambda f, p: warp_fraction(_power(f.params, p[0]), f.steps_over_tau / p[-2], p[-1]),
                  (_GAMMA,)),
        "capacity × coverage": (
            lambda f, p: warp_fraction(_alpha_capcov(f, p[0], p[1]), f.steps_over_tau / p[-2], p[-1]),
            (_GAMMA, _BETA)),
    }  # fmt: skip


def noisecurve() -> dict[str, Any]:
    """The noise-scale saturation forms (``_noise_forms``) fitted on one task and scored on the other, against
    seed 0 and seed means, as ``saturation`` scores its variants: c and κ from the fitting task's measured
    reference curve, the α exponents from its placements; then the pooled fit on both tasks. Writes
    RESULTS/noisecurve.json and .md."""
    import numpy as np

    from layercard.artifacts import write_json, write_text
    from layercard.plan.quality import Form, decision_regret, fit, fit_progress_curve, mean_abs_error

    d = _curve_data("noisecurve")
    tasks, base, points, data, targets = d.tasks, d.base, d.points, d.data, d.targets
    curve = {t: fit_progress_curve(points[t], base[t], STEPS) for t in tasks}
    slow = {}
    for t in tasks:
        b = _noise_scale(t)
        if b is None:
            raise SystemExit("noisecurve: run benchmarks/noise_scale.py first")
        slow[t] = 1.0 + b / BATCH
    xs = {t: [dataclasses.replace(f, steps_over_tau=STEPS / slow[t]) for _, f in data[t]] for t in tasks}

    def best(fn: Any, grids: Any, c: float, kappa: float, on: list[str], ys: Any):
        """The α exponents with the least error on the tasks ``on``, c and κ held at the values given."""
        form = Form("noise", "", fn, (*grids, (c,), (kappa,)))
        return fit(form, [x for t in on for x in xs[t]], [y for t in on for y in ys[t]])

    out: dict[str, Any] = {"steps": STEPS, "batch": BATCH, "slowdown": slow, "forms": {}}
    for name, (fn, grids) in _noise_forms().items():
        res: dict[str, Any] = {}
        scored = Form(name, "", fn, ())
        for label, ys in targets.items():
            per: dict[str, Any] = {}
            for ft in tasks:
                c = curve[ft].tau / slow[ft]
                params, err = best(fn, grids, c, curve[ft].kappa, [ft], ys)
                held = {o: mean_abs_error(scored, params, xs[o], ys[o]) for o in tasks if o != ft}
                # regret against seed means whichever labels fitted it, as ``decide`` scores it
                regret = {
                    o: decision_regret([fn(x, params) for x in xs[o]], targets["seed mean"][o],
                                       [x.params for x in xs[o]])[0]
                    for o in tasks if o != ft
                }  # fmt: skip
                per[f"fit_on_{ft}"] = {"params": list(params), "fit_mae": err, "held_out_mae": held,
                                       "held_out_regret": regret}  # fmt: skip
            for stat in ("mae", "regret"):
                per[f"cross_task_{stat}"] = float(
                    np.mean([v for ft in tasks for v in per[f"fit_on_{ft}"][f"held_out_{stat}"].values()])
                )
            c = float(np.exp(np.mean([np.log(curve[t].tau / slow[t]) for t in tasks])))
            kappa = float(np.mean([curve[t].kappa for t in tasks]))
            params, err = best(fn, grids, c, kappa, tasks, ys)
            per["pooled"] = {"params": list(params), "fit_mae": err}
            res[label] = per
        out["forms"][name] = res
    write_json(RESULTS / "noisecurve.json", out)
    write_text(RESULTS / "noisecurve.md", _noisecurve_markdown(out, tasks, curve))
    return out


def _noisecurve_markdown(out: dict[str, Any], tasks: list[str], curve: dict[str, Any]) -> str:
    from layercard.artifacts import read_json

    slow = out["slowdown"]
    taus = read_json(RESULTS / "saturation.json")["tau_card"]
    chosen = next(iter(taus[tasks[0]]))
    card_ratio = taus[tasks[0]][chosen] / taus[tasks[1]][chosen]
    lines = [
        "# Quality model with the reference's saturation from the gradient noise scale",
        "",
        f"smollm2, {out['steps']} steps of batch {out['batch']}, lr {LR:g}; the placements of quality.md. As "
        "saturation.md, but the reference's time constant is τ = c·(1 + B_noise/B), B_noise the task's "
        "gradient noise scale over the card's probe examples (noise_scale.md) and B the training batch. "
        "Fitted on one task: c and κ from its measured reference curve, the α exponents from its "
        "placements; scored on the other, which contributes only B_noise.",
        "",
        "1 + B_noise/B: " + ", ".join(f"{t} {slow[t]:.2f}" for t in tasks)
        + f"; ratio {slow[tasks[0]] / slow[tasks[1]]:.2f}, where the measured reference curves say "
        f"{curve[tasks[0]].tau / curve[tasks[1]].tau:.2f} and the card's first step (saturation.md) "
        f"{card_ratio:.2f}.",
        "",
        "| α from | cross-task MAE: seed 0 / seed mean | cross-task regret (seed mean) "
        "| pooled fit, seed mean (α exponents, c, κ) |",
        "|---|---:|---:|---|",
    ]  # fmt: skip
    for name, res in out["forms"].items():
        p = res["seed mean"]["pooled"]["params"]
        lines.append(
            f"| {name} | {res['seed 0']['cross_task_mae']:.3f} / {res['seed mean']['cross_task_mae']:.3f} | "
            f"{res['seed mean']['cross_task_regret']:.3f} | " + ", ".join(f"{v:.3g}" for v in p) + " |"
        )
    lines += [
        "",
        "The rule that chose the default (decision.md), applied with these two forms beside the card-only "
        "ones: the least cross-task MAE against seed 0 is `share`'s; within 0.01 of it lie `share` and "
        "`capacity × coverage`, and of those `capacity × coverage` has the less regret. It was frozen at "
        "its pooled seed-mean fit and scored once on the four tasks fitted on none (confirm.md, column "
        "`noise`).",
        "",
    ]
    return "\n".join(lines)


def _with_pooled_fits(
    forms: dict[str, Any], data: dict[str, _Labels], scored: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per form and label set of ``data``: its cross-task scores (``scored``, from ``_cross_task``) with its
    fit pooled on every task of that label set."""
    from layercard.plan.quality import fit

    out: dict[str, dict[str, Any]] = {}
    for name, form in forms.items():
        out[name] = {}
        for label, d in data.items():
            tasks = sorted(d)
            xs = [x for t in tasks for _, x in d[t]]
            params, err = fit(form, xs, [r["fraction"] for t in tasks for r, _ in d[t]])
            out[name][label] = scored[label][name] | {"pooled": {"params": list(params), "fit_mae": err}}
    return out


def _rule_sentence(rule: dict[str, Any]) -> str:
    """What ``_rule_over`` found, in one sentence for the markdown reports."""
    return (
        "decision.md's rule over these forms and the card-only ones together (least cross-task regret "
        f"against seed means among the forms within {DECIDE_MAE_SLACK} of the least cross-task MAE against "
        "seed 0): eligible "
        + ", ".join(
            f"`{n}` ({rule['mae_seed0'][n]:.3f} / {rule['regret_seed_mean'][n]:.3f})"
            for n in rule["eligible"]
        )
        + f"; chosen **`{rule['chosen']}`**."
    )


def _rule_over(forms: dict[str, Any]) -> dict[str, Any]:
    """``decide``'s rule over ``forms`` (each with "seed 0" and "seed mean" scores): every form's error and
    regret, the eligible ones and the one chosen."""
    mae = {n: r["seed 0"]["cross_task_mae"] for n, r in forms.items()}
    regret = {n: r["seed mean"]["cross_task_regret"] for n, r in forms.items()}
    eligible, chosen = decide_rule(mae, regret)
    return {"mae_seed0": mae, "regret_seed_mean": regret, "eligible": eligible, "chosen": chosen}


# The coverage penalty scaled by the task's gradient noise per batch example: the default's depth-coverage
# exponent β becomes β·B_noise/B, so a task whose batches carry more noise (noise_scale.md) loses more for
# each depth band a placement leaves out. B_noise/B adds no parameter; the forms are fitted as the card-only
# ones are, with a wider grid for β because B_noise/B is below 1 on both choosing tasks.
NOISE_COVERAGE_BETA = tuple(round(0.05 * i, 3) for i in range(61))


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    """A placement's features with what a task-level form reads beside them."""

    f: Any

    @property
    def params(self) -> float:
        """The placement's parameter share: the budget ``decision_regret`` is scored over."""
        return self.f.params


@dataclasses.dataclass(frozen=True)
class _WithScale(_Wrapped):
    """With task-level numbers by name (B_noise/B, the target statistics): what the scaled-coverage forms
    read."""

    scale: dict[str, float]


def _scaled_coverage_forms(key: str) -> dict[str, tuple[Any, tuple[tuple[float, ...], ...]]]:
    """Each form whose depth-coverage exponent β is scaled by the task's ``key`` (a :class:`_WithScale`
    entry): q = fn(x, params) and its parameter grids."""
    from layercard.plan.quality import _GAMMA, WEIGHT_POWERS, _power

    def cov(x: Any, beta: float) -> float:
        return _power(x.f.coverage, beta * x.scale[key])

    return {
        f"capacity × coverage^(β·{key})": (
            lambda x, p: _power(x.f.capacity_at(p[0]), p[1]) * cov(x, p[2]),
            (WEIGHT_POWERS, _GAMMA, NOISE_COVERAGE_BETA)),
        f"share × coverage^(β·{key})": (
            lambda x, p: _power(x.f.params, p[0]) * cov(x, p[1]), (_GAMMA, NOISE_COVERAGE_BETA)),
        f"coverage^(β·{key})": (lambda x, p: cov(x, p[0]), (NOISE_COVERAGE_BETA,)),
    }  # fmt: skip


NOISE_KEY = "B_noise/B"


def _noise_coverage_forms() -> dict[str, tuple[Any, tuple[tuple[float, ...], ...]]]:
    """Each noise-coverage form's q = fn(x, params) on a :class:`_WithScale` and its parameter grids."""
    return _scaled_coverage_forms(NOISE_KEY)


def _scaled_coverage(scales: dict[str, dict[str, float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scaled-coverage forms of every key of ``scales`` (task -> key -> value) fitted on one task and
    scored on the other (error against seed 0 and seed means, regret against seed means, as ``decide``
    scores the card-only forms), with each form's pooled seed-mean fit, and ``decide``'s rule over them and
    the card-only forms of decision.json together."""
    from layercard.artifacts import read_json
    from layercard.plan.quality import Form

    labelled = _labelled()
    keys = list(next(iter(scales.values())))
    data = {
        label: {t: [(r, _WithScale(f, scales[t])) for r, f in pairs] for t, pairs in by_task.items()}
        for label, by_task in labelled.items()
    }
    candidates = {
        name: Form(name, name, fn, grid)
        for k in keys
        for name, (fn, grid) in _scaled_coverage_forms(k).items()
    }
    scored = {label: _cross_task(d, regret=True, forms=candidates) for label, d in data.items()}
    forms = _with_pooled_fits(candidates, data, scored)
    card_only = read_json(RESULTS / "decision.json")["forms"]
    return forms, _rule_over({**card_only, **forms})


def noisecoverage() -> dict[str, Any]:
    """The noise-coverage forms (``_scaled_coverage`` by B_noise/B); each form's pooled seed-mean fit is
    what quality_confirm.py scores. Writes RESULTS/noisecoverage.json and .md."""
    tasks = sorted(TASKS)
    noise = {}
    for t in tasks:
        b = _noise_scale(t)
        if b is None:
            raise SystemExit("noisecoverage: run benchmarks/noise_scale.py first")
        noise[t] = b / BATCH
    forms, rule = _scaled_coverage({t: {NOISE_KEY: noise[t]} for t in tasks})
    out = {"steps": STEPS, "batch": BATCH, "noise_per_example_of_batch": noise, "forms": forms, "rule": rule}
    _write_scaled_coverage(
        "noisecoverage",
        out,
        tasks,
        "# Quality model with a coverage penalty that grows with the task's gradient noise",
        "The default's depth-coverage exponent β becomes β·B_noise/B, B_noise the task's gradient noise "
        "scale over the card's probe examples (noise_scale.md) and B the training batch: "
        + ", ".join(f"{t} {v:.3f}" for t, v in noise.items()),
        "(columns `noise-cov…`)",
    )
    return out


TARGET_STATS = RESULTS / "target_stats.json"  # target_stats.py: each task's target entropy and length
TARGET_KEYS = {"H": lambda s: s["entropy"], "T/100": lambda s: s["tokens_per_example"] / 100.0}


def target_scales(stats: dict[str, Any]) -> dict[str, float]:
    """One task's target statistics (a row of target_stats.json) by the key the target-coverage forms read."""
    return {k: float(read(stats)) for k, read in TARGET_KEYS.items()}


def targetcoverage() -> dict[str, Any]:
    """The target-coverage forms (``_scaled_coverage`` by the target entropy H and by T/100, T the target
    tokens per example; target_stats.json); each form's pooled seed-mean fit is what quality_confirm.py and
    fresh_tasks.py score. Writes RESULTS/targetcoverage.json and .md."""
    from layercard.artifacts import read_json

    if not TARGET_STATS.is_file():
        raise SystemExit("targetcoverage: run benchmarks/target_stats.py first")
    stats = read_json(TARGET_STATS)["tasks"]
    tasks = sorted(TASKS)
    scales = {t: target_scales(stats[t]) for t in tasks}
    forms, rule = _scaled_coverage(scales)
    out = {"steps": STEPS, "batch": BATCH, "scales": scales, "forms": forms, "rule": rule}
    _write_scaled_coverage(
        "targetcoverage",
        out,
        tasks,
        "# Quality model with a coverage penalty scaled by the task's target statistics",
        "The default's depth-coverage exponent β becomes β·H, H the entropy of the task's training "
        "targets in nats, or β·T/100, T its target tokens per example (target_stats.md): "
        + ", ".join(f"{t} H {v['H']:.3f}, T/100 {v['T/100']:.3f}" for t, v in scales.items()),
        "(columns `target-…`)",
    )
    return out


def _write_scaled_coverage(
    name: str, out: dict[str, Any], tasks: list[str], title: str, what: str, columns: str
) -> None:
    """RESULTS/{name}.json and the markdown beside it."""
    from layercard.artifacts import write_json, write_text

    write_json(RESULTS / f"{name}.json", out)
    write_text(RESULTS / f"{name}.md", _scaled_coverage_markdown(out, tasks, title, what, columns))


def _scaled_coverage_markdown(
    out: dict[str, Any], tasks: list[str], title: str, what: str, columns: str
) -> str:
    rule = out["rule"]
    lines = [
        title,
        "",
        f"smollm2, {out['steps']} steps of batch {out['batch']}, lr {LR:g}; the placements of quality.md. "
        + what
        + ". Each form is fitted on one task and scored on the other, as decision.md scores the card-only "
        "forms.",
        "",
        "| form | cross-task MAE: seed 0 / seed mean | cross-task regret (seed mean) | "
        + " | ".join(f"fit on {t} (seed 0): parameters / held-out MAE" for t in tasks)
        + " | pooled fit, seed mean |",
        "|---|---:|---:|" + "---|" * len(tasks) + "---|",
    ]
    for name, res in out["forms"].items():
        s0, sm = res["seed 0"], res["seed mean"]
        cells = [
            ", ".join(f"{v:g}" for v in s0[f"fit_on_{t}"]["params"])
            + f" / {_only(s0[f'fit_on_{t}']['held_out_mae']):.3f}"
            for t in tasks
        ]
        lines.append(
            f"| {name} | {s0['cross_task_mae']:.3f} / {sm['cross_task_mae']:.3f} | "
            f"{sm['cross_task_regret']:.3f} | "
            + " | ".join(cells)
            + " | "
            + ", ".join(f"{v:g}" for v in sm["pooled"]["params"])
            + " |"
        )
    lines += [
        "",
        _rule_sentence(rule) + " Frozen at their pooled seed-mean fits, the forms are scored "
        f"once on the four tasks fitted on none in confirm.md {columns}.",
        "",
    ]
    return "\n".join(lines)


COUPLED_CARDS = RESULTS / "coupled_cards" / "quality"  # coupled_cards.py: the cards' layer coupling


def coupling_coverage(coupling: Any, layers: Any, weights: Any = None) -> float:
    """How much of every layer's effect the adapted ``layers`` reach: the mean over layers l of
    max over s in ``layers`` of |C_ls| (``coupling``: the L × L cosines), each layer weighted by
    ``weights`` (default alike). 0 for no layer; 1 when every layer is adapted."""
    import numpy as np

    c = np.abs(np.asarray(coupling, dtype=np.float64))
    s = sorted(set(int(x) for x in layers))
    if not s:
        return 0.0
    w = np.ones(len(c)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(c),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("coupling_coverage: weights must be one non-negative number per layer, not all 0")
    return float(np.minimum(c[:, s].max(axis=1), 1.0) @ w / w.sum())


@dataclasses.dataclass(frozen=True)
class _WithCoupling(_Wrapped):
    """With its coupling coverage, unweighted (k) and capacity-weighted (kw)."""

    k: float
    kw: float


def _coupling_coverage_forms() -> dict[str, tuple[Any, tuple[tuple[float, ...], ...]]]:
    """Each coupling-coverage form's q = fn(x, params) on a :class:`_WithCoupling` and its parameter grids."""
    from layercard.plan.quality import _GAMMA, WEIGHT_POWERS, _power

    b = NOISE_COVERAGE_BETA
    return {
        "capacity × k^β": (lambda x, p: _power(x.f.capacity_at(p[0]), p[1]) * _power(x.k, p[2]),
                           (WEIGHT_POWERS, _GAMMA, b)),
        "capacity × k_w^β": (lambda x, p: _power(x.f.capacity_at(p[0]), p[1]) * _power(x.kw, p[2]),
                             (WEIGHT_POWERS, _GAMMA, b)),
        "share × k^β": (lambda x, p: _power(x.f.params, p[0]) * _power(x.k, p[1]), (_GAMMA, b)),
        "share × k_w^β": (lambda x, p: _power(x.f.params, p[0]) * _power(x.kw, p[1]), (_GAMMA, b)),
        "k^β": (lambda x, p: _power(x.k, p[0]), (b,)),
        "k_w^β": (lambda x, p: _power(x.kw, p[0]), (b,)),
    }  # fmt: skip


def layer_weights(card: Any) -> list[float]:
    """Each layer's share of the reference's capacity at the default's unit weights (score², rank 8)."""
    from layercard.plan.quality import REFERENCE_RANK, WEIGHT_POWERS, Basis, rank_share

    basis, i = Basis(card), WEIGHT_POWERS.index(2.0)
    out = [0.0] * card.n_layers
    for u in card.units:
        out[u.layer] += basis.weights[u.key][i] * rank_share(u, REFERENCE_RANK)
    return out


def read_coupling(path: Path, card: Any) -> dict[str, Any]:
    """coupled_cards.py's record for ``card`` (its coupling.json at ``path``: the coupling, the timings),
    checked to cover every layer and to come from the same model and probe examples as the card."""
    from layercard.artifacts import read_json

    if not path.is_file():
        raise SystemExit(f"{path} is missing; run benchmarks/coupled_cards.py first")
    rec = read_json(path)
    if (rec["model_hash"], rec["data_hash"]) != (card.model["hash"], card.task["data_hash"]):
        raise SystemExit(f"{path}: measured on another model or other probe examples than its card")
    if [int(x) for x in rec["coupling"]["layers"]] != list(range(card.n_layers)):
        raise SystemExit(f"{path}: the coupling does not cover every layer")
    return rec


class CouplingBasis(NamedTuple):
    """What a card's coupling coverages read, computed once per card: the |cosine| matrix over every layer
    and each layer's capacity weight (``layer_weights``)."""

    matrix: Any
    weights: list[float]


def coupling_basis(card: Any, coupling: dict[str, Any]) -> CouplingBasis:
    """``coupling`` (a card's coupling block) over ``card``'s layers, with ``card``'s layer weights."""
    import numpy as np

    return CouplingBasis(np.asarray(coupling["matrix"], dtype=np.float64), layer_weights(card))


def coupled(basis: CouplingBasis, units: Any, f: Any) -> _WithCoupling:
    """``f`` of the placement ``units`` ((layer, role, rank) rows) with its coupling coverages on ``basis``,
    unweighted and weighted by the layers' capacity (k_w)."""
    layers = [int(layer) for layer, _role, _rank in units]
    weighted = coupling_coverage(basis.matrix, layers, basis.weights)
    return _WithCoupling(f, coupling_coverage(basis.matrix, layers), weighted)


def couplingcoverage() -> dict[str, Any]:
    """The coupling-coverage forms fitted on one task and scored on the other (error against seed 0 and
    seed means, regret against seed means, as ``decide`` scores the card-only forms), ``decide``'s rule
    over them and the card-only forms of decision.json together, and, not used to choose, every form's
    scores on the larger test sets' labels against the reference's mean drop (wide.md's second section).
    Each form's pooled seed-mean fit is what quality_confirm.py scores. Writes RESULTS/couplingcoverage.json
    and .md."""
    from layercard.artifacts import read_json, write_json, write_text
    from layercard.card import Card
    from layercard.plan.quality import FORMS, Form

    cards = {t: Card.load(RESULTS / "cards" / t / "card.json") for t in TASKS}
    records = {t: read_coupling(COUPLED_CARDS / t / "coupling.json", cards[t]) for t in TASKS}
    bases = {t: coupling_basis(cards[t], records[t]["coupling"]) for t in TASKS}

    def wrap(by_task: _Labels) -> _Labels:
        return {t: [(r, coupled(bases[t], r["units"], f)) for r, f in pairs] for t, pairs in by_task.items()}

    labelled = {label: wrap(d) for label, d in _labelled().items()}
    _, wide_labels = _wide_labels(run_seeds(RESULTS / "runs" / "wide"), "mean")
    larger = {k: wrap(v) for k, v in wide_labels.items() if k.startswith("larger")}
    tasks = sorted(labelled["seed 0"])
    candidates = {n: Form(n, n, fn, grid) for n, (fn, grid) in _coupling_coverage_forms().items()}
    card_only = {n: Form(n, n, (lambda fn: lambda x, p: fn(x.f, p))(f.fn), f.grid) for n, f in FORMS.items()}
    every = {**card_only, **candidates}
    scored = {label: _cross_task(d, regret=True, forms=every) for label, d in {**labelled, **larger}.items()}
    forms = _with_pooled_fits(every, labelled, scored)
    for name in every:
        forms[name] |= {label: scored[label][name] for label in larger}
    rule = _rule_over(forms)
    decision = read_json(RESULTS / "decision.json")["forms"]
    same = all(abs(decision[n]["seed 0"]["cross_task_mae"] - rule["mae_seed0"][n]) < 1e-12 for n in FORMS)
    out = {
        "steps": STEPS,
        "batch": BATCH,
        "card_only_agree_with_decision_json": same,
        "coverage": {
            t: {r["name"]: {"k": x.k, "k_w": x.kw, "bands": x.f.coverage} for r, x in labelled["seed 0"][t]}
            for t in tasks
        },
        "coupling_s": {t: r["timings"].get("coupling_s") for t, r in records.items()},
        "card_s": {t: r["timings"].get("total_s") for t, r in records.items()},
        "forms": forms,
        "rule": rule,
    }
    write_json(RESULTS / "couplingcoverage.json", out)
    write_text(RESULTS / "couplingcoverage.md", _couplingcoverage_markdown(out, tasks, list(larger)))
    return out


def _couplingcoverage_markdown(out: dict[str, Any], tasks: list[str], larger: list[str]) -> str:
    rule = out["rule"]
    lines = [
        "# Quality model with a coverage penalty read from the layer coupling",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g}; the placements of quality.md. The coupling "
        "coverage k of a placement is the mean over layers of the largest |coupling| between that layer and "
        "an adapted one (the card's layer coupling: cosines of the layers' first-step effects on the final "
        "hidden state); k_w weighs each layer by its share of the reference's capacity. It replaces the "
        "default's count of depth bands. Card time with coupling / of it the coupling probe: "
        + ", ".join(f"{t} {out['card_s'][t]:.0f} s / {out['coupling_s'][t]:.0f} s" for t in tasks)
        + ".",
        "",
        "| form | cross-task MAE: seed 0 / seed mean | regret (seed mean) | "
        + " | ".join(f"larger sets, mean reference: {lb.removeprefix('larger ')}" for lb in larger)
        + " | "
        + " | ".join(f"fit on {t} (seed 0): parameters / held-out MAE" for t in tasks)
        + " | pooled fit, seed mean |",
        "|---|---:|---:|" + "---:|" * len(larger) + "---|" * len(tasks) + "---|",
    ]
    for name, res in out["forms"].items():
        s0, sm = res["seed 0"], res["seed mean"]
        cells = [
            ", ".join(f"{v:g}" for v in s0[f"fit_on_{t}"]["params"])
            + f" / {_only(s0[f'fit_on_{t}']['held_out_mae']):.3f}"
            for t in tasks
        ]
        wide_cells = [
            f"{res[lb]['cross_task_mae']:.3f} / {res[lb]['cross_task_regret']:.3f}" for lb in larger
        ]
        lines.append(
            f"| {name} | {s0['cross_task_mae']:.3f} / {sm['cross_task_mae']:.3f} | "
            f"{sm['cross_task_regret']:.3f} | " + " | ".join(wide_cells) + " | " + " | ".join(cells)
            + " | " + ", ".join(f"{v:g}" for v in sm["pooled"]["params"]) + " |"
        )  # fmt: skip
    lines += [
        "",
        "Larger-set cells: cross-task MAE / regret on the larger test sets, fractions against the mean of "
        "the reference's drops over its seeds (wide.md, second section); reported, not used to choose.",
        "",
        _rule_sentence(rule),
        "",
        "Each placement's coverages (k, k_w, share of depth bands):",
        "",
        "| task | run | k | k_w | bands |",
        "|---|---|---:|---:|---:|",
    ]
    for t, by_name in out["coverage"].items():
        for name, v in by_name.items():
            lines.append(f"| {t} | {name} | {v['k']:.3f} | {v['k_w']:.3f} | {v['bands']:.3f} |")
    return "\n".join(lines) + "\n"


# How the default form is chosen (``decide``), set on e2e_nlg and sst2 before any other task was scored with
# it: among the forms whose cross-task error against the seed-0 runs is within DECIDE_MAE_SLACK of the least,
# the one whose picks lose the least measured quality on the task it was not fitted on, against seed means
# (the less noisy labels).
DECIDE_MAE_SLACK = 0.01


def decide_rule(mae: dict[str, float], regret: dict[str, float]) -> tuple[list[str], str]:
    """``decide``'s rule over forms scored by cross-task error against seed 0 (``mae``) and cross-task
    regret against seed means (``regret``): the forms within DECIDE_MAE_SLACK of the least error, and the
    one of them with the least regret (the first listed on a tie)."""
    eligible = [n for n in mae if mae[n] <= min(mae.values()) + DECIDE_MAE_SLACK]
    return eligible, min(eligible, key=lambda n: regret[n])


def _labelled() -> dict[str, dict[str, list[tuple[dict[str, Any], Any]]]]:
    """Each task's placements with their features, labelled by the seed-0 run and by the seed mean (the
    seed-0 run where a placement was not repeated)."""
    from layercard.artifacts import read_json

    means = {(r["task"], r["name"]): r["mean"] for r in read_json(RESULTS / "noise.json")["runs"]}
    out: dict[str, dict[str, list[tuple[dict[str, Any], Any]]]] = {"seed 0": {}, "seed mean": {}}
    for r in rows():
        if r["name"] == "ref":
            continue
        f = _features(r["task"], r)
        out["seed 0"].setdefault(r["task"], []).append((r, f))
        m = means.get((r["task"], r["name"]), r["fraction"])
        out["seed mean"].setdefault(r["task"], []).append(({**r, "fraction": m}, f))
    return out


def decide() -> dict[str, Any]:
    """Every card-or-share form fitted on one task and scored on the other by its error and by its decision
    regret (:func:`layercard.plan.quality.decision_regret`, budgets in parameter share), against seed-0 runs
    and against seed means; the default chosen by DECIDE_MAE_SLACK's rule, its parameters pooled on both
    tasks' seed means. Writes RESULTS/decision.json and .md; nothing else is refitted."""
    from layercard.artifacts import write_json, write_text
    from layercard.plan.quality import FORMS, fit

    labelled = _labelled()
    tasks = sorted(labelled["seed 0"])
    scored = {label: _cross_task(data, regret=True) for label, data in labelled.items()}
    forms: dict[str, Any] = {}
    for name, form in FORMS.items():
        res: dict[str, Any] = {"description": form.description}
        for label, data in labelled.items():
            pooled_x = [f for t in tasks for _, f in data[t]]
            pooled_y = [r["fraction"] for t in tasks for r, _ in data[t]]
            params, err = fit(form, pooled_x, pooled_y)
            per = {k: v for k, v in scored[label][name].items() if k != "description"}
            res[label] = {**per, "pooled": {"params": list(params), "fit_mae": err}}
        forms[name] = res
    eligible, chosen = decide_rule(
        {n: r["seed 0"]["cross_task_mae"] for n, r in forms.items()},
        {n: r["seed mean"]["cross_task_regret"] for n, r in forms.items()},
    )
    out = {
        "rule": f"least cross-task regret against seed means among the forms within {DECIDE_MAE_SLACK} of "
        "the least cross-task MAE against seed 0",
        "tasks": {t: len(labelled["seed 0"][t]) for t in tasks},
        "forms": forms,
        "eligible": eligible,
        "chosen": {
            "form": chosen,
            "params": forms[chosen]["seed mean"]["pooled"]["params"],
            "expected_error": forms[chosen]["seed 0"]["cross_task_mae"],
            # Plans consider no placement smaller than the runs it was fitted on (QualityModel).
            "min_params_share": min(f.params for t in tasks for _, f in labelled["seed 0"][t]),
        },
    }
    write_json(RESULTS / "decision.json", out)
    write_text(RESULTS / "decision.md", _decision_markdown(out))
    return out


def _decision_markdown(out: dict[str, Any]) -> str:
    import numpy as np

    tasks = sorted(out["tasks"])
    lines = [
        "# Quality forms judged by the placements they pick",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g}; the placements of quality.md ("
        + ", ".join(f"{t} {n}" for t, n in out["tasks"].items())
        + "). Each form is fitted on one task and scored on the other. **Regret**: every placement's "
        "parameter share is taken in turn as a budget; among the placements within it, the one the form "
        "predicts best (ties to the fewer parameters) is compared with the best measured one, and the "
        "measured fraction it falls short by is averaged over the budgets. A form off by a constant has no "
        "regret; one that misorders placements of similar cost has. Seed means: sst2's 15 placements and "
        "two of e2e_nlg's were trained at three seeds; elsewhere the seed-0 run.",
        "",
        "| form | cross-task MAE: seed 0 / seed mean | cross-task regret: seed 0 / seed mean | "
        + " | ".join(f"fit on {t}: held-out MAE / regret (seed mean)" for t in tasks)
        + " |",
        "|---|---:|---:|" + "---:|" * len(tasks),
    ]
    for name, res in out["forms"].items():
        a, b = res["seed 0"], res["seed mean"]
        fits = [b[f"fit_on_{t}"] for t in tasks]
        cells = [
            f"{_only(f['held_out_mae']):.3f} / {_only(f['held_out_regret']):.3f} "
            f"({', '.join(f'{x:g}' for x in f['params'])})"
            for f in fits
        ]
        lines.append(
            f"| {name} | {a['cross_task_mae']:.3f} / {b['cross_task_mae']:.3f} | "
            f"{a['cross_task_regret']:.3f} / {b['cross_task_regret']:.3f} | " + " | ".join(cells) + " |"
        )
    c = out["chosen"]
    lines += [
        "",
        f"Rule (set on these two tasks, before any other task was scored with it): {out['rule']}. "
        f"Eligible: {', '.join(out['eligible'])}.",
        f"Chosen: **{c['form']}**, parameters pooled on both tasks' seed means "
        f"({', '.join(f'{x:g}' for x in c['params'])}); expected error {c['expected_error']:.3f} "
        "(its cross-task MAE against seed 0).",
        "",
        "Regret by budget, seed means, each form fitted on the other task (budgets cheapest first):",
        "",
    ]
    for name, res in out["forms"].items():
        for t in tasks:
            other = next(o for o in tasks if o != t)
            each = res["seed mean"][f"fit_on_{other}"]["regret_by_budget"][t]
            lines.append(f"- {name} on {t}: " + " ".join(f"{x:.2f}" for x in each)
                         + f" (mean {float(np.mean(each)):.3f})")  # fmt: skip
    return "\n".join(lines) + "\n"


# The expected-error forms `band` compares, each a function of a placement's uncovered depth share
# u = 1 − coverage: one error for every placement (what plans printed before), a line in u, and two levels
# split at half the depth covered. The rule: the least cross-task error; ties within BAND_TIE to the one
# listed first (the line needs no threshold).
BAND_FORMS = ("line", "step", "constant")
BAND_TIE = 0.001


def _band_fit(form: str, us: list[float], errs: list[float]) -> tuple[float, float]:
    import statistics

    from layercard.plan.quality import fit_error_band

    if form == "constant":
        return statistics.mean(errs), 0.0
    if form == "line":
        return fit_error_band(us, errs)
    low = [e for u, e in zip(us, errs, strict=True) if u <= 0.5]
    high = [e for u, e in zip(us, errs, strict=True) if u > 0.5]
    return statistics.mean(low), statistics.mean(high or low)


def _band_error(form: str, params: tuple[float, float], u: float) -> float:
    a, b = params
    if form == "step":
        return a if u <= 0.5 else b
    return a + b * u


def band() -> dict[str, Any]:
    """The default form's expected error as a function of the depth a placement covers.

    The chosen form (decision.json) is fitted on one task's seed-0 runs and its absolute errors on the other
    task are kept; each BAND_FORMS form is fitted to one task's held-out errors and scored (mean absolute
    difference) on the other's. The rule picks one; its parameters pooled on both tasks' errors are what
    plans use (QualityModel.error_band). Writes RESULTS/band.json and .md; nothing else is refitted.
    """
    import statistics

    from layercard.artifacts import read_json, write_json, write_text
    from layercard.plan.quality import FORMS, fit

    chosen = read_json(RESULTS / "decision.json")["chosen"]
    form = FORMS[chosen["form"]]
    data = _labelled()["seed 0"]
    tasks = sorted(data)
    held: dict[str, list[dict[str, Any]]] = {}
    for fit_task in tasks:
        params, _ = fit(form, [f for _, f in data[fit_task]], [r["fraction"] for r, _ in data[fit_task]])
        for t in (o for o in tasks if o != fit_task):
            held[t] = [
                {"name": r["name"], "coverage": f.coverage, "uncovered": 1.0 - f.coverage,
                 "measured": r["fraction"], "predicted": form.fn(f, params),
                 "error": abs(form.fn(f, params) - r["fraction"]), "fit_on": fit_task}
                for r, f in data[t]
            ]  # fmt: skip
    forms: dict[str, Any] = {}
    for name in BAND_FORMS:
        res: dict[str, Any] = {}
        for fit_task in tasks:
            us, es = [x["uncovered"] for x in held[fit_task]], [x["error"] for x in held[fit_task]]
            p = _band_fit(name, us, es)
            scored = {
                t: statistics.mean(abs(_band_error(name, p, x["uncovered"]) - x["error"]) for x in held[t])
                for t in tasks
                if t != fit_task
            }
            res[f"fit_on_{fit_task}"] = {"params": list(p), "held_out": scored}
        res["cross_task"] = statistics.mean(v for t in tasks for v in res[f"fit_on_{t}"]["held_out"].values())
        pooled = [x for t in tasks for x in held[t]]
        res["pooled"] = list(_band_fit(name, [x["uncovered"] for x in pooled], [x["error"] for x in pooled]))
        forms[name] = res
    least = min(r["cross_task"] for r in forms.values())
    pick = next(n for n in BAND_FORMS if forms[n]["cross_task"] <= least + BAND_TIE)
    out = {
        "model": {"form": chosen["form"], "expected_error": chosen["expected_error"]},
        "rule": f"least cross-task error; ties within {BAND_TIE} to the first of {', '.join(BAND_FORMS)}",
        "forms": forms,
        "chosen": {"form": pick, "params": forms[pick]["pooled"]},
        "held_out": held,
    }
    write_json(RESULTS / "band.json", out)
    write_text(RESULTS / "band.md", _band_markdown(out, tasks))
    return out


def _band_markdown(out: dict[str, Any], tasks: list[str]) -> str:
    import statistics

    rows = [x for t in tasks for x in out["held_out"][t]]
    groups = sorted({round(x["coverage"], 3) for x in rows})
    lines = [
        "# The quality model's expected error by the depth a placement covers",
        "",
        f"smollm2, {STEPS} steps of batch {BATCH}, lr {LR:g}, seed-0 runs of quality.md. The default form "
        f"(`{out['model']['form']}`) is fitted on one task and its absolute error kept on each placement of "
        "the other; those errors are what an expected error has to describe. Coverage: the share of six "
        "equal depth bands that hold an adapted unit; u = 1 − coverage.",
        "",
        "| coverage | placements | mean absolute error on the task not used to fit |",
        "|---:|---:|---:|",
    ]
    for g in groups:
        es = [x["error"] for x in rows if round(x["coverage"], 3) == g]
        lines.append(f"| {g:.2f} | {len(es)} | {statistics.mean(es):.3f} |")
    lines += [
        "",
        "Each expected-error form is fitted to one task's errors and scored on the other's (mean absolute "
        "difference between the form's expected error and the error measured):",
        "",
        "| form | "
        + " | ".join(f"fitted to {t}'s errors: parameters / score on the other's" for t in tasks)
        + " | cross-task | pooled parameters |",
        "|---|" + "---|" * len(tasks) + "---:|---|",
    ]
    desc = {"constant": "constant a", "line": "a + b·u", "step": "a if u ≤ 0.5, else b"}
    for name, res in out["forms"].items():
        cells = [
            f"{', '.join(f'{v:.3f}' for v in res[f'fit_on_{t}']['params'])} / "
            f"{_only(res[f'fit_on_{t}']['held_out']):.3f}"
            for t in tasks
        ]
        lines.append(
            f"| {name} ({desc[name]}) | "
            + " | ".join(cells)
            + f" | {res['cross_task']:.3f} | "
            + ", ".join(f"{v:.3f}" for v in res["pooled"])
            + " |"
        )
    c = out["chosen"]
    lines += [
        "",
        f"Rule: {out['rule']}. Chosen: **{c['form']}**, pooled parameters "
        + ", ".join(f"{v:.3f}" for v in c["params"])
        + ": plans print that expected error for each placement.",
    ]
    return "\n".join(lines) + "\n"


def longer(steps: int) -> dict[str, Any]:
    """The default model at another run length: each placement re-run for ``steps`` steps (``run --steps``)
    against its own 36-step run and the default's prediction and expected error, which do not depend on the
    steps. Writes RESULTS/steps{steps}.json and .md."""
    import statistics

    from layercard.artifacts import read_json, write_json, write_text
    from layercard.plan.quality import TWO_TASK_MODEL

    model = TWO_TASK_MODEL
    out: dict[str, Any] = {"steps": steps, "base_steps": STEPS, "model": model.describe(), "tasks": {}}
    for name in TASKS:
        ref_path = _run_path(name, "ref", SEED, steps)
        if not ref_path.is_file():
            continue
        base = read_json(RESULTS / "runs" / f"{name}-base.json")["test_loss"]
        ref_long, ref_short = read_json(ref_path), read_json(_run_path(name, "ref"))
        runs = []
        for p in GRID[1:]:
            path = _run_path(name, p.name, SEED, steps)
            if not path.is_file():
                continue
            r, short = read_json(path), read_json(_run_path(name, p.name))
            f = _features(name, r)
            runs.append(
                {"name": p.name, "coverage": f.coverage, "params_share": f.params,
                 "fraction": (base - r["test_loss"]) / (base - ref_long["test_loss"]),
                 "fraction_base_steps": (base - short["test_loss"]) / (base - ref_short["test_loss"]),
                 "test_loss": r["test_loss"], "test_loss_base_steps": short["test_loss"],
                 "predicted": model.predict(f), "expected_error": model.error(f)}
            )  # fmt: skip
        for r in runs:
            r["error"] = abs(r["fraction"] - r["predicted"])
            r["error_base_steps"] = abs(r["fraction_base_steps"] - r["predicted"])
        out["tasks"][name] = {
            "base_loss": base,
            "reference_loss": ref_long["test_loss"],
            "reference_loss_base_steps": ref_short["test_loss"],
            "runs": runs,
            "mae": statistics.mean(r["error"] for r in runs) if runs else None,
            "mae_base_steps": statistics.mean(r["error_base_steps"] for r in runs) if runs else None,
        }
    write_json(RESULTS / f"steps{steps}.json", out)
    write_text(RESULTS / f"steps{steps}.md", _longer_markdown(out))
    return out


def _longer_markdown(out: dict[str, Any]) -> str:
    n, n0 = out["steps"], out["base_steps"]
    lines = [
        f"# The quality model at {n} steps instead of {n0}",
        "",
        f"smollm2, batch {BATCH}, lr {LR:g} constant, seed {SEED}, the same test examples; each placement "
        f"and the reference re-run for {n} steps (`benchmarks/quality.py run --steps {n}`). The default "
        "model's prediction and expected error do not depend on the run's length.",
        "",
    ]
    for task, v in out["tasks"].items():
        lines += [
            f"## {task}",
            "",
            f"Base test loss {v['base_loss']:.4f}; the reference's "
            f"{v['reference_loss_base_steps']:.4f} after {n0} steps, {v['reference_loss']:.4f} after {n}. "
            "Mean absolute error of the default: "
            f"{v['mae_base_steps']:.3f} at {n0} steps, **{v['mae']:.3f}** at {n} (these placements only).",
            "",
            f"| placement | coverage | params share | measured at {n0} | measured at {n} | "
            f"predicted ± expected error | error at {n0} | error at {n} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in v["runs"]:
            lines.append(
                f"| {r['name']} | {r['coverage']:.2f} | {r['params_share']:.3f} | "
                f"{r['fraction_base_steps']:.3f} | {r['fraction']:.3f} | "
                f"{r['predicted']:.3f} ± {r['expected_error']:.3f} | "
                f"{r['error_base_steps']:.3f} | {r['error']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


COMMANDS = (
    "run",
    "curve",
    "summary",
    "fit",
    "noise",
    "seedmean",
    "warp",
    "saturation",
    "noisecurve",
    "decide",
    "band",
    "longer",
    "noisecoverage",
    "wide",
    "couplingcoverage",
    "targetcoverage",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "what",
        choices=COMMANDS,
    )
    ap.add_argument("--tasks", default="e2e_nlg,sst2")
    ap.add_argument("--only", default=None, help="comma-separated grid names")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"training seed (default {SEED})")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    ap.add_argument(
        "--scheduler", default=SCHEDULER, choices=("constant", "linear", "cosine"),
        help=f"learning-rate schedule of `run` (default {SCHEDULER}; others under RESULTS/runs/<schedule>/)",
    )  # fmt: skip
    ap.add_argument(
        "--wide", action="store_true",
        help="`run`: also measure each run on the task's larger test set (under RESULTS/runs/wide/)",
    )  # fmt: skip
    a = ap.parse_args()
    if a.what == "wide":
        res = wide()
        print(
            {
                t: {k: v.get("one_run_vs_other_seeds_mean") for k, v in r.items()}
                for t, r in res["tasks"].items()
            }
        )
        return
    if a.what == "run":
        print(f"python {platform.python_version()}, {sys.platform}", flush=True)
        only = set(a.only.split(",")) if a.only else None
        run(a.tasks.split(","), only, a.threads, a.seed, steps=a.steps, scheduler=a.scheduler, wide=a.wide)
    if a.what == "curve":
        run(a.tasks.split(","), set(a.only.split(",")) if a.only else None, a.threads, curves=True)
        return
    if a.what == "noise":
        import json

        print(json.dumps(noise(a.scheduler), indent=1))
        return
    if a.what == "seedmean":
        import json

        print(json.dumps(seedmean(), indent=1))
        return
    if a.what == "warp":
        import json

        res = warp()
        print(json.dumps({k: {m: v[m]["cross_task_mae"] for m in ("seed 0", "seed mean")}
                          for k, v in res["probe_steps"].items()}, indent=1))  # fmt: skip
        return
    if a.what == "saturation":
        import json

        res = saturation()
        labels = ("seed 0", "seed mean")
        maes = {k: {m: v[m]["cross_task_mae"] for m in labels} for k, v in res["variants"].items()}
        print(json.dumps(maes | {"pooled": res["pooled"]}, indent=1))
        return
    if a.what == "noisecurve":
        import json

        res = noisecurve()
        print(json.dumps(res, indent=1))
        return
    if a.what in ("noisecoverage", "couplingcoverage", "targetcoverage"):
        res = {"noisecoverage": noisecoverage, "couplingcoverage": couplingcoverage,
               "targetcoverage": targetcoverage}[a.what]()  # fmt: skip
        print(res["rule"]["eligible"], "->", res["rule"]["chosen"])
        return
    if a.what == "longer":
        res = longer(a.steps)
        print({t: (v["mae_base_steps"], v["mae"]) for t, v in res["tasks"].items()})
        return
    if a.what == "band":
        res = band()
        print(res["rule"], "->", res["chosen"])
        return
    if a.what == "decide":
        res = decide()
        print(res["rule"], "->", res["chosen"])
        return
    if a.what == "fit":
        import json

        print(json.dumps(fit(), indent=1))
        return
    summary()


if __name__ == "__main__":
    main()
