"""Commands of the evaluate stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from layercard.cli.app import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    TaskOpt,
    TrustOpt,
    app,
    console,
    emit_json,
    guard,
    load_cli_model,
    note,
    note_examples,
    note_generation,
    note_task,
    progress_flag,
)
from layercard.cli.options import config_options
from layercard.cli.task_options import task_options
from layercard.config import EvalConfig
from layercard.errors import LayercardError


@app.command("eval")
@guard
@config_options(EvalConfig)
@task_options
def eval_cmd(
    model: ModelOpt,
    task: TaskOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval.json and predictions.jsonl.")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="PEFT or layercard adapter folder to evaluate.")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Split for preset/synthetic tasks (default: test, else validation; hf: validation)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the example subset and of synthetic tasks.")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    cfg: EvalConfig | None = None,
    task_kw: dict | None = None,
) -> None:
    """Generate greedily on a task, score it with the task metrics and write eval.json + predictions.jsonl."""
    from layercard.artifacts import check_out_folder, writer_lock
    from layercard.evaluate import evaluate

    assert cfg is not None  # built by config_options before anything loads: a typo costs no time
    if adapter is not None and not adapter.is_dir():
        what = "is a file, not an adapter folder" if adapter.exists() else "no such folder"
        raise LayercardError(f"--adapter {adapter}: {what}")
    check_out_folder(out)
    with writer_lock(out, what="eval folder"):
        t = _eval_task(task, split, seed, task_kw or {})
        note_task(t)
        note_generation(adapter, t.source)
        loaded = load_cli_model(model, dtype, device, trust_remote_code)
        result = evaluate(loaded, t, cfg, adapter=adapter, progress=progress_flag(json_out))
        path = result.save(out)
    note_examples("--examples", cfg.examples, result.n)
    if json_out:
        d = result.to_dict(include_predictions=False)
        emit_json({**d, "eval": str(path), "predictions": str(out / d["predictions_file"])})
        return
    _print_result(result)
    console.print(f"wrote {path} and {out / 'predictions.jsonl'}", markup=False)


def _eval_task(spec: str, split: str | None, seed: int, kw: dict) -> Any:
    """The task to score: ``split`` when given; else a file as it is; else test, then validation (a
    task's default split is its training one, which an evaluation should not score unasked)."""
    from layercard.tasks import held_out, is_file_spec, load_task, names_split

    if split is None and spec.startswith("hf:"):
        # a hub dataset's test labels may be hidden (GLUE's are -1): its validation split, as trim takes
        return load_task(spec, split="validation", seed=seed, **kw)
    if split is None and not is_file_spec(spec) and not names_split(spec):
        task = held_out(spec, seed=seed, order=("test", "validation"), **kw)
        if task is not None:
            return task
        note(f"--task {spec} has no test or validation split: scoring its default split")
    return load_task(spec, split=split, seed=seed, **kw)


def _print_result(result) -> None:
    from layercard.tasks import metric_scale

    title = f"eval · {result.provenance['model_id']} · {result.task['name']} ({result.task['split']})"
    if result.adapter:
        title += f" · adapter {result.adapter}"
    tbl = Table(title=title)
    tbl.add_column("metric")
    tbl.add_column("value", justify="right")
    for i, (name, value) in enumerate(result.metrics.items()):
        # BLEU keeps sacrebleu's 0-100 scale; the rest are fractions
        shown = f"{value:.2f}" if metric_scale(name) > 1 else f"{value:.4f}"
        tbl.add_row(name + (" (primary)" if i == 0 else ""), shown)
    tbl.add_row("loss", "-" if result.loss is None else f"{result.loss:.4f}")
    tbl.add_row("n", str(result.n))
    tbl.add_row("s/example", f"{result.timing['s_per_example']:.3f}")
    tbl.add_row("tokens/s", f"{result.timing['tokens_per_s']:.1f}")
    console.print(tbl)
