"""Commands of the plan stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from layercard.cli.app import (
    TrustOpt,
    app,
    emit_json,
    given,
    guard,
    load_cli_model,
    note_unused,
    outside_live_runs,
    plain,
    result_console,
    warning,
)
from layercard.cli.options import config_options
from layercard.config import SEARCH_POLICIES, PlanConfig
from layercard.errors import LayercardError
from layercard.progress import count, layers_text, printable


@app.command("plan")
@guard
@config_options(PlanConfig)
def plan_cmd(
    card: Annotated[Path, typer.Option("--card", "-c", help="card.json from `layercard card`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write plan.json.")] = Path("plan.json"),
    check_model: Annotated[
        str | None,
        typer.Option(help="Load this model and check the plan applies with PEFT exactly as planned."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="dtype for --check-model.")] = "float32",
    device: Annotated[
        str,
        typer.Option(
            help="Device for --check-model: auto | cpu | cuda | cuda:N | mps (auto: cuda if present)."
        ),
    ] = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    cfg: PlanConfig | None = None,
) -> None:
    """Place adapters from a Layer Card under a budget: plan.json with a ready PEFT LoraConfig."""
    from layercard.artifacts import check_out_file, same_file, writer_lock
    from layercard.card import Card
    from layercard.card.artifact import CARD_FILE
    from layercard.plan import check_model_matches, check_plan, make_plan

    assert cfg is not None  # built by config_options
    check_out_file(out, example="plan.json", suffix=".json")  # before any work
    outside_live_runs(out)
    card_file = card / CARD_FILE if card.is_dir() else card
    if same_file(out, card_file):
        raise LayercardError(f"--out {out}: that is the card {card_file}, which the plan would overwrite")
    if check_model is None:  # only the check loads a model
        for name, option in (
            ("dtype", "--dtype"),
            ("device", "--device"),
            ("trust_remote_code", "--trust-remote-code"),
        ):
            if given(name):
                note_unused(option, "without --check-model")
    figure_path = out.with_name(out.stem + "_frontier.png")
    if cfg.policy in SEARCH_POLICIES:
        check_out_file(figure_path, "the frontier figure")
    # one writer of a plan.json and its figure at a time: two plans at once could leave one's file beside
    # the other's figure
    with writer_lock(out, what="plan file"):
        c = Card.load(card)
        plan = make_plan(c, cfg, card_path=str(card))
        check: dict[str, Any] | None = None
        if check_model is not None:
            loaded = load_cli_model(check_model, dtype, device, trust_remote_code)
            check_model_matches(plan, loaded, where=str(card))
            check = check_plan(plan, loaded.model)
        figure = None
        if cfg.policy in SEARCH_POLICIES:
            from layercard.plan.figures import plot_frontier

            figure = plot_frontier(plan, figure_path)
        plan.save(out)  # only now: a failed plan, check or figure leaves no plan.json behind
    if json_out:
        emit_json(
            {
                "plan": str(out),
                "policy": cfg.policy,
                "layers": plan.layers,
                "n_units": len(plan.units),
                "ranks": {u.name: u.rank for u in plan.units},
                "predicted": plan.predicted,
                "lora_config": plan.lora_config,
                "adapter_config": plan.adapter_config,
                "warnings": plan.warnings,
                "check": check,
                "figure": str(figure) if figure is not None else None,
            }
        )
        return
    if cfg.policy in SEARCH_POLICIES:
        _print_search_plan(plan)
    else:
        _print_plan(plan)
    if check is not None and plan.kind == "lora":
        result_console.print(
            f"check: PEFT adapted exactly the {count(len(check['matched']), 'planned module')}"
        )
    elif check is not None:
        layers = count(len(check["matched"]), "planned layer")
        result_console.print(f"check: the {plan.kind} adapters attach to exactly the {layers}")
    result_console.print(f"wrote {out}" + (f" and {figure}" if figure is not None else ""), markup=False)


# A frontier table longer than this (a model of a hundred layers, stepping one layer at a time) keeps rows
# spaced in predicted quality instead, so that it stays a screenful.
FRONTIER_ROWS = 24


def shown_frontier(rows: list[dict], chosen: dict, most: int = FRONTIER_ROWS) -> tuple[list[dict], float]:
    """The frontier rows worth a line, and the least rise in predicted quality between them: of the rows
    whose predicted quality reads the same to three decimals, the cheapest (the frontier lists them
    cheapest first); where more than ``most`` remain, a row only where it rises by a ``most``-th of the
    frontier's range over the last row kept, and the last. The plan's own row shows wherever it is. The
    differences between the rows left out lie far inside the quality model's error."""
    from layercard.plan.frontier import row_label

    def thinned(step: float) -> list[dict]:
        out: list[dict] = []
        last = None
        for i, r in enumerate(rows):
            q = round(r["quality"], 3)
            if last is None or q >= last + step - 1e-9 or (step > 0.001 and i == len(rows) - 1):
                out.append(r)
                last = q
            elif row_label(r) == row_label(chosen):
                out.append(r)
        return out

    shown, step = thinned(0.001), 0.001
    if len(shown) > most:
        qs = [round(r["quality"], 3) for r in rows]
        step = max(0.001, (max(qs) - min(qs)) / (most - 1))
        shown = thinned(step)
    return shown, step


