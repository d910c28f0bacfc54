"""Assembling the report: every section once, rendered as self-contained HTML and as markdown."""

from __future__ import annotations

import base64
import dataclasses
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layercard.artifacts import atomic_path, machine_text, write_text
from layercard.errors import LayercardError
from layercard.progress import count
from layercard.report.figures import (
    Figure,
    fig_gain,
    fig_placements,
    fig_quality_cost,
    fig_trace,
    fig_training,
    palette,
)
from layercard.report.results import (
    collect_results,
    eval_loss_sentence,
    load_optional,
    measured_leads_sentence,
    placement_names,
    planning_sentence,
    read_train_metrics,
    read_trim,
    run_config,
    stages_active,
    trim_target,
)
from layercard.report.tables import (
    Table,
    eval_table,
    headline_table,
    markdown_text,
    plans_table,
    recommendation_table,
    spearman_or_none,
    stages_table,
    sweep_table,
    train_table,
)
from layercard.run_layout import BASE_EVAL, FIGURES_DIR, PLAN_FILE, TRIMMED_EVAL, RunLayout

if TYPE_CHECKING:
    from layercard.card import Card
    from layercard.plan import Plan
    from layercard.train import TrainMetrics
    from layercard.trim import Trace

__all__ = ["build_report"]


# Every figure a report draws: the names an existing figures folder may hold for a report to replace it.
REPORT_FIGURES = frozenset(
    {
        "frontier.png", "card_heatmap.png", "card_profiles.png", "card_coupling.png", "placements.png",
        "training.png", "trace.png", "gain.png", "quality_cost.png",
    }
)  # fmt: skip


@dataclasses.dataclass
class _Doc:
    """Sections accumulated once, rendered as HTML and as markdown."""

    title: str
    fig_dir: Path
    parts: list[tuple[str, Any]] = dataclasses.field(default_factory=list)  # (kind, payload)
    figures: list[Figure] = dataclasses.field(default_factory=list)

    def h2(self, text: str) -> None:
        self.parts.append(("h2", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, t: Table) -> None:
        self.parts.append(("table", t))

    def figure(self, name: str, caption: str, make: Callable[[Path], bytes | Path | None]) -> None:
        """Add the figure ``name`` that ``make(path)`` writes (it returns the PNG bytes or path, or None)."""
        assert name in REPORT_FIGURES, name  # the names a later report may replace
        got = make(self.fig_dir / name)
        if got is None:
            return
        f = Figure(name, caption, got if isinstance(got, bytes) else Path(got).read_bytes())
        self.figures.append(f)
        self.parts.append(("figure", f))

    def html(self) -> str:
        out = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, x in self.parts:
            if kind == "h2":
                anchor = "".join(c if c.isalnum() else "-" for c in x.lower())
                out.append(f'<h2 id="{anchor}">{html.escape(x)}</h2>')
            elif kind == "p":
                out.append(f"<p>{html.escape(x)}</p>")
            elif kind == "table":
                out.append(x.html())
            else:
                b64 = base64.b64encode(x.png).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(x.caption)}" src="data:image/png;base64,{b64}">'
                    f"<figcaption>{html.escape(x.caption)}</figcaption></figure>"
                )
        body = "\n".join(out)
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n"
        )

    def markdown(self, figures_rel: str) -> str:
        out = [f"# {markdown_text(self.title)}", ""]
        for kind, x in self.parts:
            if kind == "h2":
                out += [f"## {markdown_text(x)}", ""]
            elif kind == "p":
                out += [markdown_text(x), ""]
            elif kind == "table":
                out += [x.markdown(), ""]
            else:
                caption = markdown_text(x.caption).replace("[", "\\[").replace("]", "\\]")
                out += [f"![{caption}]({figures_rel}/{x.name})", ""]
        return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{font-size:1.5em;border-bottom:2px solid #444;padding-bottom:4px}
h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc;padding-bottom:2px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
figure{margin:8px 0 20px}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555}p{line-height:1.45}
"""


@dataclasses.dataclass(frozen=True)
class _Run:
    """The artifacts of one run folder, each read once through its typed loader."""

    lay: RunLayout
    run_cfg: dict[str, Any] | None
    card: Card | None
    names: list[str]
    plans: dict[str, Plan]
    metrics: dict[str, TrainMetrics]
    trim: dict[str, Any] | None  # trim.json: a plain dict, checked by read_trim (trim has no typed loader)
    trace: Trace | None
    results: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.lay.root

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.results["rows"]


def _load_run(root: Path) -> _Run:
    from layercard.card import Card
    from layercard.plan import Plan
    from layercard.trim import Trace

    lay = RunLayout(root)
    names = placement_names(root)
    results = collect_results(root)
    # only what the results kept: a stale or failed stage's artifacts are left out of every section
    gone = set(results["left_out"])
    plans = {
        n: x
        for n in names
        if f"plan:{n}" not in gone and (x := load_optional(Plan.load, lay.plan_json(n))) is not None
    }
    metrics = {
        n: x
        for n in names
        if f"train:{n}" not in gone
        and f"plan:{n}" not in gone
        and (x := load_optional(read_train_metrics, lay.train_metrics(n))) is not None
    }
    trimmed = any(r["kind"] == "trimmed" for r in results["rows"])
    trim = load_optional(read_trim, lay.trim_json) if stages_active(root)[0] and trimmed else None
    trace = load_optional(Trace.load, lay.trace_json) if trim is not None and trim.get("trace") else None
    return _Run(
        lay=lay,
        run_cfg=run_config(root),
        card=load_optional(Card.load, lay.card_json) if "card" not in gone else None,
        names=names,
        plans=plans,
        metrics=metrics,
        trim=trim,
        trace=trace,
        results=results,
    )


# ---------------------------------------------------------------------------------------------------------
# Sections, in the order the report shows them
# ---------------------------------------------------------------------------------------------------------


def _recommended(run: _Run) -> str | None:
    """The name of the run's placement planned by the `recommend` policy, if it has one."""
    return next((n for n, p in run.plans.items() if p.config.get("policy") == "recommend"), None)


