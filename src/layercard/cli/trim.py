"""Commands of the boundary/trim stage: trace and trim."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from layercard.artifacts import writer_lock
from layercard.cli.app import (
    AdapterModelOpt,
    DeviceOpt,
    DtypeOpt,
    TrustOpt,
    adapter_model,
    app,
    check_adapter,
    emit_json,
    guard,
    load_cli_model,
    note,
    note_examples,
    note_generation,
    note_replaced,
    out_folder,
    plain,
    progress_flag,
    result_console,
)
from layercard.cli.options import config_options
from layercard.cli.task_options import SPLIT_HELP, TaskOpt, task_options
from layercard.config import TraceConfig, TrimConfig
from layercard.errors import LayercardError
from layercard.progress import count

AdapterOpt = Annotated[
    Path, typer.Option("--adapter", "-a", help="Trained adapter folder (PEFT LoRA or layercard bottleneck).")
]
SplitOpt = Annotated[
    str | None,
    typer.Option(help=f"Split (default: the task's validation split, else its test split). {SPLIT_HELP}"),
]


def _validation_task(spec: str, split: str | None, seed: int, kw: dict | None = None) -> Any:
    """The task to score on: ``split`` when given; else a file as it is; else validation, then test."""
    from layercard.tasks import held_out, is_file_spec, load_task, names_split

    kw = kw or {}
    if split is not None or is_file_spec(spec) or names_split(spec):
        return load_task(spec, split=split, seed=seed, **kw)
    task = held_out(spec, seed=seed, **kw)
    if task is None and spec.startswith("hf:"):  # a hub task's default split is its training one
        raise LayercardError(f"task {spec}: has no validation or test split; name one with --split")
    return (
        task if task is not None else load_task(spec, seed=seed, **kw)
    )  # the loader's own error, or default


# ---------------------------------------------------------------------------------------------
@app.command("trace")
@guard
@config_options(TraceConfig)
@task_options
def trace_cmd(
    adapter: AdapterOpt,
    task: TaskOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for trace.json and trace.png.")],
    model: AdapterModelOpt = None,
    split: SplitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the example subset and of synthetic tasks.")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the trace as JSON.")] = False,
    cfg: TraceConfig | None = None,
    task_kw: dict | None = None,
) -> None:
    """Logit lens per layer (P of the gold target tokens), adapter on and off; boundary candidates."""
    from layercard.trim import TRACE_FILE, run_trace
    from layercard.trim.run import check_out_of_adapter

    assert cfg is not None  # built by config_options
    check_adapter(adapter)
    model_spec = adapter_model(model, adapter, trust_remote_code)  # before anything is read or written
    check_out_of_adapter(out, adapter)
    out_folder(out)
    earlier = (out / TRACE_FILE).is_file()
    with writer_lock(out, what="trace folder"):
        t = _validation_task(task, split, seed, task_kw)
        note_generation(adapter, t)
        loaded = load_cli_model(model_spec, dtype, device, trust_remote_code)
        tr = run_trace(loaded, adapter, t, cfg, progress=progress_flag(json_out))
        path, png = tr.save(out)
    note_replaced(path, "trace", earlier)
    note_examples("--examples", cfg.examples, tr.n_examples)
    if json_out:
        emit_json({**tr.to_dict(), "trace": str(path), "figure": str(png)})
        return
    tbl = Table(
        title=f"logit lens · {plain(loaded.model_id)} · {plain(t.name)} ({t.split}) · "
        f"adapter {plain(adapter)}",
        caption="P on / P off: the mean probability of the gold target tokens read at the layer, adapter "
        "on / off; bold: a boundary candidate",
    )
    for col in ("layer", "P on", "P off", "adapted"):
        tbl.add_column(col, justify="right")
    marks = {v: k for k, v in tr.candidates.items()}
    for i, (p_on, p_off) in enumerate(zip(tr.curve_on, tr.curve_off, strict=True)):
        tbl.add_row(
            str(i), f"{p_on:.4f}", f"{p_off:.4f}", "•" if i in tr.adapted_layers else "",
            style="bold" if i in marks else None,
        )  # fmt: skip
    result_console.print(tbl)
    cands = ", ".join(f"{k.replace('_', ' ')} at layer {v}" for k, v in tr.candidates.items())
    result_console.print(f"boundary candidates: {cands}")
    result_console.print(f"wrote {path} and {png}", markup=False)


# ---------------------------------------------------------------------------------------------
@app.command("trim")
@guard
@config_options(TrimConfig)
@task_options
def trim_cmd(
    adapter: AdapterOpt,
    task: TaskOpt,
    model: AdapterModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for trim.json, trim.png and adapter-trimmed/ (default: the adapter's parent).",
        ),
    ] = None,
    split: SplitOpt = None,
    export_merged: Annotated[
        Path | None,
        typer.Option("--export-merged", help="Also save the base with the trimmed LoRA merged here."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the example subset and of synthetic tasks.")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print trim.json as JSON.")] = False,
    cfg: TrimConfig | None = None,
    task_kw: dict | None = None,
) -> None:
    """Sweep the boundary layer K, pick the best, export adapter-trimmed/ (and optionally a merged model)."""
    from layercard.trim import TRIM_FILE, capped_text, trim
    from layercard.trim.run import TRIM_PNG, check_out_of_adapter

    assert cfg is not None  # built by config_options
    check_adapter(adapter)
    model_spec = adapter_model(model, adapter, trust_remote_code)  # before anything is read or written
    check_out_of_adapter(out if out is not None else adapter.resolve().parent, adapter)
    out_dir = out_folder(
        out if out is not None else adapter.resolve().parent,
        "--out" if out is not None else "the adapter's folder",
    )
    earlier = (out_dir / TRIM_FILE).is_file()
    if export_merged is not None:
        from layercard.trim.run import check_merged_folder

        out_folder(export_merged, "--export-merged")
        check_merged_folder(export_merged, adapter, out_dir)
    with writer_lock(out_dir, what="trim folder"):
        t = _validation_task(task, split, seed, task_kw)
        note_generation(adapter, t)
        loaded = load_cli_model(model_spec, dtype, device, trust_remote_code)
        # The command ends after the merge, so the loaded base can take the merge itself (no second copy).
        res = trim(
            loaded, adapter, t, cfg, out_dir, export_merged_dir=export_merged, merge_in_place=True,
            progress=progress_flag(json_out),
        )  # fmt: skip
    note_replaced(out_dir / TRIM_FILE, "trim", earlier)
    note_examples("--examples", cfg.examples, int(res["task"]["n_examples"]))
    if res.get("after_matches_sweep") is False:
        note(
            f"the trimmed adapter did not measure what the sweep measured at K = {res['chosen_k']} (other "
            "texts or loss); the 'after' figures are the trimmed adapter's own"
        )
    capped = capped_text(res["sweep"], int(res["task"]["n_examples"]), res.get("max_new_tokens"))
    if capped:
        note(capped)
    if t.split == "test":
        note(
            f"--task {task}: the boundary was chosen on the test split; an evaluation of the trimmed "
            "adapter on these examples would flatter it (layercard run keeps the two apart)"
        )
    if json_out:
        emit_json({**res, "trim": str(out_dir / "trim.json")})
        return
    _print_trim(res)
    result_console.print(
        f"wrote {out_dir / 'trim.json'}, {out_dir / TRIM_PNG} and {res['export']['path']}", markup=False
    )
    if res["merged"]:
        result_console.print(f"wrote merged model {res['merged']['path']}", markup=False)


def _print_trim(res: dict[str, Any]) -> None:
    from layercard.trim import latency_text

    names = res["metrics"]
    passes = len(res["before"].get("s_per_example_samples") or [1])
    tbl = Table(
        title=f"trim sweep · {plain(res['task']['name'])} ({res['task']['split']}) · "
        f"select by {res['metric']}",
        caption="K: adapters kept in layers 0..K; s/example: one generation pass per K (noisy), where the "
        f"line below gives the fastest of {count(passes, 'pass')}",
    )
    for col in ("K", "layers", "modules", *names, "loss", "s/example"):
        tbl.add_column(col, justify="right")
    for r in res["sweep"]:
        # a sweep selecting by loss generates nothing: its rows have no text metrics and no latency
        text = r.get("metrics", {})
        tbl.add_row(
            str(r["k"]),
            str(r["n_adapted_layers"]),
            str(r["adapted_modules"]),
            *(f"{text[m]:.4f}" if m in text else "-" for m in names),
            "-" if r["loss"] is None else f"{r['loss']:.4f}",
            f"{r['s_per_example']:.3f}" if "s_per_example" in r else "-",
            style="bold" if r["k"] == res["chosen_k"] else None,
        )
    result_console.print(tbl)
    b, a = res["before"], res["after"]
    result_console.print(
        f"chosen K = {res['chosen_k']}: adapted layers {b['n_adapted_layers']} → {a['n_adapted_layers']}, "
        f"modules {b['adapted_modules']} → {a['adapted_modules']}, {res['metric']} "
        f"{_fmt(b, res['metric'])} → {_fmt(a, res['metric'])}, "
        + (f"loss {_fmt(b, 'loss')} → {_fmt(a, 'loss')}, " if res.get("chosen_by") == "loss" else "")
        + f"latency {latency_text(b, a)} (unmerged)"
    )
    if res.get("metric_flat"):
        from layercard.trim import flat_metric_text

        note(flat_metric_text(res["metric"], res.get("chosen_by")))


def _fmt(row: dict[str, Any], metric: str) -> str:
    v = row["loss"] if metric == "loss" else row["metrics"].get(metric)
    return "-" if v is None else f"{v:.4f}"