def _print_search_plan(plan) -> None:
    """The frontier per budgeted cost, the plan marked, the fixed rules, and the one-sentence comparison."""
    from layercard.cost import peak_text
    from layercard.plan.frontier import over_budget, row_label
    from layercard.plan.predict import positions_text
    from layercard.plan.space import amount

    p = plan.predicted
    q = p["quality"]
    chosen = p["candidate"]  # rounded as the tables show it, so that the summary line reads the same
    target_cost = (p.get("target") or {}).get("cost")  # the cost a target's plan is the cheapest in
    for kind, rows in p["frontier"].items():
        t = Table(title=f"Frontier · predicted quality against {kind} · {plain(plan.card['task'])}")
        # short headers and unwrapped values keep a row on one line of an 80-column terminal
        for col in ("matrices", "layers", "rank", "quality", _cost_header(kind), "× ref", ""):
            t.add_column(col, justify="right" if col not in ("matrices", "layers") else "left", no_wrap=True)
        shown, step = shown_frontier(rows, chosen)
        on_frontier = any(row_label(r) == row_label(chosen) for r in shown)
        # under several budgets the plan may lie off one cost's frontier: its row is shown all the same
        any_over = False
        for r in shown if on_frontier else [*shown, chosen]:
            over = bool(over_budget(r, p["budgets"], p["reference"]))
            any_over |= over
            mark = "◀ plan" if row_label(r) == row_label(chosen) else "over" if over else ""
            t.add_row(
                r["matrices"], r["layers"], str(r["rank"]),
                f"{r['quality']:.3f}" + (f" ± {r['error']:.3f}" if r.get("error") is not None else ""),
                amount(r[kind], kind, unit=False), f"{r.get(kind + '_x', float('nan')):.3f}", mark,
                style="bold" if mark == "◀ plan" else "dim" if over else None,
            )  # fmt: skip
        notes = []
        if len(shown) < len(rows):
            alike = (
                "the same predicted quality to three decimals"
                if step <= 0.001
                else f"less than {step:.3f} more predicted quality than a row shown"
            )
            notes.append(
                f"{len(rows) - len(shown)} more frontier placements cost more for {alike}; plan.json and the "
                "figure keep them"
            )
        if any_over:
            notes.append("over: beyond a budget (" + ", ".join(p["budgets"]) + ")")
        dominated = any(
            r[kind] <= chosen[kind]
            and r["quality"] >= chosen["quality"]
            and (r[kind] < chosen[kind] or r["quality"] > chosen["quality"])
            for r in rows
        )
        if not on_frontier and plan.config["policy"] != "recommend":
            # a fixed rule (or spectrum's selection) is that rule's placement, whatever the search would pick
            notes.append(
                f"the plan is off this frontier: it is {_rule_text(plan)}, not the search's pick"
                + (f"; a placement as cheap in {kind} is predicted as high" if dominated else "")
                + (
                    "; its prediction lies outside the quality model's range"
                    if chosen.get("outside_model_range")
                    else ""
                )
            )
        elif not on_frontier and plan.config.get("target") is not None and kind != target_cost:
            notes.append(
                f"the plan is off this frontier: it is the cheapest in {target_cost} predicted to reach "
                f"{plan.config['target']:g}, not the placement predicted best for its {kind}"
            )
        elif not on_frontier and dominated:
            notes.append(
                f"the plan is off this frontier: a placement as cheap in {kind} is predicted as high, and "
                "the plan keeps to a restriction (its --depth, or one its warnings give)"
            )
        elif not on_frontier:
            notes.append("the plan is not one of the search's placements, which this frontier holds")
        # what the columns are, where nothing else on the screen says it
        notes.insert(
            0,
            "quality: the predicted fraction of the reference's loss drop ± the quality model's expected "
            f"error; × ref: the {kind} over the reference's",
        )
        t.caption = "; ".join(notes)
        result_console.print(t)
    from layercard.plan.space import budget_label

    err = chosen.get("error", q["expected_error"])
    budgets = budget_label(",".join(p["budgets"])) if p["budgets"] else "none"
    result_console.print(
        f"plan ({plan.config['policy']}, budgets {budgets}"
        + (f", target {plan.config['target']:g}" if plan.config.get("target") is not None else "")
        + "): "
        f"{row_label(chosen)}, {count(p['params'], 'param')}, "
        f"{count(p['modules'], 'module')}, predicted quality {chosen['quality']:.3f}"
        + ("" if err is None else f" ± {err:.3f}")
        + (f", predicted {p['step_time_s']:.3g} s/step" if p.get("step_time_s") else "")
        + (f", peak {peak_text(p['memory'], p.get('memory_figure'))}" if p.get("memory") else "")
        + (f"; priced at {where}" if (where := positions_text(plan.config)) else "")
    )
    result_console.print(printable(p["recommendation"]), highlight=False, soft_wrap=True, markup=False)
    for w in plan.warnings:
        warning(w)
    timed = [b for b in p["budgets"] if b.split("=")[0] in ("memory", "step_time")]
    if timed and not where and p.get("calibration_batch_positions"):
        result_console.print(
            f"{budget_label(','.join(timed))}: checked at {p['calibration_batch_positions']:,.0f} padded "
            "positions per micro-batch, not at the run's own batches; `layercard train --dry-run` prints a "
            "run's, to plan at with --step-positions and --peak-positions",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )


