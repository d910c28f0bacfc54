"""Commands over the Layer Card: models, card, compare."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from layercard.cli.app import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    TrustOpt,
    app,
    emit_json,
    guard,
    note_examples,
    note_replaced,
    note_task,
    out_folder,
    plain,
    progress_flag,
    result_console,
)
from layercard.cli.options import config_options
from layercard.cli.task_options import SPLIT_HELP, TaskOpt, task_options
from layercard.config import CardConfig
from layercard.errors import LayercardError
from layercard.progress import count


# ---------------------------------------------------------------------------------------------
@app.command("models")
@guard
def models_cmd(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the built-in model names and what is in the local cache."""
    from layercard.models import cache_dir, list_models

    rows = list_models()
    if json_out:
        emit_json({"cache_dir": str(cache_dir()), "models": rows})
        return
    t = Table(title=f"layercard models (cache: {plain(cache_dir())})")
    keys = sorted({k for r in rows for k in r})
    order = [k for k in ("name", "kind", "status", "description", "path") if k in keys] + [
        k for k in keys if k not in ("name", "kind", "status", "description", "path")
    ]
    for k in order:
        # a path folds onto further lines in a narrow terminal or a pipe, never cut: it is there to be copied
        t.add_column(k, overflow="fold" if k in ("path", "gguf") else "ellipsis")
    for r in rows:
        t.add_row(*[str(r.get(k, "")) for k in order])
    result_console.print(t)


# ---------------------------------------------------------------------------------------------


@app.command("card")
@guard
@config_options(CardConfig)
@task_options
def card_cmd(
    model: ModelOpt = "smollm2",
    task: TaskOpt = "synthetic:facts",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for card.json, card.md and figures.")
    ] = Path("card"),
    split: Annotated[str | None, typer.Option(help=f"Split for preset/synthetic tasks. {SPLIT_HELP}")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            help="Local processes sharing the probe batches (CPU: gloo; CUDA: one GPU each). "
            "Under torchrun or accelerate launch leave it at 1: the launched processes share them.",
        ),
    ] = 1,
    cfg: CardConfig = CardConfig(),
    task_kw: dict | None = None,
) -> None:
    """Measure the frozen model on a task: the Layer Card (card.json, card.md, PNG figures)."""
    from layercard.api import measure_card
    from layercard.artifacts import remove_stale_temps, writer_lock
    from layercard.card import distributed, write_card_folder
    from layercard.card.artifact import CARD_FILE
    from layercard.card.summary import top_layers

    dev = distributed.check_processes(processes, device)  # before anything is written
    out_folder(out)  # before the probe pass, not after it
    earlier = (out / CARD_FILE).is_file()
    if distributed.launched_world() > 1:
        # Launched processes share the probe; the first alone holds the folder and writes the card.
        with distributed.launch_group(dev) as my_dev:
            first = distributed.launched_rank() == 0
            with writer_lock(out, what="card folder") if first else contextlib.nullcontext():
                if first:
                    remove_stale_temps(out)
                card = measure_card(
                    model, task, cfg, split=split, dtype=dtype, device=str(my_dev),
                    trust_remote_code=trust_remote_code, progress=progress_flag(json_out) if first else False,
                    **(task_kw or {}),
                )  # fmt: skip
                if not first:
                    return
                written = write_card_folder(card, out)
    else:
        with writer_lock(out, what="card folder"):
            remove_stale_temps(out)  # what a killed earlier card command left half-written
            if processes > 1:
                card = distributed.spawn_card(
                    processes, model, task, cfg, split=split, dtype=dtype, device=device,
                    trust_remote_code=trust_remote_code, progress=progress_flag(json_out), task_kw=task_kw,
                )  # fmt: skip
            else:
                from layercard.tasks import load_task

                t = load_task(task, split=split, seed=cfg.seed, **(task_kw or {}))  # as measure_card reads it
                note_task(t)
                card = measure_card(
                    model, t, cfg, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                    progress=progress_flag(json_out),
                )  # fmt: skip
            written = write_card_folder(card, out)
    note_replaced(out / CARD_FILE, "card", earlier)
    note_examples("--examples", cfg.examples, int(card.task["n_examples"]))
    summary = {
        "card": str(out / "card.json"),
        "markdown": str(out / "card.md"),
        "figures": [str(p) for p in written],
        "loss": card.loss,
        "n_positions": card.n_positions,
        "n_target_tokens": card.n_target_tokens,
        "top5_resnorm": top_layers(card, "resnorm"),
        "top5_default_score": top_layers(card, card.default_score),
        "default_score": card.default_score,
        "timings": card.timings,
    }
    if json_out:
        emit_json(summary)
        return
    _print_card_summary(card)
    result_console.print(
        f"wrote {out / 'card.json'}, {out / 'card.md'} and {count(len(written), 'figure')}", markup=False
    )


