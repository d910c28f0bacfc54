"""Commands of the train stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from layercard.cli.app import (
    TrustOpt,
    app,
    console,
    emit_json,
    given,
    guard,
    load_cli_model,
    named_for_code,
    note,
    note_examples,
    note_task,
    note_unused,
    out_folder,
    progress_flag,
    result_console,
)
from layercard.cli.options import config_options
from layercard.cli.task_options import SPLIT_HELP, TaskOpt, task_options
from layercard.config import TrainConfig
from layercard.errors import LayercardError, setting_name
from layercard.progress import count, layers_text

if TYPE_CHECKING:
    from layercard.tasks import Task


def _val_task(train: Task, task: str, val_task: str | None, val_split: str | None, seed: int, kw: dict):
    """The validation task: as given; a ``--val-task`` that names no split of its own (and is no file), and
    ``--task`` without either option, are read on their validation split, else their test split. Never the
    training examples themselves."""
    from layercard.tasks import validation_task

    held_out = val_task is None and val_split is None  # --task's held-out split; a file has none
    option = "--val-task" if val_task is not None else "--val-split"
    spec = val_task or task
    try:
        val = validation_task(val_task, val_split, task, train.split, seed=seed, **kw)
    except LayercardError as e:  # two tasks are named on the line: say which one this is
        if held_out:
            raise
        raise LayercardError(f"{option}: {e}", exit_code=e.exit_code) from e
    if val is None and val_task is not None:
        raise LayercardError(
            f"{option}: {spec}: found no validation or test split; name one with --val-split"
        )
    if val is None:
        return None
    shared = val.shared_with(train)
    # every example shared (an empty split shares none: it is no copy of the training data)
    if val.data_hash == train.data_hash or shared == len(val) > 0:
        where = f"--task {task}: its {val.split} split" if held_out else f"{option}: {spec} ({val.split})"
        raise LayercardError(
            f"{where} holds the same examples as --task ({train.split}): the run would validate on its "
            "training examples; give another --val-split or --val-task"
        )
    if shared:
        where = f"--task {task}: its {val.split} split" if held_out else option
        note(f"{where}: {shared} of {len(val)} validation examples are also training examples")
    return val


def _beside(task: str) -> str:
    """Where ``task`` is one file of a folder that holds a validation or test split beside it, the hint to
    name the folder (its splits then held out); else nothing."""
    from layercard.tasks.formats import split_files

    p = Path(task)
    try:
        files = split_files(p.parent) if p.is_file() and p.stem in ("train", "training") else None
    except LayercardError:  # the folder is no dataset (two files of a split): no hint
        return ""
    held = [s for s in ("validation", "test") if files and s in files]
    if not held:
        return ""
    shown = files[held[0]][0].name if len(files[held[0]]) == 1 else f"{len(files[held[0]])} Parquet shards"
    return f", or --task {p.parent} to hold out its {held[0]} split, {shown}"


@app.command("train")
@guard
@config_options(TrainConfig, rename={"dtype": "precision"})  # --dtype here is the loaded weights' dtype
@task_options
def train_cmd(
    plan: Annotated[Path, typer.Option("--plan", "-p", help="plan.json from `layercard plan`.")],
    task: TaskOpt,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run folder: adapter/, train_metrics.json, checkpoints/ (required to train)."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help=f"Training split for preset/synthetic tasks (default: train). {SPLIT_HELP}"),
    ] = None,
    val_task: Annotated[
        str | None,
        typer.Option(
            help="Validation task (default: --task). Without a split of its own or --val-split, its "
            "validation split, else its test split; never the training examples."
        ),
    ] = None,
    val_split: Annotated[str | None, typer.Option(help=f"Validation split. {SPLIT_HELP}")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the plan's card model).")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the adapter's initialisation, dropout and data order, and of the tasks' subsets "
            "(a synthetic task is generated from it too: give the card's seed to train on its entities)."
        ),
    ] = 0,
    kind: Annotated[
        str | None, typer.Option(help="lora | houlsby | parallel (default: the plan's kind).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")
    ] = False,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype of the loaded base: float32 | bfloat16 | float16.")
    ] = "float32",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print train_metrics as JSON.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Train nothing, write nothing: print the run's steps, the padded positions its batches "
            "compute, the plan's step time and peak memory priced there, and the budgets they put over.",
        ),
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="With --dry-run: price the run as launched in N processes, one per device (default: the "
            "launch's WORLD_SIZE, else 1). Train in N processes with accelerate launch.",
        ),
    ] = None,
    cfg: TrainConfig | None = None,
    task_kw: dict | None = None,
) -> None:
    """Train the adapters a plan places; write adapter/, train_metrics.json and checkpoints/ under --out."""
    from layercard.artifacts import check_unlocked
    from layercard.plan import Plan, check_model_matches
    from layercard.tasks import is_file_spec, load_task
    from layercard.train import METRICS_FILE, check_plan_settings, is_launch_main, launch_world, train

    assert cfg is not None  # built by config_options before anything loads, so a typo costs no time
    if resume and dry_run:
        raise LayercardError("--resume: a dry run trains nothing to resume; drop --resume or --dry-run")
    if processes is not None and not dry_run:
        raise LayercardError(
            "--processes: only with --dry-run; to train in N processes, use accelerate launch "
            "--num_processes N -m layercard train ..."
        )
    if not dry_run:
        if out is None:
            raise LayercardError("--out: required (the run folder), except with --dry-run")
        out_folder(out)
        if is_launch_main():  # at once; train() takes the lock once the model is loaded
            check_unlocked(out, what="training folder")
        if (out / METRICS_FILE).is_file():
            # --resume too: it continues an interrupted run; a finished one's adapter and figures stay
            raise LayercardError(
                f"--out {out}: holds a finished run ({METRICS_FILE}); use a new --out, or remove the "
                "folder to train it again"
            )
    p = Plan.load(plan)
    check_plan_settings(p, cfg, kind, where=str(plan))  # before the model loads
    if (kind or p.kind) == "lora" and cfg.bottleneck is not None:
        note_unused("--bottleneck", "on LoRA adapters (it is the width of houlsby and parallel ones)")
    if cfg.init != "eva" and given("eva_rho"):
        note_unused("--eva-rho", "without --init eva")
    model_spec = model or p.card.get("model_id")
    if not model_spec:
        raise LayercardError(f"{plan}: the plan names no model; pass --model")
    if model is None:
        named_for_code(model_spec, str(plan), trust_remote_code)
    kw = task_kw or {}
    train_t = load_task(task, split=split, seed=seed, **kw)
    note_task(train_t)
    val_t = _val_task(train_t, task, val_task, val_split, seed, kw) if cfg.eval_examples else None
    if cfg.eval_examples and val_t is None:
        what = "is one file, with no other split" if is_file_spec(task) else "has no validation or test split"
        if cfg.keeps_best:  # before the model loads
            raise LayercardError(
                f"{setting_name(cfg.best_setting)}: chooses among validations, and "
                f"--task {task} {what}; give --val-task{_beside(task)}"
            )
        note(f"--task {task} {what}: validation is off (give --val-task to validate{_beside(task)})")
    loaded = load_cli_model(model_spec, dtype, "auto", trust_remote_code)  # Accelerate places it
    check_model_matches(p, loaded, where=str(plan))
    if dry_run:
        from layercard.train import estimate

        est = estimate(loaded, p, train_t, val_t, cfg, kind=kind, processes=processes or launch_world())
        if not is_launch_main():  # launched: one process says it for all
            return
        if json_out:
            emit_json(est)
        else:
            _print_estimate(est, plan)
        if cfg.early_stopping:
            note(
                f"--early-stopping {cfg.early_stopping}: the run may end at a validation (every "
                f"{cfg.eval_every} steps) before its {est['steps']:,}; the figures above are for all of them"
            )
        return
    assert out is not None
    metrics = train(
        loaded, p, train_t, val_t, cfg, out, resume=resume, progress=progress_flag(json_out), kind=kind
    )
    if not is_launch_main():  # launched: the first process wrote the files, and it says so for all
        return
    note_examples("--train-examples", cfg.train_examples, int(metrics["task"]["n_examples"]))
    if metrics.get("val_task"):
        note_examples("--eval-examples", cfg.eval_examples, int(metrics["val_task"]["n_examples"]))
    if json_out:
        emit_json(metrics)
        return
    _print_summary(metrics)
    result_console.print(f"wrote {out / 'adapter'} and {out / 'train_metrics.json'}", markup=False)


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _print_estimate(e: dict[str, Any], plan: Path) -> None:
    """The dry run's table, its budget warnings and how to plan at these positions."""
    from layercard.cost import memory_kind_text
    from layercard.report import seconds_text
    from layercard.tasks import cut_text

    n = e["processes"]
    where, busiest = ("one process", "") if n == 1 else (f"{n} processes", ", the busiest process's")
    tbl = Table(
        title=f"train --dry-run · {e['kind']} · {count(e['steps'], 'step')} ({where})", show_header=False
    )
    tbl.add_column("what")
    tbl.add_column("value", justify="right")
    tbl.add_row("steps (epochs)", f"{e['steps']:,} ({e['epochs']:.2f})")
    tbl.add_row("training / validation examples", f"{e['train_examples']:,} / {e['val_examples']:,}")
    tbl.add_row(
        f"padded positions per step{busiest} (plan's)",
        f"{e['positions_per_step']:,.1f} ({_fmt(e['plan_positions_per_step'], ',.0f')})",
    )
    tbl.add_row(
        f"largest micro-batch's positions{' of any process' if n > 1 else ''} (plan's)",
        f"{e['max_positions']:,} ({_fmt(e['plan_peak_positions'], ',.0f')})",
    )
    tbl.add_row(
        "predicted s/step at these positions (plan's)",
        f"{_fmt(e['step_time_at_run_s'], '.3f')} ({_fmt(e['step_time_s'], '.3f')})",
    )
    tbl.add_row("predicted time of the optimizer steps", seconds_text(e["steps_s"]))
    tbl.add_row(
        f"predicted peak memory ({memory_kind_text(e['peak_memory_kind'])}; plan's)",
        f"{_fmt(e['peak_memory_at_run_mib'], ',.0f')} ({_fmt(e['peak_memory_mib'], ',.0f')}) MiB",
    )
    result_console.print(tbl)
    if e["step_time_s"] is None and e["peak_memory_mib"] is None:
        result_console.print(
            "The plan holds no step time or peak memory to price: its card was measured without the cost "
            "calibration (--no-calibrate).",
            markup=False,
        )
    else:
        leaves_out = "validation, checkpoints and loading"
        leaves_out += ", and the exchange of gradients" if n > 1 else ""
        result_console.print(
            f"The step time leaves out {leaves_out}; figures are the cost model's, calibrated by the card.",
            markup=False,
        )
    cut = cut_text(
        e["train_examples_cut"],
        e["train_examples"],
        e["max_length"],
        "training",
        e["train_examples_clipped"],
        tuple(e["format_limits"]),
    )
    if cut:
        console.print(cut, markup=False)
    if e["card_note"]:
        console.print(f"note: {e['card_note']}", markup=False)
    for line in e["budget_notes"]:
        console.print(f"warning: {line}", markup=False)
    result_console.print(
        f"to plan at these positions: layercard plan ... --step-positions {e['positions_per_step']:.1f} "
        f"--peak-positions {e['max_positions']} (this plan: {plan})",
        markup=False,
    )