def _cost_header(kind: str) -> str:
    """A cost column's header, with the unit its cells leave out (they show the number alone); as short as
    the budget's name, so that a row still fits an 80-column terminal."""
    return {"step_time": "s/step", "memory": "peak MiB"}.get(kind, kind)


def _rule_text(plan) -> str:
    """What a search plan other than the recommendation is: its rule, fitted to its budgets if any."""
    policy = plan.config["policy"]
    what = "policy spectrum's selection" if policy == "spectrum" else f"the {policy} rule"
    return what + (
        " fitted to its budgets" if plan.predicted.get("budgets") else f" at rank {plan.config['rank']}"
    )


def _print_plan(plan) -> None:
    from layercard.plan.space import budget_label

    p = plan.predicted
    cfg = plan.config
    roles = ",".join(cfg["roles"])
    names = f"{plain(plan.card['model_id'])} · {plain(plan.card['task'])}"
    title = f"Plan · {cfg['policy']} · {names} · roles {roles}"
    t = Table(title=title, show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    budget = budget_label(str(cfg["budget"]))
    t.add_row("budget", budget + (f", target {cfg['target']}" if cfg["target"] is not None else ""))
    t.add_row("layers", f"{len(plan.layers)}: {layers_text(plan.layers)}")
    t.add_row("adapter", plan.kind)
    t.add_row("units", str(len(plan.units)))
    t.add_row("ranks", _ranks_text(plan))
    t.add_row(f"predicted gain ({p['score']})", f"{p['gain']:.4g} (additive {p['additive_gain']:.4g})")
    frac = p["fraction"]
    t.add_row("of all-layer gain", "undefined" if frac is None else f"{100 * frac:.1f}%")
    t.add_row("redundancy ρ(S)", f"{p['redundancy']:.3f}  (coupling: {p['coupling']})")
    t.add_row("trainable params", f"{p['params']:,} of {p['all_layer_params']:,} (all layers)")
    t.add_row("adapted modules", str(p["modules"]))
    st = p["step_time_s"]
    t.add_row(
        "predicted s/step",
        "no cost model in the card"
        if st is None
        else f"{st:.3g} (all layers {p['all_layer_step_time_s']:.3g})",
    )
    t.caption = (
        f"predicted gain: the card's {p['score']} summed over the layers' units (no unit); a layer policy "
        "ranks layers by it and predicts no loss or quality (policy recommend does)"
    )
    result_console.print(t)
    result_console.print(f"[dim]score basis: {plain(p['score_basis'])}[/]", highlight=False, soft_wrap=True)
    for w in plan.warnings:
        warning(w)


def _ranks_text(plan) -> str:
    ranks = [u.rank for u in plan.units]
    if not ranks:
        return "-"
    if len(set(ranks)) == 1:
        return f"{ranks[0]} (uniform)"
    pat = (plan.lora_config or {}).get("rank_pattern") or {}
    r = (plan.lora_config or {}).get("r")
    return f"r={r}, {count(len(pat), 'module')} differ (min {min(ranks)}, max {max(ranks)})"
