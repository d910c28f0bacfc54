"""One page over several run folders (the demo's tasks): per task the card's matrix ranking, the
recommendation in one sentence and the placements' measured cost and quality side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layercard.artifacts import machine_text, write_text
from layercard.plan.frontier import row_label
from layercard.report.results import (
    collect_results,
    load_optional,
    measured_leads_sentence,
    placement_names,
    planning_sentence,
    read_train_metrics,
)
from layercard.report.tables import LOSS, METRIC, STEP, fmt, with_error
from layercard.run_layout import RunLayout


def matrix_ranking(card: Any) -> list[tuple[str, float]]:
    """The card's roles by their share of its default score summed over layers, highest first."""
    totals = {role: float(card.layer_scores(roles=(role,)).sum()) for role in card.roles}
    total = sum(v for v in totals.values() if v > 0) or 1.0
    return sorted(((r, max(v, 0.0) / total) for r, v in totals.items()), key=lambda x: -x[1])


def task_rows(root: Path) -> dict[str, Any]:
    """What the overview shows of one run folder."""
    from layercard.card import Card
    from layercard.plan import Plan

    lay = RunLayout(root)
    card = load_optional(Card.load, lay.card_json)
    results = collect_results(root)
    by_name = {r["name"]: r for r in results["rows"]}
    rows, sentence, rec = [], None, None
    metrics = {}
    for name in placement_names(root):
        plan = load_optional(Plan.load, lay.plan_json(name))
        m = load_optional(read_train_metrics, lay.train_metrics(name))
        if m is not None:
            metrics[name] = m
        r = by_name.get(name, {})
        cand = plan.predicted.get("candidate") if plan else None
        if plan is not None and plan.config.get("policy") == "recommend":
            sentence, rec = plan.predicted["recommendation"], name
        rows.append(
            {
                "name": name,
                "placement": row_label(cand) if cand else "—",
                "params": m.trainable_params if m else None,
                "params_x": cand.get("params_x") if cand else None,
                "s_per_step": m.s_per_step if m else None,
                "peak_memory_mib": m.peak_memory_mib if m else None,
                "predicted_quality": (plan.predicted.get("quality") or {}).get("fraction") if plan else None,
                "measured_fraction": r.get("measured_fraction"),
                "measured_fraction_se": r.get("measured_fraction_se"),
                "eval_loss": r.get("eval_loss"),
                "primary_value": r.get("primary_value"),
            }
        )
    return {
        "task": card.task["name"] if card else root.name,
        "matrices": matrix_ranking(card) if card else [],
        "score": card.default_score if card else None,
        "recommendation": sentence,
        "planning": planning_sentence(card, metrics, rec) if card else None,
        "measured_leads": measured_leads_sentence(results["rows"]),
        "primary_metric": results["primary_metric"],
        "base_loss": results["base_loss"],
        "reference": results["reference"],
        "rows": rows,
        # where the steps and peaks were measured: the trainings' machine
        "machine": next((m.provenance.get("machine") for m in metrics.values()), None),
    }


def overview_markdown(tasks: dict[str, dict[str, Any]], wall_s: float | None = None) -> str:
    """The overview page as markdown (``tasks``: task name → :func:`task_rows`)."""
    out = ["# layercard demo: where should LoRA go, and at what rank, for a small adapter?", ""]
    for name, t in tasks.items():
        ranking = ", ".join(f"{role} {100 * share:.0f}%" for role, share in t["matrices"][:4])
        out += [f"## {name}", ""]
        if t["matrices"]:
            shown = min(4, len(t["matrices"]))
            of = f"the top {shown} of {len(t['matrices'])}" if shown < len(t["matrices"]) else "all"
            score = f"{t.get('score') or 'default'} score"
            out += [
                f"The card's {score} summed by matrix over the layers (share of the total; {of}): {ranking}.",
                "",
            ]
        if t["recommendation"]:
            out += [f"Recommendation: {t['recommendation']}", ""]
        primary = t["primary_metric"] or "metric"
        out += [
            f"| placement | matrices · layers · rank | params | × ref | s/step | peak MiB | quality measured "
            f"| predicted | eval loss | {primary} |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in t["rows"]:
            out.append(
                f"| {r['name']} | {r['placement']} | {fmt(r['params'], ',')} | {fmt(r['params_x'], '.2f')} | "
                f"{fmt(r['s_per_step'], STEP)} | {fmt(r['peak_memory_mib'], ',.0f')} | "
                f"{with_error(r['measured_fraction'], r.get('measured_fraction_se'))} | "
                f"{fmt(r['predicted_quality'], '.2f')} | "
                f"{fmt(r['eval_loss'], LOSS)} | {fmt(r['primary_value'], METRIC)} |"
            )
        out += [
            "",
            f"Quality: the eval-loss drop from the base model ({fmt(t['base_loss'], LOSS)}) as a fraction "
            f"of the reference's ({t['reference'] or 'not trained'}); ± its sampling error over the "
            "evaluated examples, one standard error.",
            "",
        ]
        if t.get("measured_leads"):
            out += [t["measured_leads"], ""]
        if t.get("planning"):
            out += [t["planning"], ""]
    if wall_s is not None:
        out += [f"Wall time: {wall_s:.0f} s.", ""]
    machines = list(dict.fromkeys(machine_text(t["machine"]) for t in tasks.values() if t.get("machine")))
    if machines:
        out += [f"Measured on {' and '.join(machines)}.", ""]
    return "\n".join(out)


def write_overview(folders: dict[str, Path], path: Path, wall_s: float | None = None) -> dict[str, Any]:
    """Write the overview of ``folders`` (task name → run folder) to ``path``; returns what it shows."""
    tasks = {name: task_rows(folder) for name, folder in folders.items()}
    write_text(path, overview_markdown(tasks, wall_s))
    return tasks