def _print_card_summary(card) -> None:
    from layercard.card.summary import timings_text, top_layers

    tbl = Table(
        title=f"Layer Card · {plain(card.model['id'])} · {plain(card.task['name'])} · "
        f"roles {','.join(card.roles)}"
    )
    for col in ("layer", "resnorm", "‖∇W‖", "energy", "κ", "rate"):
        tbl.add_column(col, justify="right")
    rows = card.layer_table()
    top = set(top_layers(card, "resnorm"))
    for r in rows:
        style = "bold" if r["layer"] in top else None
        tbl.add_row(
            str(r["layer"]),
            f"{r['resnorm']:.4g}",
            f"{r['gradnorm']:.4g}",
            f"{r.get('energy', float('nan')):.4g}",
            f"{r.get('kappa', float('nan')):.3g}",
            f"{r['rate']:.4g}",
            style=style,
        )
    result_console.print(tbl)
    result_console.print(
        f"probe: {count(card.task['n_examples'], 'example')}, {count(card.n_positions, 'position')}, "
        f"loss {card.loss:.4f}; " + timings_text(card.timings)
    )
    result_console.print(
        f"top-5 layers by resnorm: {top_layers(card, 'resnorm')}; by {card.default_score} "
        f"(planner default, {card.default_score_basis.split(':')[0]}): {top_layers(card, card.default_score)}"
    )


# ---------------------------------------------------------------------------------------------
@app.command("compare")
@guard
def compare_cmd(
    a: Annotated[Path, typer.Argument(metavar="A", help="First card.json.")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Second card.json (same model).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG path for the plot.")] = None,
    score: Annotated[str, typer.Option(help="Per-layer column to correlate.")] = "resnorm",
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Spearman correlation of a per-layer column (resnorm unless --score) between two cards of the same
    model; undefined (null in --json) where a card's column is the same in every layer."""
    from layercard.card import Card
    from layercard.card.figures import compare_plot
    from layercard.card.stats import spearman
    from layercard.card.summary import top_layers

    if out is not None:
        from layercard.artifacts import check_out_file

        check_out_file(out, example="compare.png", suffix=".png")
    ca, cb = Card.load(a), Card.load(b)
    if ca.model["hash"] != cb.model["hash"]:
        raise LayercardError(
            f"{b}: card is for model {cb.model['id']} ({cb.model['hash'][:12]}), {a} for "
            f"{ca.model['id']} ({ca.model['hash'][:12]}); compare cards of the same model"
        )
    columns = [k for k in ca.layer_table()[0] if k != "layer"]  # the layer index correlates with itself
    if score not in columns:
        raise LayercardError(f"--score {score!r}: not a per-layer column; valid: {', '.join(columns)}")
    va = [r[score] for r in ca.layer_table()]
    vb = [r[score] for r in cb.layer_table()]
    rho = spearman(va, vb)
    res = {
        "a": {"card": str(a), "task": ca.task["name"], f"top5_{score}": top_layers(ca, score)},
        "b": {"card": str(b), "task": cb.task["name"], f"top5_{score}": top_layers(cb, score)},
        "score": score,
        "spearman": rho,
    }
    if out is not None:
        compare_plot(ca, cb, out, rho, score)
        res["plot"] = str(out)
    if json_out:
        emit_json(res)  # an undefined ρ is null: JSON has no NaN
        return
    if rho is None:
        same = " and ".join(n for n, v in ((str(a), va), (str(b), vb)) if len(set(v)) == 1)
        shown = f"undefined ({score} is the same in every layer of {same or 'a card'})"
    else:
        shown = f"{rho:.3f}"
    result_console.print(
        f"Spearman ρ of per-layer {score}: {shown}  ({ca.task['name']} top-5 {res['a'][f'top5_{score}']}, "
        f"{cb.task['name']} top-5 {res['b'][f'top5_{score}']})",
        markup=False,
    )
    if out is not None:
        result_console.print(f"wrote {out}", markup=False)
