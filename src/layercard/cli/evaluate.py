"""Commands of the evaluate stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from layercard.cli.app import (
    AdapterModelOpt,
    DeviceOpt,
    DtypeOpt,
    TrustOpt,
    adapter_model,
    app,
    check_adapter,
    console,
    emit_json,
    guard,
    load_cli_model,
    note,
    note_examples,
    note_generation,
    note_replaced,
    note_task,
    out_folder,
    plain,
    progress_flag,
    result_console,
)
from layercard.cli.options import config_options
from layercard.cli.task_options import SPLIT_HELP, TaskOpt, task_options
from layercard.config import EvalConfig


@app.command("eval")
@guard
@config_options(EvalConfig)
@task_options
def eval_cmd(
    task: TaskOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval.json and predictions.jsonl.")],
    model: AdapterModelOpt = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="PEFT or layercard adapter folder to evaluate.")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Split of a preset, synthetic, hf: or saved DatasetDict task (default: test, else "
            f"validation; hf: validation). {SPLIT_HELP}"
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
    from layercard.artifacts import writer_lock
    from layercard.evaluate import EVAL_FILE, evaluate, resolve_eval_task

    assert cfg is not None  # built by config_options before anything loads: a typo costs no time
    if adapter is not None:
        check_adapter(adapter)
    model_spec = adapter_model(model, adapter, trust_remote_code)  # before anything is read or written
    out_folder(out)
    earlier = (out / EVAL_FILE).is_file()
    with writer_lock(out, what="eval folder"):
        t, fallback = resolve_eval_task(task, split=split, seed=seed, **(task_kw or {}))
        if fallback:
            note(fallback)
        note_task(t)
        column = ((task_kw or {}).get("field_map") or {}).get("references")
        if column and all(ex.references == (ex.target,) for ex in t.examples):
            # one map serves every split, so a split without the column is read without it
            note(
                f"--field references={column}: no evaluated record holds more than its target there; each is "
                "scored against its target alone"
            )
        note_generation(adapter, t)
        loaded = load_cli_model(model_spec, dtype, device, trust_remote_code)
        result = evaluate(loaded, t, cfg, adapter=adapter, progress=progress_flag(json_out))
        path = result.save(out)
    note_replaced(path, "evaluation", earlier)
    note_examples("--examples", cfg.examples, result.n)
    for said in (result.cut_note(), result.tool_call_note()):
        if said:
            console.print(said, markup=False)
    if json_out:
        d = result.to_dict(include_predictions=False)
        emit_json({**d, "eval": str(path), "predictions": str(out / d["predictions_file"])})
        return
    _print_result(result)
    result_console.print(f"wrote {path} and {out / 'predictions.jsonl'}", markup=False)


def _print_result(result) -> None:
    from layercard.tasks import metric_scale

    task = f"{plain(result.task['name'])} ({result.task['split']})"
    title = f"eval · {plain(result.provenance['model_id'])} · {task}"
    if result.adapter:
        title += f" · adapter {plain(result.adapter)}"
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
    result_console.print(tbl)