def _recommendation(doc: _Doc, run: _Run) -> None:
    """The answer first: the recommendation in one sentence, its frontier with every trained search
    placement's measured point, and the placements side by side."""
    rec = _recommended(run)
    if rec is None:
        return
    from layercard.plan.figures import plot_frontier
    from layercard.plan.quality import OTHER_MODEL, REFERENCE_RANK

    plan = run.plans[rec]
    doc.h2("Recommendation")
    doc.p(f"{rec}: {plan.predicted['recommendation']}")
    # beside the sentence it qualifies: on another model than the quality model's own, its fractions are
    # unmeasured
    for w in [w for w in plan.warnings if w.startswith(OTHER_MODEL)][:1]:
        doc.p(f"Caution: {w}")
    ref = run.results.get("reference")
    doc.p(
        "Quality is the fraction of the reference's loss drop (every linear module of every layer at rank "
        f"{REFERENCE_RANK}): predicted by the quality model, measured as the placement's eval-loss drop over "
        + (f"that of placement {ref}." if ref else "the reference's, which this run did not train.")
    )
    measured: dict[str, dict[str, float]] = {}
    for r in run.rows:
        p = run.plans.get(r["name"])
        cand = p.predicted.get("candidate") if p is not None else None
        # the reference's fraction is 1 by its definition, not a measurement of the quality model
        if cand is not None and r.get("measured_fraction") is not None and not r.get("is_reference"):
            # each point at its measured cost where the run measured it, its prediction beside it
            ran = {"params": r.get("trainable_params"), "step_time": r.get("s_per_step"),
                   "memory": r.get("peak_memory_mib")}  # fmt: skip
            costs = {k: float(cand[k]) for k in plan.predicted["frontier"] if k in cand}
            at = {k: float(ran[k]) if ran.get(k) is not None else v for k, v in costs.items()}
            measured[r["name"]] = {**at, **{f"{k}_predicted": v for k, v in costs.items()},
                                   "fraction": r["measured_fraction"], "predicted": cand["quality"],
                                   "se": r.get("measured_fraction_se")}  # fmt: skip
    doc.figure(
        "frontier.png",
        "Predicted frontier of quality against each budgeted cost (band: each placement's expected error); "
        "squares: the practitioners' rules fitted to the same budgets; star: the recommendation"
        + (
            "; diamonds: each trained placement's measured quality at its measured cost, with its sampling "
            "error (arrow from its prediction), the reference left out as its fraction is 1 by definition"
            if measured
            else " (no measured points: " + _no_scale(run) + ")"
        ),
        lambda p: plot_frontier(plan, p, measured, colors=palette([r["name"] for r in run.rows])),
    )
    table = recommendation_table(run.plans, run.metrics, run.results)
    doc.table(table)
    doc.p(
        "In the quality column the two ± differ: the measured one is one standard error over the evaluated "
        "examples (it does not cover the training seed); the predicted one is the quality model's expected "
        "absolute error for a placement covering that much of the depth, from its errors on benchmark tasks "
        "it was not fitted on: not a confidence interval."
    )
    quality = table.header.index("quality measured / predicted")
    if any("(step " in row[quality] for row in table.rows):
        doc.p(
            "A measured quality marked (step N of M) is that of an adapter holding step N's weights, the "
            "lowest validation loss (keep_best, early stopping); its prediction is for all M planned steps."
        )
    leads = measured_leads_sentence(run.rows) or eval_loss_sentence(run.rows)
    if leads:
        doc.p(leads)


