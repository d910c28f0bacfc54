"""Commands over the whole pipeline: run (a YAML config), demo (the packaged config), report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from layercard.cli.app import app, emit_json, guard, plain, progress_flag, result_console, warning
from layercard.progress import count
from layercard.run_layout import RunLayout

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a config key, e.g. --set train.steps=10 (value typed as YAML; repeatable; "
        "placements by index or name: placements.0.rank=4, placements.reference.rank=4).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (no tables, no bars).")]
UntilOpt = Annotated[
    str,
    typer.Option(
        "--until",
        help="Stop after this stage (card | plan | train | trim | eval | report); plan: the card and every "
        "plan, priced at the run's own batches, with nothing trained. Run again to go on.",
    ),
]
DEMO_DIR = Path("layercard-demo")


def _on_stage(event: str, name: str, result: Any) -> None:
    """A short table at the end of every stage that ran; one line for a stage skipped as unchanged."""
    if event == "start":
        result_console.print(f"[bold cyan]▶ {name}[/]", highlight=False)
        return
    if result.status == "skipped":
        result_console.print(f"[dim]✓ {name}: skipped (inputs unchanged)[/]", highlight=False)
        return
    t = Table(
        title=f"{name} · {result.status} in {result.seconds:.1f} s", show_header=False, title_justify="left"
    )
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in result.rows:
        if k != "warning":
            t.add_row(k, plain(v))
    result_console.print(t)
    for k, v in result.rows:
        if k == "warning":  # on stderr, where every command's warnings go
            warning(f"{name}: {v}")


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(x, spec)


def _compact(title: str, caption: str) -> Table:
    """A table compact enough for an 80-column terminal (or a log) without cutting the numbers."""
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption=caption,
        caption_justify="left",
        padding=(0, 1, 0, 0),
    )


def _comparison(summary: dict[str, Any]) -> Table:
    from layercard.report.results import LOSS, METRIC, STEP

    primary = summary.get("primary_metric") or "metric"
    t = _compact(
        "comparison on the eval split",
        "s/step: training; drop: base eval loss − model eval loss; s/ex: generation",
    )
    quality = any(r.get("predicted_quality") is not None for r in summary["rows"])
    cols = ["model", "layers", "modules", "s/step", "loss", "drop", primary, "s/ex"]
    for col in cols + (["q m/p"] if quality else []):
        # a long name folds onto a second line, so that no number is cut at 80 columns
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=col != "model",
                     overflow="fold" if col == "model" else "ellipsis")  # fmt: skip
    for r in summary["rows"]:
        cells = [
            r["name"],
            str(len(r["layers"])),
            _fmt(r.get("modules")),
            _fmt(r.get("s_per_step"), STEP),  # the report's formats, so that the two read alike
            _fmt(r.get("eval_loss"), LOSS),
            _fmt(r.get("measured_gain"), LOSS),
            _fmt(r.get("primary_value"), METRIC),
            _fmt(r.get("s_per_example"), ".3f"),
        ]
        if quality:  # measured / predicted fraction of the reference's loss drop
            cells.append(
                f"{_fmt(r.get('measured_fraction'), '.2f')}/{_fmt(r.get('predicted_quality'), '.2f')}"
            )
        t.add_row(*cells)
    if summary.get("recommendation"):
        t.caption = (t.caption or "") + "; q m/p: measured/predicted fraction of the reference's drop"
    return t


def _plans(summary: dict[str, Any]) -> Table | None:
    """What a run stopped before training would cost: each placement's plan and its predictions (None
    before any plan was made)."""
    from layercard.report import seconds_text

    steps = summary["train_steps"]
    rows = [r for r in summary["rows"] if r["kind"] == "placement" and r.get("policy") is not None]
    if not rows:
        return None
    priced = any(r.get("predicted_s_per_step") is not None for r in rows)
    caption = "predicted by the card's cost and quality models; quality: fraction of the reference's drop"
    if not priced:
        caption += "; no costs: the card was measured without the cost calibration"
    t = _compact(f"plans · {count(steps, 'optimizer step')} each", caption)
    for col in ("placement", "layers", "modules", "params", "s/step", "time of steps", "peak MiB", "quality"):
        t.add_column(col, justify="left" if col == "placement" else "right", no_wrap=True)
    for r in rows:
        step = r.get("predicted_s_per_step")
        t.add_row(
            r["name"],
            str(len(r["layers"])),
            _fmt(r.get("modules")),
            _fmt(r.get("trainable_params"), ",d"),
            _fmt(step, ".3f"),
            seconds_text(None if step is None else step * steps),
            _fmt(r.get("predicted_peak_memory_mib"), ",.0f"),
            _fmt(r.get("predicted_quality"), ".3f"),
        )
    return t


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """What a script wants from a run: paths, stage statuses and the headline numbers."""
    keep = (
        "name",
        "kind",
        "policy",
        "layers",
        "modules",
        "trainable_params",
        "predicted_gain",
        "predicted_s_per_step",
        "predicted_peak_memory_mib",
        "s_per_step",
        "peak_memory_mib",
        "peak_memory_kind",
        "eval_loss",
        "measured_gain",
        "primary_value",
        "metrics",
        "s_per_example",
        "chosen_k",
        "predicted_quality",
        "measured_fraction",
        "measured_fraction_se",
        "measured_lead_of_recommend",
        "measured_lead_se",
    )
    return {
        "run_dir": summary["run_dir"],
        "report": summary["report"],
        "summary": str(RunLayout(Path(summary["run_dir"])).summary_json),
        "ran": summary["ran"],
        "skipped": summary["skipped"],
        "primary_metric": summary["primary_metric"],
        "rows": [{k: r[k] for k in keep if k in r} for r in summary["rows"]],
        "left_out": summary["left_out"],
        "failed": summary["failed"],
        "train_steps": summary["train_steps"],
        "until": summary["until"],
        "wall_time_s": summary["wall_time_s"],
    }


def _run(config: Path, sets: list[str], out: Path | None, json_out: bool, until: str = "report") -> None:
    from layercard.pipeline import load_config

    cfg = load_config(config, sets)  # validated in full before anything is written
    head = _run_cfg(cfg, out, json_out, until)
    if json_out:
        emit_json(head)


def _run_cfg(cfg: Any, out: Path | None, json_out: bool, until: str = "report") -> dict[str, Any]:
    """Run one validated config into ``out`` (None: the config's default folder): stage tables and the
    comparison, or (``json_out``) quiet; returns the headline."""
    from layercard.pipeline import run_pipeline

    summary = run_pipeline(
        cfg, out, progress=progress_flag(json_out), on_stage=None if json_out else _on_stage, until=until
    )
    if json_out:
        return _headline(summary)
    table = _plans(summary) if until in ("card", "plan") else _comparison(summary)
    if table is not None:
        result_console.print(table)
    if summary.get("left_out"):
        result_console.print(
            "left out of the tables: the artifacts of "
            + ", ".join(summary["left_out"])
            + ", which failed or "
            "were made from inputs this run has since replaced",
            markup=False,
        )
    for stage, error in (summary.get("failed") or {}).items():
        result_console.print(f"failed earlier: {stage} ({error})", markup=False)
    skipped = len(summary["skipped"])
    result_console.print(
        f"{count(len(summary['ran']), 'stage')} ran, {skipped} skipped, {summary['wall_time_s']:.0f} s on "
        f"{summary['threads']} torch thread(s); run folder {summary['run_dir']}"
    )
    if summary["report"] is None:
        result_console.print(
            f"stopped after {until}: run the same command without --until to go on (finished stages are "
            "skipped)",
            markup=False,
        )
    else:
        result_console.print(
            f"[bold]report:[/] {summary['report']['html']}  (and {summary['report']['markdown']})"
        )
    return _headline(summary)


@app.command("run")
@guard
def run_cmd(
    config: Annotated[
        Path,
        typer.Argument(
            metavar="CONFIG",
            help="YAML run config (every key with its default: configs/reference.yaml in the package; "
            "the demo's: configs/demo.yaml).",
        ),
    ],
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/<config name>).")
    ] = None,
    json_out: JsonOpt = False,
    until: UntilOpt = "report",
) -> None:
    """card → plan → train → trim → eval → report in one run folder; unchanged stages are skipped."""
    _run(config, list(set_ or []), out, json_out, until)


DEMO_TASKS = ("facts", "format")


@app.command("demo")
@guard
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's runs.")] = DEMO_DIR,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The main job on the embedded default: SmolLM2 on two built-in tasks, facts and format.

    Per task (facts: new knowledge; format: a new output format): the card, the recommended placement
    under a parameter budget against the practitioners' defaults fitted to the same budget and the
    reference, each trained and evaluated (the packaged demo.yaml; 5 to 10 minutes on 2 CPU cores)."""
    import time

    from layercard.pipeline import demo_config_path, load_config
    from layercard.report.overview import write_overview

    t0 = time.perf_counter()
    sets = list(set_ or [])
    # Validate both tasks' configs before either runs.
    cfgs = {
        task: load_config(
            demo_config_path(), [f"task.train=synthetic:{task}", f"task.eval=synthetic:{task}", *sets]
        )
        for task in DEMO_TASKS
    }
    heads = {}
    for task, cfg in cfgs.items():
        if not json_out:
            result_console.print(f"[bold]━━ demo task: {task} ━━[/]")
        heads[task] = _run_cfg(cfg, out / task, json_out)
    path = out / "demo.md"
    wall = time.perf_counter() - t0  # the one figure demo.md and the last line both give
    tasks = write_overview({t: out / t for t in DEMO_TASKS}, path, wall)
    if json_out:
        emit_json({"overview": str(path.resolve()), "tasks": heads})
        return
    for task, t in tasks.items():
        if t["recommendation"]:
            ranking = ", ".join(f"{r} {100 * s:.0f}%" for r, s in t["matrices"][:3])
            result_console.print(f"[bold]{task}[/]: card's top matrices {ranking}", highlight=False)
            result_console.print(f"  {t['recommendation']}", highlight=False, soft_wrap=True, markup=False)
    result_console.print(f"[bold]overview:[/] {plain(path)}  ({wall:.0f} s)")


@app.command("report")
@guard
def report_cmd(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Run folder written by `layercard run` or `demo`.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML path (default RUN_DIR/report.html).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build report.html (self-contained, figures inline) and report.md from a run folder's artifacts."""
    from layercard.artifacts import check_out_file
    from layercard.report import build_report

    if out is not None:
        check_out_file(out, example="report.html")
    paths = build_report(run_dir, out)
    if json_out:
        emit_json(paths)
        return
    result_console.print(
        f"wrote {paths['html']}, {paths['markdown']} and {len(paths['figures'])} figures", markup=False
    )
