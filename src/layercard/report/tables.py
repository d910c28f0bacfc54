"""The report's tables, each rendered both as HTML and as markdown."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layercard.artifacts import lock_held
from layercard.plan.frontier import row_label
from layercard.progress import layers_text
from layercard.report.results import (
    LOSS,
    METRIC,
    STEP,
    measured_step_text,
    memory_figure_note,
    placement_names,
    predicted_forward_s,
    predicted_peak_mib,
    predicted_s_per_step,
    stages_active,
)
from layercard.run_layout import BASE_EVAL, TRIMMED_EVAL, RunLayout

if TYPE_CHECKING:
    from layercard.plan import Plan
    from layercard.train import TrainMetrics

__all__ = [
    "Table",
    "eval_table",
    "fmt",
    "headline_table",
    "plans_table",
    "recommendation_table",
    "spearman_or_none",
    "stages_table",
    "sweep_table",
    "train_table",
    "with_error",
]


def fmt(x: Any, spec: str = ".4g") -> str:
    """``x`` formatted by ``spec``; "—" for a missing value, "nan" for any non-finite float."""
    if x is None:
        return "—"
    if isinstance(x, (float, np.floating)) and not math.isfinite(x):
        return "nan"
    if isinstance(x, int) and not isinstance(x, bool) and spec == ",":
        return f"{x:,}"
    fixed = re.fullmatch(r",?\.(\d+)f", spec)
    if isinstance(x, (float, np.floating)) and fixed:
        # half up on the value as written (2/32 = 0.0625 -> 0.063): format() rounds the binary value half
        # to even, so an exact half printed low. repr(float(...)): a numpy float's own repr names its type.
        with localcontext() as ctx:
            ctx.prec = 400  # room for any finite float's digits at the asked places
            x = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-int(fixed.group(1))), ROUND_HALF_UP)
    return format(x, spec)


_LONG_UNITS = ((365.25 * 86400, "years"), (86400, "days"), (3600, "h"))


def seconds_text(x: float | None) -> str:
    """A duration in seconds: whole seconds from 100 s, tenths from 10 s, three significant digits below;
    from an hour on, also in hours, days or years ("7,200 s (2.0 h)"); "—" if missing."""
    if x is None:
        return "—"
    if abs(x) >= 100:
        # hours from one, days and years from two: "36.0 h" reads better than "1.5 days"
        long = [(size, name) for size, name in _LONG_UNITS if abs(x) >= (size if name == "h" else 2 * size)]
        return f"{x:,.0f} s" + (f" ({x / long[0][0]:,.1f} {long[0][1]})" if long else "")
    return f"{x:.1f} s" if abs(x) >= 10 else f"{x:.3g} s"


def with_error(x: Any, err: Any, spec: str = ".2f") -> str:
    """``x ± err`` (both with ``spec``), or ``x`` alone without an error; an em dash without ``x``."""
    return fmt(x, spec) if x is None or err is None else f"{fmt(x, spec)} ± {fmt(err, spec)}"


def _layers(layers: Sequence[int]) -> str:
    if not layers:
        return "—"
    return f"{layers_text(layers)} ({len(set(layers))})"


@dataclasses.dataclass(frozen=True)
class Table:
    """A header and rows of cell texts."""

    header: list[str]
    rows: list[list[str]]

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def markdown(self) -> str:
        def cell(c: str) -> str:
            return markdown_text(c).replace("|", "\\|")

        lines = ["| " + " | ".join(map(cell, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        return "\n".join(lines)


def markdown_text(text: str) -> str:
    """Text (a task or model name, a path) for one line of markdown: no tag a viewer would render as HTML
    (``<`` written as ``&lt;``, which reads back as ``<``), and no line break to end a table row or a
    heading."""
    return " ".join(str(text).splitlines()).replace("<", "&lt;")


def headline_table(results: dict[str, Any]) -> Table:
    """One row per compared model: its adapted layers, costs and quality."""
    p = results["primary_metric"] or "primary"
    header = [
        "model",
        "adapted layers",
        "modules",
        "trainable params",
        "train s/step",
        "peak MiB",
        "eval loss",
        "loss drop",
        p,
        "infer s/example",
        "generated tokens/example",
    ]
    rows = [
        [
            r["name"],
            _layers(r["layers"]),
            fmt(r.get("modules")),
            fmt(r.get("trainable_params"), ","),
            fmt(r.get("s_per_step"), STEP),
            fmt(r.get("peak_memory_mib"), ",.0f"),
            fmt(r.get("eval_loss"), LOSS),
            fmt(r.get("measured_gain"), LOSS),
            fmt(r.get("primary_value"), METRIC),
            fmt(r.get("s_per_example"), ".3f"),
            fmt(r.get("new_tokens_per_example"), ".1f"),
        ]
        for r in results["rows"]
    ]
    return Table(header, rows)


def plans_table(plans: dict[str, Plan]) -> Table:
    """One row per plan: its policy, layers, size and predicted gain and cost."""
    header = [
        "placement",
        "policy",
        "budget",
        "layers",
        "modules",
        "params",
        "rank",
        "predicted gain",
        "predicted share",
        "redundancy ρ",
        "predicted s/step",
    ]
    rows = []
    for name, plan in plans.items():
        pr, cfg = plan.predicted, plan.config
        frac = pr.get("fraction")
        # a search plan's fraction is the quality model's, of the reference's loss drop; a layer
        # policy's is of the card's all-layer set gain
        of = "of the reference's loss drop" if "candidate" in pr else "of the all-layer gain"
        rows.append(
            [
                name,
                cfg["policy"],
                str(cfg.get("budget") or "—"),
                _layers(plan.layers),
                fmt(pr.get("modules")),
                fmt(pr.get("params"), ","),
                str(cfg.get("rank")),
                "—" if pr.get("gain") is None else f"{fmt(pr.get('gain'))} ({pr.get('score')})",
                "—" if frac is None else f"{100 * frac:.1f}% {of}",
                fmt(pr.get("redundancy"), ".3f"),
                fmt(pr.get("step_time_s"), STEP),
            ]
        )
    return Table(header, rows)


def recommendation_table(
    plans: dict[str, Plan], metrics: dict[str, TrainMetrics], results: dict[str, Any]
) -> Table:
    """The search placements (the recommendation and the fixed rules) side by side: what each is, its
    predicted and measured cost and quality, and what the evaluation measured."""
    by_name = {r["name"]: r for r in results["rows"]}
    primary = results.get("primary_metric") or "metric"
    header = [
        "placement", "policy", "matrices · layers · rank", "params (× ref)", "s/step measured / predicted",
        "peak MiB measured / predicted", "quality measured / predicted", "eval loss", primary,
    ]  # fmt: skip
    rows = []
    for name, plan in plans.items():
        cand = plan.predicted.get("candidate")
        if cand is None:
            continue
        m, r = metrics.get(name), by_name.get(name, {})
        if m is not None:
            step, step_pred, peak_pred = m.s_per_step, predicted_s_per_step(m), predicted_peak_mib(m)
        else:  # not trained (a run stopped after its plans): the plan's own prices, as its frontier shows
            step, step_pred, peak_pred = None, cand.get("step_time"), cand.get("memory")
        quality, err = plan.predicted["quality"]["fraction"], plan.predicted["quality"].get("expected_error")
        ref = plan.predicted["reference"]["params"]
        rows.append(
            [
                name,
                str(plan.config["policy"]),
                row_label(cand),
                f"{int(cand['params']):,} ({fmt(cand['params'] / ref, '.2f')})",  # as the overview rounds
                f"{fmt(step, STEP)} / {fmt(step_pred, STEP)}",
                f"{fmt(m.peak_memory_mib if m else None, ',.0f')} / {fmt(peak_pred, ',.0f')}",
                # the reference's fraction is 1 by its definition, neither measured nor predicted
                "1 by definition"
                if r.get("is_reference")
                else f"{with_error(r.get('measured_fraction'), r.get('measured_fraction_se'))}"
                f"{_earlier_weights(m) if r.get('measured_fraction') is not None else ''} / "
                f"{with_error(quality, err)}",
                fmt(r.get("eval_loss"), LOSS),
                fmt(r.get("primary_value"), METRIC),
            ]
        )
    return Table(header, rows)


def _earlier_weights(m: TrainMetrics | None) -> str:
    """A measured quality's note where the adapter holds an earlier step's weights than the planned steps
    the prediction is for: " (step 20 of 80)"; else nothing."""
    if m is None or m.best_step is None or m.best_step == m.planned_steps:
        return ""
    return f" (step {m.best_step} of {m.planned_steps})"


def train_table(metrics: dict[str, TrainMetrics]) -> Table:
    """One row per placement from its train metrics."""
    header = [
        "placement",
        "steps",
        "s/step (measured: median, its steps' 10th–90th percentile)",
        "s/step (predicted)",
        # a mean rate: the timed steps' tokens over their summed seconds, so not tokens/step over the
        # median s/step beside it (slow steps weigh more in it than in a median)
        "mean tokens/s (timed steps' tokens / their summed s)",
        "peak MiB (measured)",
        "peak MiB (predicted: the plan's / from the run's start)",
        "unmerged forward s (measured / predicted)",
        "train loss first → last",
        "val loss",
    ]
    rows = [
        [
            name,
            str(m.steps) + (f" of {m.planned_steps} (stopped early)" if m.stopped_early else ""),
            measured_step_text(m.s_per_step, m.s_per_step_spread),
            fmt(predicted_s_per_step(m), STEP),
            fmt(m.tokens_per_s, ",.0f"),
            fmt(m.peak_memory_mib, ",.0f"),
            f"{fmt(predicted_peak_mib(m), ',.0f')} / {fmt(m.predicted_peak_memory_at_start_mib, ',.0f')}"
            + memory_figure_note(m.predicted_memory_figure),
            f"{fmt(m.forward_s, '.3f')} / {fmt(predicted_forward_s(m), '.3f')}",
            f"{fmt(m.first_train_loss, LOSS)} → {fmt(m.final_train_loss, LOSS)}",
            fmt(m.final_val_loss, LOSS)
            + (f" (adapter: step {m.best_step}'s {fmt(m.best_val_loss, LOSS)})" if m.best_step else ""),
        ]
        for name, m in metrics.items()
    ]
    return Table(header, rows)


def sweep_table(trim: dict[str, Any]) -> Table:
    """One row per boundary K the trim stage swept (trim.json), the chosen one ticked: the selection
    metric first, each column once (a sweep by loss shows its loss column once)."""
    metric = trim["metric"]
    texts = [m for m in dict.fromkeys([metric, *trim.get("metrics", [])]) if m != "loss"]
    # a sweep that scored by loss alone generated no texts: no column of dashes for their metrics
    scored = {m for r in trim["sweep"] for m in r.get("metrics", {})}
    shown = [m for m in dict.fromkeys([metric, *texts]) if m == "loss" or m == metric or m in scored][:4]
    if "loss" not in shown:
        shown.append("loss")
    # where the sweep generated, its s/example and the tokens each K generated, which that time depends on
    timed = any(r.get("s_per_example") is not None for r in trim["sweep"])
    tokens = any(r.get("new_tokens_per_example") is not None for r in trim["sweep"])
    extra = [*(["s/example"] if timed else []), *(["tokens/example"] if tokens else [])]
    header = ["K", "adapted layers", "modules", *shown, *extra]
    rows = []
    for r in trim["sweep"]:
        vals = [
            fmt(r.get("loss"), LOSS) if m == "loss" else fmt(r.get("metrics", {}).get(m), METRIC)
            for m in shown
        ]
        mark = " ✓" if r["k"] == trim["chosen_k"] else ""
        rows.append(
            [
                f"{r['k']}{mark}",
                str(r["n_adapted_layers"]),
                str(r["adapted_modules"]),
                *vals,
                *([fmt(r.get("s_per_example"), ".3f")] if timed else []),
                *([fmt(r.get("new_tokens_per_example"), ".1f")] if tokens else []),
            ]
        )
    return Table(header, rows)


def eval_table(results: dict[str, Any]) -> Table:
    """Every metric and the loss of every compared model."""
    names = list(dict.fromkeys(m for r in results["rows"] for m in r.get("metrics", {})))
    header = ["model", *names, "loss"]
    rows = [
        [r["name"], *[fmt(r["metrics"].get(m), METRIC) for m in names], fmt(r.get("eval_loss"), LOSS)]
        for r in results["rows"]
    ]
    return Table(header, rows)


def stages_table(root: Path) -> Table:
    """Each stage's record (status, fingerprint, wall time), for the stages the run's config has before
    the report; one recorded running that no process holds is shown as :data:`STOPPED`."""
    lay = RunLayout(root)
    names = placement_names(root)
    trim_on, base_on = stages_active(root)
    dirs = [lay.card_dir, *(lay.plan_dir(n) for n in names), *(lay.train_dir(n) for n in names)]
    dirs += [lay.trim_dir] if trim_on else []
    dirs += [
        lay.eval_dir(n)
        for n in ([BASE_EVAL] if base_on else []) + names + ([TRIMMED_EVAL] if trim_on else [])
    ]
    # the report's own record is left out: it is being written, and a rebuild would read it done
    rows = []
    run_held: bool | None = None
    for folder in dirs:
        p = RunLayout.stage_record(folder)
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        status = str(d.get("status"))
        if status == "running":
            # an interrupted stage's record stays `running`: it runs only while its writer holds a lock
            run_held = lock_held(root) if run_held is None else run_held
            if not run_held and not lock_held(folder):
                status = STOPPED
        rows.append(
            [
                str(d.get("stage")),
                status,
                str(d.get("fingerprint", ""))[:12],
                fmt(d.get("wall_time_s"), ".1f"),
            ]
        )
    return Table(["stage", "status", "fingerprint", "wall s"], rows)


# A stage recorded `running` whose run holds no lock: interrupted, and resumed by the next run
STOPPED = "stopped (a rerun resumes it)"


def spearman_or_none(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's ρ of three or more points, else (or when undefined) None."""
    if len(xs) < 3:
        return None
    from layercard.card.stats import spearman

    rho = spearman(list(xs), list(ys))
    return None if rho is None or not math.isfinite(rho) else float(rho)