def _no_scale(run: _Run) -> str:
    """Why no trained search placement has a measured point: no reference drop measured, one that is not
    positive, or (a reference drop to scale by) none of them evaluated."""
    ref = next((r for r in run.rows if r.get("is_reference")), None)
    if ref is None or ref.get("measured_gain") is None:
        return "the run measured no reference loss drop to scale them by"
    if ref["measured_gain"] <= 0:
        return f"the reference's loss drop, {ref['measured_gain']:.4f}, is not one to scale them by"
    return "no placement the search priced was evaluated but the reference, whose fraction is 1 by definition"


def _headline(doc: _Doc, run: _Run) -> None:
    doc.h2("Headline: quality against cost")
    trimmed = any(r["kind"] == "trimmed" for r in run.rows)
    base = any(r["kind"] == "base" for r in run.rows)
    doc.p(
        "One row per model: "
        + ("the base model, " if base else "")
        + "each trained placement"
        + (", and the trimmed adapter (adapters above the boundary K dropped)" if trimmed else "")
        + (
            ". Loss drop = base eval loss − the model's eval loss."
            if base
            else ". The base model was not evaluated, so no loss drop is measured."
        )
        + (
            " The trimmed adapter was trained as its parent, so its training cost is the parent's."
            if trimmed
            else ""
        )
    )
    if run.results.get("left_out"):
        doc.p(
            "Left out: the artifacts of "
            + ", ".join(run.results["left_out"])
            + ", whose stage failed, was made from inputs the run has since replaced, or whose files "
            "were rewritten after it (by a command run into the run's folder); the next `layercard run` "
            "makes them again."
        )
    for stage, error in (run.results.get("failed") or {}).items():
        doc.p(f"Failed: {stage}, which left no artifact ({error or 'no error recorded'}).")
    doc.table(headline_table(run.results))
    if any(r.get("s_per_example") is not None for r in run.rows):
        doc.p(
            "Infer s/example is the wall time of greedy generation per evaluated example: it grows with the "
            "tokens a model generates, so a model that stops sooner is faster for that alone; set it "
            "against the tokens each generated per example beside it."
        )
    if any(r.get("peak_memory_kind") == "process_peak_rss" for r in run.rows):
        doc.p(
            "Peak memory on CPU is the process's peak resident size while that placement trained (the "
            "loaded model and the process around it included; the peak is reset before each training)."
        )
    if any(r.get("peak_memory_kind") == "process_lifetime_peak_rss" for r in run.rows):
        doc.p(
            "Where a peak is the process's since it began (this system offers no reset of it), it includes "
            "everything the process did before that placement trained: the card, and the placements "
            "trained before it. Such peaks can only grow from one placement to the next and do not compare "
            "placements."
        )


def _card(doc: _Doc, run: _Run) -> None:
    """The Layer Card and its coupling matrix."""
    doc.h2("Layer Card")
    card = run.card
    if card is None:
        doc.p("No card.json in this run.")
        return
    from layercard.card import figures as card_figures
    from layercard.card.summary import top_layers

    doc.p(
        f"{card.model['id']} ({card.n_layers} layers), task {card.task['name']} ({card.task['split']}), "
        f"{card.task['n_examples']} probe examples, {card.n_target_tokens} target tokens, probe loss "
        f"{card.loss:.4f}; roles {','.join(card.roles)}. Top-5 layers by the planner's score "
        f"'{card.default_score}': {top_layers(card, card.default_score)}; by resnorm: "
        f"{top_layers(card, 'resnorm')}. Score basis: {card.default_score_basis}."
    )
    doc.figure(
        "card_heatmap.png",
        "Layer Card heat map: log10 resnorm per layer and role",
        lambda p: card_figures.heatmap(card, p),
    )
    doc.figure(
        "card_profiles.png",
        "Per-layer profiles: resnorm, gradient norm, activation energy, first-step rate",
        lambda p: card_figures.profiles(card, p),
    )
    doc.h2("Coupling matrix")
    if card.coupling:
        doc.figure(
            "card_coupling.png",
            "Layer coupling: cosines of the layers' update effects on the output",
            lambda p: card_figures.coupling(card, p),
        )
    else:
        doc.p("The card was computed without coupling (card.coupling: false).")