def _print_summary(m: dict[str, Any]) -> None:
    from layercard.cost import memory_kind_text
    from layercard.report import (
        measured_step_text,
        memory_figure_note,
        predicted_forward_s,
        predicted_peak_mib,
    )
    from layercard.train import TrainMetrics

    tm = TrainMetrics.from_dict(m)
    plan = m["plan"]
    layers = (m.get("adapted") or plan)["layers"]  # as trained (older files: as planned)
    tbl = Table(
        title=f"train · {m['adapter_kind']} · layers {layers_text(layers)} · {count(m['steps'], 'step')}",
        show_header=False,
    )
    tbl.add_column("what")
    tbl.add_column("value", justify="right")
    total = m["total_params"] or 1
    tbl.add_row("trainable params", f"{m['trainable_params']:,} ({100 * m['trainable_params'] / total:.3f}%)")
    pred = m.get("predicted_step_time_s")
    ratio = m.get("step_time_ratio")
    tbl.add_row(
        "s/step measured (10th–90th percentile) / predicted",
        f"{measured_step_text(m['s_per_step'], m.get('s_per_step_spread'))} / {_fmt(pred, '.3f')}"
        + (f"  (×{ratio:.2f})" if ratio else ""),
    )
    scaled = m.get("predicted_step_time_scaled_s")
    if scaled:
        tbl.add_row("predicted s/step at this run's tokens/step", _fmt(scaled, ".3f"))
    tbl.add_row("tokens/s", _fmt(m["tokens_per_s"], ",.0f"))
    peak_pred = predicted_peak_mib(tm)
    tbl.add_row(
        f"peak memory ({memory_kind_text(m['peak_memory_kind'])}) measured / predicted",
        f"{m['peak_memory_mib']:,.0f} / {_fmt(peak_pred, ',.0f')} MiB"
        + (f"  (×{m['peak_memory_ratio']:.2f})" if m.get("peak_memory_ratio") else "")
        + memory_figure_note(m.get("predicted_memory_figure")),
    )
    if m.get("training_memory_ratio"):
        start = m["peak_memory_start_mib"]
        tbl.add_row(
            "memory training added measured / predicted",
            f"{m['peak_memory_mib'] - start:,.0f} / {m['predicted_training_memory_mib']:,.0f} MiB"
            f"  (×{m['training_memory_ratio']:.2f})",
        )
    if m.get("peak_memory_at_start_ratio"):
        tbl.add_row(
            "peak memory measured / predicted from this run's start",
            f"{m['peak_memory_mib']:,.0f} / {m['predicted_peak_memory_at_start_mib']:,.0f} MiB"
            f"  (×{m['peak_memory_at_start_ratio']:.2f})",
        )
    if m.get("forward_s") is not None:
        fwd_pred = predicted_forward_s(tm)
        tbl.add_row(
            "unmerged forward s measured / predicted",
            f"{m['forward_s']:.3f} / {_fmt(fwd_pred, '.3f')}"
            + (f"  (×{m['forward_ratio']:.2f})" if m.get("forward_ratio") else ""),
        )
    tbl.add_row(
        "train loss first → last",
        f"{_fmt(m['first_train_loss'], '.4f')} → {_fmt(m['final_train_loss'], '.4f')}",
    )
    tbl.add_row("final val loss", _fmt(m["final_val_loss"], ".4f"))
    if (kept := tm.kept_text()) is not None:
        tbl.add_row("adapter weights", kept)
    if (clipped := tm.clipped_text()) is not None:
        tbl.add_row("gradients clipped", clipped)
    if m.get("resumed_from") is not None:
        tbl.add_row("resumed from step", str(m["resumed_from"]))
    result_console.print(tbl)
    for line in m.get("budget_notes") or []:
        console.print(f"warning: {line}", markup=False)
