"""Commands of the boundary/trim stage: trace and trim."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from layercard.cli.app import (
    DeviceOpt,
    DtypeOpt,
    TrustOpt,
    app,
    console,
    emit_json,
    guard,
    load_cli_model,
    progress_flag,
)
from layercard.errors import LayercardError

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Built-in name (smollm2), local folder, .gguf file.")
]
AdapterOpt = Annotated[
    Path, typer.Option("--adapter", "-a", help="Trained adapter folder (PEFT LoRA or layercard bottleneck).")
]
TaskOpt = Annotated[
    str,
    typer.Option(
        "--task",
        "-t",
        help="JSONL path, preset:split (e2e_nlg:validation), or synthetic:facts / synthetic:format.",
    ),
]
SplitOpt = Annotated[
    str | None, typer.Option(help="Split (default: the task's validation split, else its test split).")
]


def _check_adapter(adapter: Path) -> None:
    from layercard.adapters import CONFIG_FILE, PEFT_CONFIG_FILE

    if not adapter.is_dir():
        raise LayercardError(f"--adapter {adapter}: no such folder")
    if not (adapter / PEFT_CONFIG_FILE).is_file() and not (adapter / CONFIG_FILE).is_file():
        raise LayercardError(
            f"--adapter {adapter}: not an adapter folder (no {PEFT_CONFIG_FILE} or {CONFIG_FILE})"
        )


def _validation_task(spec: str, split: str | None, seed: int) -> Any:
    """The task to score on: ``split`` when given; else a file as it is; else validation, then test."""
    from layercard.tasks import held_out, is_file_spec, load_task, names_split

    if split is not None or is_file_spec(spec) or spec.startswith("hf:") or names_split(spec):
        return load_task(spec, split=split or ("validation" if spec.startswith("hf:") else None), seed=seed)
    task = held_out(spec, seed=seed)
    return task if task is not None else load_task(spec, seed=seed)  # the loader's own error, or default


def _parse_window(window: str | None) -> tuple[int, int] | None:
    if window is None:
        return None
    a, sep, b = window.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(a), int(b)
    except ValueError:
        raise LayercardError(f"--window {window!r}: expected A:B, two layer indices (e.g. 8:20)") from None


# ---------------------------------------------------------------------------------------------
@app.command("trace")
@guard
def trace_cmd(
    model: ModelOpt,
    adapter: AdapterOpt,
    task: TaskOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for trace.json and trace.png.")],
    split: SplitOpt = None,
    examples: Annotated[int | None, typer.Option(help="Seeded subset of N validation examples.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Forward batch size.")] = 8,
    max_length: Annotated[int | None, typer.Option(help="Max prompt+target tokens per example.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the example subset and of synthetic tasks.")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the trace as JSON.")] = False,
) -> None:
    """Logit lens per layer (P of the gold target tokens), adapter on and off; boundary candidates."""
    from layercard.trim import TraceConfig, run_trace

    cfg = TraceConfig(examples=examples, batch_size=batch_size, max_length=max_length, seed=seed)
    _check_adapter(adapter)
    t = _validation_task(task, split, seed)
    loaded = load_cli_model(model, dtype, device, trust_remote_code)
    tr = run_trace(loaded, adapter, t, cfg, progress=progress_flag(json_out))
    path, png = tr.save(out)
    if json_out:
        emit_json({**tr.to_dict(), "trace": str(path), "figure": str(png)})
        return
    tbl = Table(title=f"logit lens · {loaded.model_id} · {t.name} ({t.split}) · adapter {adapter}")
    for col in ("layer", "P on", "P off", "adapted"):
        tbl.add_column(col, justify="right")
    marks = {v: k for k, v in tr.candidates.items()}
    for i, (p_on, p_off) in enumerate(zip(tr.curve_on, tr.curve_off, strict=True)):
        tbl.add_row(
            str(i), f"{p_on:.4f}", f"{p_off:.4f}", "•" if i in tr.adapted_layers else "",
            style="bold" if i in marks else None,
        )  # fmt: skip
    Console(stderr=True).print(tbl)
    cands = ", ".join(f"{k} = layer {v}" for k, v in tr.candidates.items())
    console.print(f"boundary candidates: {cands}")
    console.print(f"wrote {path} and {png}")


# ---------------------------------------------------------------------------------------------
@app.command("trim")
@guard
def trim_cmd(
    model: ModelOpt,
    adapter: AdapterOpt,
    task: TaskOpt,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for trim.json and adapter-trimmed/ (default: the adapter's parent)."
        ),
    ] = None,
    split: SplitOpt = None,
    examples: Annotated[int | None, typer.Option(help="Seeded subset of N validation examples.")] = 64,
    window: Annotated[
        str | None, typer.Option(help="Sweep boundaries K in A:B (inclusive) instead of around the trace.")
    ] = None,
    all_layers: Annotated[
        bool, typer.Option("--all-layers", help="Sweep every layer as the boundary.")
    ] = False,
    radius: Annotated[int, typer.Option(help="Layers swept either side of each trace candidate.")] = 3,
    metric: Annotated[
        str | None, typer.Option(help="Selection metric (default: the task's primary; 'loss' = lowest loss).")
    ] = None,
    tie_tolerance: Annotated[
        float, typer.Option(help="Scores within this of the best tie; ties go to fewer adapted layers.")
    ] = 1e-9,
    latency_repeats: Annotated[
        int, typer.Option(help="Timed generation passes before and after trimming (minimum reported).")
    ] = 3,
    batch_size: Annotated[int, typer.Option(help="Generation and loss batch size.")] = 8,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation limit (default: the format's).")
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Max prompt+target tokens for lens and loss.")] = 256,
    export_merged: Annotated[
        Path | None,
        typer.Option("--export-merged", help="Also save the base with the trimmed LoRA merged here."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the example subset and of synthetic tasks.")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print trim.json as JSON.")] = False,
) -> None:
    """Sweep the boundary layer K, pick the best, export adapter-trimmed/ (and optionally a merged model)."""
    from layercard.trim import TrimConfig, trim

    cfg = TrimConfig(
        examples=examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        metric=metric,
        window=_parse_window(window),
        all_layers=all_layers,
        radius=radius,
        tie_tolerance=tie_tolerance,
        latency_repeats=latency_repeats,
        seed=seed,
    )
    _check_adapter(adapter)
    t = _validation_task(task, split, seed)
    loaded = load_cli_model(model, dtype, device, trust_remote_code)
    out_dir = out if out is not None else adapter.resolve().parent
    # The command ends after the merge, so the loaded base can take the merge itself (no second copy).
    res = trim(
        loaded, adapter, t, cfg, out_dir, export_merged_dir=export_merged, merge_in_place=True,
        progress=progress_flag(json_out),
    )  # fmt: skip
    if json_out:
        emit_json({**res, "trim": str(out_dir / "trim.json")})
        return
    _print_trim(res)
    console.print(f"wrote {out_dir / 'trim.json'} and {res['export']['path']}")
    if res["merged"]:
        console.print(f"wrote merged model {res['merged']['path']}")


def _print_trim(res: dict[str, Any]) -> None:
    names = res["metrics"]
    tbl = Table(title=f"trim sweep · {res['task']['name']} · select by {res['metric']}")
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
    Console(stderr=True).print(tbl)
    b, a = res["before"], res["after"]
    console.print(
        f"chosen K = {res['chosen_k']}: adapted layers {b['n_adapted_layers']} → {a['n_adapted_layers']}, "
        f"modules {b['adapted_modules']} → {a['adapted_modules']}, {res['metric']} "
        f"{_fmt(b, res['metric'])} → {_fmt(a, res['metric'])}, "
        f"latency {b['s_per_example']:.3f} → {a['s_per_example']:.3f} s/example (unmerged)"
    )


def _fmt(row: dict[str, Any], metric: str) -> str:
    v = row["loss"] if metric == "loss" else row["metrics"].get(metric)
    return "-" if v is None else f"{v:.4f}"