def _plans(doc: _Doc, run: _Run) -> None:
    doc.h2("Plans")
    if not run.plans:
        doc.p("No plans in this run.")
        return
    rows = run.rows
    doc.table(plans_table(run.plans))
    if any("candidate" not in plan.predicted for plan in run.plans.values()):
        doc.p(
            "A layer policy's predicted gain is the card's score summed over its layers' units (no unit), "
            "and its share is of that sum over all layers: a ranking of layers, not a predicted loss or "
            "quality. The search placements' share is the quality model's prediction."
        )
    n_layers = run.card.n_layers if run.card else 1 + max((x for r in rows for x in r["layers"]), default=0)
    doc.figure(
        "placements.png",
        "Adapted layers of every placement",
        lambda p: fig_placements(rows, n_layers, p, plans=run.plans),
    )
    for name, plan in run.plans.items():
        for w in plan.warnings:
            doc.p(f"{name}: warning: {w}")


def _training(doc: _Doc, run: _Run) -> None:
    doc.h2("Training")
    if not run.metrics:
        doc.p("No training metrics in this run.")
        return
    doc.table(train_table(run.metrics))
    doc.p(
        "Measured s/step is the median of the timed steps (a session's first step, which pays warm-up, "
        "left out where another was timed); mean tokens/s is those steps' tokens over their summed seconds, "
        "so it need not equal the tokens per step over the median s/step. Val loss is training's own "
        "validation loss on its validation examples, for its curve; eval loss, in the tables above, is the "
        "evaluation's on its own examples: the two need not agree."
    )
    for name, m in run.metrics.items():
        if (kept := m.kept_text()) is not None:
            doc.p(
                f"{name}: the adapter holds {kept}; the plan predicted its quality after the "
                f"{m.planned_steps} planned steps"
            )
        for line in [*(m.budget_notes or []), *(m.price_notes or [])]:
            doc.p(f"{name}: warning: {line}")
    planning = _planning_cost(run)
    if planning:
        doc.p(planning)
    doc.figure(
        "training.png",
        "Training loss per step (solid; past 100 logged steps, a sliding mean over the raw losses, drawn "
        "faint) and validation loss (dashed)",
        lambda p: fig_training(run.metrics, p, [r["name"] for r in run.rows]),
    )


def _planning_cost(run: _Run) -> str | None:
    return planning_sentence(run.card, run.metrics, _recommended(run)) if run.card is not None else None


def _trimming(doc: _Doc, run: _Run) -> None:
    from layercard.trim import latency_text

    doc.h2("Boundary trace and trimming")
    trim = run.trim
    if trim is None:
        enabled = stages_active(run.root)[0]
        gone = "trim" in run.results["left_out"] or "trim" in (run.results.get("failed") or {})
        doc.p(
            "Trimming was not run (trim.enabled: false)."
            if not enabled
            else "The trim's artifacts are not this run's (see above)."
            if gone
            else "Trimming has not run yet."
        )
        return
    target = trim_target(run.root, trim)
    cands = ", ".join(
        f"{k.replace('_', ' ')} at layer {v}" for k, v in (trim.get("candidates") or {}).items()
    )
    b, a = trim["before"], trim["after"]
    doc.p(
        f"Placement {target}: candidates {cands or '— (fixed window)'}; swept K = {trim['ks']} on "
        f"{trim['task']['n_examples']} {trim['task']['split']} examples by {trim['metric']}; chosen K = "
        f"{trim['chosen_k']}: adapted layers {b['n_adapted_layers']} → {a['n_adapted_layers']}, modules "
        f"{b['adapted_modules']} → {a['adapted_modules']}, inference {latency_text(b, a)}."
    )
    if trim.get("metric_flat"):
        from layercard.errors import run_section
        from layercard.trim import flat_metric_text

        with run_section("trim"):  # a report is of a run folder, whose config sets trim.metric
            text = flat_metric_text(trim["metric"], trim.get("chosen_by"))
        doc.p(text[0].upper() + text[1:] + ".")
    if a["n_adapted_layers"] == b["n_adapted_layers"]:
        doc.p(
            "No layer could be dropped: the best boundary keeps every adapted layer, so the trimmed "
            "adapter is the trained one (the logit lens shows where the gold token becomes likely; "
            "adapters above that layer are the ones trimming can remove)."
        )
    doc.figure(
        "trace.png",
        "Logit-lens P(gold token) by layer with the adapter on and off, "
        "boundary candidates marked (left); sweep of the metric over K (right)",
        lambda p: fig_trace(run.trace, trim, p),
    )
    doc.table(sweep_table(trim))
    repeats = len(trim["before"].get("s_per_example_samples") or [1])
    timed = "one pass" if repeats == 1 else f"the fastest of {count(repeats, 'pass')}"
    generated = any(r.get("s_per_example") is not None for r in trim["sweep"])
    doc.p(
        (
            "The sweep's s/example is one generation pass per K, which the machine's load moves; the "
            if generated
            else "The sweep scored each K by its loss alone, generating nothing; the "
        )
        + f"latencies before and after trimming above are each {timed}."
    )


def _predicted_vs_measured(doc: _Doc, run: _Run) -> None:
    doc.h2("Predicted vs measured gain")
    rows = run.rows
    pts = [
        r
        for r in rows
        if r["kind"] == "placement"
        and r.get("predicted_gain") is not None
        and r.get("measured_gain") is not None
    ]
    scores = list(dict.fromkeys(str(p.predicted.get("score")) for p in run.plans.values()))
    score = "/".join(scores) or "?"
    if len(scores) > 1:
        doc.p(
            f"The placements were planned with different scores ({', '.join(scores)}): their predicted gains "
            "are in different units and do not rank against each other."
        )
    if not pts:
        placed = [r for r in rows if r["kind"] == "placement"]
        if placed and all(r.get("predicted_gain") is None for r in placed):
            # the Recommendation section, and its table, exist only where a placement was recommended
            where = (
                "which the Recommendation table sets against the measured one"
                if _recommended(run) is not None
                else "which the Plans table gives as the predicted share and the headline table measures "
                "as the loss drop"
            )
            doc.p(
                "No placement here predicts a set gain: their policies predict quality instead, as a "
                f"fraction of the reference's loss drop, {where}."
            )
        else:
            doc.p(
                "Needs plans with a predicted set gain and the evaluations of the base model and the "
                "placements."
            )
        return
    rho = spearman_or_none([r["predicted_gain"] for r in pts], [r["measured_gain"] for r in pts])
    doc.p(
        f"Predicted set gain is in the units of the card score '{score}' (it ranks placements; it is "
        "not a loss). Measured gain is the drop of the eval loss against the base model. "
        + (
            f"Spearman ρ over {len(pts)} placements: {rho:.2f}."
            if rho is not None
            else f"{len(pts)} placement(s): too few for a rank correlation."
        )
    )
    doc.figure(
        "gain.png",
        "Predicted set gain (plan) against the measured loss drop",
        lambda p: fig_gain(rows, score, p),
    )


def _quality_vs_cost(doc: _Doc, run: _Run) -> None:
    doc.h2("Quality vs cost")
    if not any(r["kind"] != "base" for r in run.rows):
        doc.p("No trained placements to compare.")
        return
    doc.figure(
        "quality_cost.png",
        "Primary metric (top) and eval loss (bottom) against train s/step, "
        "peak memory, adapted modules and inference s/example; dotted: the base model",
        lambda p: fig_quality_cost(run.rows, run.results["primary_metric"], p),
    )


def _evaluation(doc: _Doc, run: _Run) -> None:
    from layercard.evaluate import EvalResult

    doc.h2("Evaluation")
    if not run.rows:
        doc.p("No evaluations in this run.")
        return
    lay = run.lay
    gone = set(run.results["left_out"])
    first = next(
        (
            lay.eval_json(n)
            for n in (BASE_EVAL, *run.names, TRIMMED_EVAL)
            if lay.eval_json(n).is_file() and f"eval:{n}" not in gone
        ),
        None,
    )
    if first is not None:
        ev = EvalResult.load(first)
        doc.p(
            f"{ev.n} examples of {ev.task.get('name')} ({ev.task.get('split')}), greedy decoding, "
            f"batch {ev.config.get('batch_size')}."
        )
    doc.table(eval_table(run.results))


def _provenance(doc: _Doc, run: _Run) -> None:
    doc.h2("Provenance")
    card = run.card
    parts = []
    if card is not None:
        parts.append(f"Model {card.model['id']} weights sha256 {card.model['hash'][:16]}…")
        # the card probes a subset of the training split: its hash is of those examples, not the data
        # the placements trained or were evaluated on
        parts.append(_data_text("the card's probe subset", [card.task]))
    parts += [
        _data_text("training data", [m.task for m in run.metrics.values()]),
        _data_text("evaluation data", _eval_tasks(run)),
        _data_text("trim sweep data", [run.trim.get("task") or {}] if run.trim is not None else []),
    ]
    text = "; ".join(p for p in parts if p)
    if card is not None:
        v = card.provenance.get("versions", {})
        machine = card.provenance.get("machine", {})
        text += (
            f"; seed {card.provenance.get('seed')}; "
            + ", ".join(f"{k} {val}" for k, val in v.items())
            + f"; machine {machine_text(machine)}"
        )
    if text:
        doc.p(text[0].upper() + text[1:] + ".")
    doc.table(stages_table(run.root))


def _eval_tasks(run: _Run) -> list[dict[str, Any]]:
    """The evaluated data of the evaluations the results kept, as their rows hold it."""
    return [r["eval_data"] for r in run.rows if r.get("eval_data")]


def _data_text(label: str, tasks: list[dict[str, Any]]) -> str | None:
    """``label`` (its task, split and examples) and the short sha256 of each distinct data set ``tasks``
    hold; None without one."""
    seen: dict[str, dict[str, Any]] = {}
    for t in tasks:
        if t.get("data_hash"):
            seen.setdefault(str(t["data_hash"]), t)
    if not seen:
        return None
    texts = []
    for h, t in seen.items():
        n = t.get("n_examples")
        what = [str(x) for x in (t.get("name"), t.get("split")) if x]
        what += [count(int(n), "example")] if n is not None else []
        texts.append(f"{label} ({', '.join(what)}) sha256 {h[:16]}…" if what else f"{label} sha256 {h[:16]}…")
    return "; ".join(texts)


_SECTIONS: tuple[Callable[[_Doc, _Run], None], ...] = (
    _recommendation,
    _headline,
    _card,
    _plans,
    _training,
    _trimming,
    _predicted_vs_measured,
    _quality_vs_cost,
    _evaluation,
    _provenance,
)


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def build_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``figures/``) for a run folder.

    ``out`` is the HTML path (default ``RUN_DIR/report.html``); the markdown goes beside it with the
    ``.md`` suffix and the PNG figures into ``figures/`` beside it. Returns the paths written.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise LayercardError(f"{root}: no such run folder")
    lay = RunLayout(root)
    if not lay.card_json.is_file() and not any(lay.plans_dir.glob(f"*/{PLAN_FILE}")):
        raise LayercardError(f"{root}: not a layercard run folder (no card/card.json or plan/*/plan.json)")
    html_path = Path(out) if out is not None else lay.report_html
    if html_path.suffix.lower() != ".html":
        raise LayercardError(f"--out {html_path}: give a path ending in .html (report.md goes beside it)")
    md_path = html_path.with_suffix(".md")
    fig_dir = html_path.parent / FIGURES_DIR
    # The report replaces its figures folder whole (none may linger from an earlier report): only one
    # that holds nothing but a report's figures.
    if fig_dir.exists() and (
        not fig_dir.is_dir()
        or any(not f.is_file() or f.name not in REPORT_FIGURES for f in fig_dir.iterdir())
    ):
        raise LayercardError(
            f"{fig_dir}: holds other files than a report's figures; give --out in another folder"
        )

    run = _load_run(root)
    model_id = run.card.model["id"] if run.card else (run.run_cfg or {}).get("model", "?")
    task_name = run.card.task["name"] if run.card else "?"
    # Nothing is replaced until every section is built: a failed report leaves the last one whole.
    with atomic_path(fig_dir) as tmp:
        tmp.mkdir(parents=True)
        doc = _Doc(f"layercard run · {model_id} · {task_name}", tmp)
        created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        doc.p(f"Run folder {root.resolve()}; report built {created} from the artifacts only.")
        for section in _SECTIONS:
            section(doc, run)
        html, md = doc.html(), doc.markdown(FIGURES_DIR)
    write_text(html_path, html)
    write_text(md_path, md)
    return {
        "html": str(html_path),
        "markdown": str(md_path),
        "figures": [str(fig_dir / f.name) for f in doc.figures],
    }
