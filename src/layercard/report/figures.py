"""The report's figures, written as PNG and kept in memory for inlining into the HTML."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layercard.plotting import new_figure, plain_text, save_png

if TYPE_CHECKING:
    from layercard.train import TrainMetrics
    from layercard.trim import Trace

__all__ = ["Figure", "fig_gain", "fig_placements", "fig_quality_cost", "fig_trace", "fig_training", "palette"]

_DPI = 100


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure written as PNG: file name, caption, and the bytes for inlining."""

    name: str
    caption: str
    png: bytes


def _save(fig: Any, path: Path) -> bytes:
    return save_png(fig, path, dpi=_DPI)


def palette(names: Sequence[str]) -> dict[str, Any]:
    """One colour per model, by its place among the run's rows: every figure passes the same names, so a
    placement has one colour throughout the report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def fig_placements(
    rows: list[dict[str, Any]], n_layers: int, path: Path, plans: Mapping[str, Any] | None = None
) -> bytes:
    """Which layers each placement adapts (the trimmed adapter included), each named with its matrices
    and rank: placements over the same layers differ in those. ``plans``: the placements' plans by name
    (a trimmed row reads its parent's); without one a row is named by its modules and parameters."""
    from matplotlib.patches import Rectangle

    shown = [r for r in rows if r["kind"] != "base"]
    colors = palette([r["name"] for r in rows])  # each placement in its colour of the other figures
    fig, ax = new_figure(figsize=(min(12, 2 + 0.3 * n_layers), 0.9 + 0.45 * len(shown)))
    for i, r in enumerate(shown):
        for layer in r["layers"]:
            # hollow, as in the quality-cost chart: the trimmed adapter is its parent's training, cut
            hollow = r["kind"] == "trimmed"
            ax.add_patch(
                Rectangle(
                    (layer - 0.45, i - 0.38),
                    0.9,
                    0.76,
                    facecolor="none" if hollow else colors[r["name"]],
                    edgecolor=colors[r["name"]],
                    linewidth=1.5 if hollow else 0.0,
                )
            )
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_ylim(-0.6, len(shown) - 0.4)
    ax.set_yticks(range(len(shown)), [_placement_label(r, plans or {}) for r in shown], fontsize=8)
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_xlabel("layer")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    trimmed = any(r["kind"] == "trimmed" for r in shown)
    ax.set_title(
        "adapted layers per placement" + (" (hollow: the trimmed adapter)" if trimmed else ""), fontsize=9
    )
    return _save(fig, path)


def _placement_label(row: dict[str, Any], plans: Mapping[str, Any]) -> str:
    """A placement's name over what sets it apart where layers do not: its matrices and rank (from its
    plan, the parent's for a trimmed adapter), else its modules and parameters."""
    plan = plans.get(row["name"]) or plans.get(row.get("parent") or "")
    if plan is not None and plan.units:
        matrices = (plan.predicted.get("candidate") or {}).get("matrices")
        matrices = matrices or ",".join(dict.fromkeys(u.role for u in plan.units))
        ranks = sorted({u.rank for u in plan.units})
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
        return f"{row['name']}\n{matrices}, {rank}"
    about = [
        f"{row[k]:,.0f} {noun}"
        for k, noun in (("modules", "modules"), ("trainable_params", "params"))
        if row.get(k) is not None
    ]
    return "\n".join([row["name"], ", ".join(about)]) if about else row["name"]


# A loss curve with more logged steps than this is drawn as a sliding mean over its faint raw losses.
SMOOTH_AFTER = 100


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def fig_training(curves: dict[str, TrainMetrics], path: Path, names: Sequence[str] = ()) -> bytes:
    """Training and validation loss curves of every placement; ``names``: the run's rows, for colours."""
    colors = palette([*names, *(n for n in curves if n not in names)])
    fig, ax = new_figure(figsize=(7.5, 4))
    for name, m in curves.items():
        steps, losses = [s for s, _ in m.loss_curve or []], [v for _, v in m.loss_curve or []]
        if len(steps) > SMOOTH_AFTER:
            # thousands of single-batch losses make a band that hides the other runs: the raw losses
            # stay, faint, under their sliding mean
            w = max(5, len(steps) // 25)
            ax.plot(steps, losses, color=colors[name], lw=0.6, alpha=0.25)
            ax.plot(
                steps, running_mean(losses, w), color=colors[name], lw=1.2,
                label=f"{name} train (mean of {w} logged steps)",
            )  # fmt: skip
        elif steps:
            ax.plot(steps, losses, color=colors[name], lw=1.2, label=f"{name} train")
        vc = m.val_curve or []
        if vc:
            ax.plot(
                [s for s, _ in vc],
                [v for _, v in vc],
                color=colors[name],
                ls="--",
                marker="o",
                ms=4,
                label=f"{name} validation",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean CE over target tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training curves", fontsize=9)
    return _save(fig, path)


def fig_trace(trace: Trace | None, trim: dict[str, Any], path: Path) -> bytes:
    """Logit-lens curves with the boundary candidates (when there is a trace), and the sweep's metric
    against K."""
    panels = 2 if trace is not None else 1
    fig, axes = new_figure(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    axes = axes[0]
    if trace is not None:
        _trace_panel(axes[0], trace, trim["chosen_k"])
    _sweep_panel(axes[-1], trim)
    return _save(fig, path)


def _trace_panel(ax: Any, trace: Trace, chosen: int) -> None:
    """Both lens curves, the boundary candidates of the 'on' curve and the chosen K (drawn by trim)."""
    from layercard.trim import draw_trace

    draw_trace(ax, trace, chosen_k=chosen)
    ax.set_title(f"boundary trace · {trace.n_examples} examples", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _sweep_panel(ax: Any, trim: dict[str, Any]) -> None:
    """The selection metric (and the loss, grey) against K, the chosen K marked (drawn by trim)."""
    from layercard.trim import draw_sweep
    from layercard.trim.figures import sweep_legend

    sweep_legend(ax, draw_sweep(ax, trim), "trim sweep")
    ax.grid(alpha=0.3)


def fig_gain(rows: list[dict[str, Any]], score: str, path: Path) -> bytes:
    """The plans' predicted set gain against the measured loss drop, one point per placement."""
    pts = [r for r in rows if r["kind"] == "placement" and r.get("predicted_gain") is not None]
    colors = palette([r["name"] for r in rows])  # the same colour per model as in the cost chart
    fig, ax = new_figure(figsize=(6, 4.5))
    for r in pts:
        y = r.get("measured_gain")
        if y is None:
            continue
        ax.scatter([r["predicted_gain"]], [y], s=40, color=colors[r["name"]])
        ax.annotate(
            r["name"], (r["predicted_gain"], y), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    ax.set_xlabel(f"predicted set gain (card score '{score}', plan.json)")
    ax.set_ylabel("measured loss drop (base − adapted eval loss)")
    ax.grid(alpha=0.3)
    ax.set_title("predicted vs measured gain", fontsize=9)
    return _save(fig, path)


_COSTS = (
    ("s_per_step", "train s/step"),
    ("peak_memory_mib", "peak memory (MiB)"),
    ("modules", "adapted modules (inference)"),
    ("s_per_example", "inference s/example"),
)


def fig_quality_cost(rows: list[dict[str, Any]], primary: str | None, path: Path) -> bytes:
    """Primary metric (top) and eval loss (bottom) against each cost, one point per model."""
    from matplotlib.transforms import offset_copy

    shown = [r for r in rows if r["kind"] != "base"]
    colors = palette([r["name"] for r in rows])
    base = next((r for r in rows if r["kind"] == "base"), None)
    qualities = [("primary_value", primary or "primary metric"), ("eval_loss", "eval loss (lower is better)")]
    fig, axes = new_figure(2, len(_COSTS), figsize=(4 * len(_COSTS), 7), squeeze=False)
    for row_i, (qkey, qlabel) in enumerate(qualities):
        for col, (ckey, clabel) in enumerate(_COSTS):
            ax = axes[row_i][col]
            points = [
                (r, r[ckey], r[qkey]) for r in shown if r.get(ckey) is not None and r.get(qkey) is not None
            ]
            # models at one point side by side, a few points apart, in the rows' order: else the last
            # drawn hides the others
            ties: dict[tuple[float, float], list[str]] = {}
            for r, x, y in points:
                ties.setdefault((x, y), []).append(r["name"])
            for r, x, y in points:
                at = ties[(x, y)]
                shift = (at.index(r["name"]) - (len(at) - 1) / 2) * _TIE_SHIFT
                moved = (
                    {"transform": offset_copy(ax.transData, fig, x=shift, units="points")} if shift else {}
                )
                ax.update_datalim([(x, y)])  # a shifted marker does not widen the axis by itself
                if r["kind"] == "trimmed":  # hollow and larger: it shares its parent's training cost
                    ax.scatter(
                        [x], [y], s=110, marker="s", facecolors="none", edgecolors=colors[r["name"]],
                        linewidths=2, label=r["name"], **moved,
                    )  # fmt: skip
                else:
                    ax.scatter(
                        [x],
                        [y],
                        s=45,
                        marker="o",
                        color=colors[r["name"]],
                        alpha=0.85,
                        label=r["name"],
                        **moved,
                    )
            if base is not None and base.get(qkey) is not None:
                _base_line(ax, base[qkey], [y for _, _, y in points])
            _cost_ticks(ax, integer=ckey == "modules")
            ax.grid(alpha=0.3)
            if row_i == len(qualities) - 1:
                ax.set_xlabel(clabel)
            if col == 0:
                ax.set_ylabel(qlabel)
    # every panel's entries: a model without one cost (no inference timing, say) is drawn in the others only
    uniq: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            uniq.setdefault(label, handle)
    trimmed = any(r["kind"] == "trimmed" for r in shown)
    fig.suptitle(
        "quality against cost" + (" (hollow square: trimmed adapter)" if trimmed else ""), fontsize=10
    )
    plain_text(fig)
    fig.tight_layout()
    if uniq:  # a run folder with training metrics but no evaluation has nothing to label
        fig.legend(
            uniq.values(),
            uniq.keys(),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(6, len(uniq)),
            fontsize=9,
        )
    return _save(fig, path)


_TIE_SHIFT = 7.0  # points between the markers of models at one point


def _base_line(ax: Any, value: float, ys: list[float]) -> None:
    """The base model's value as a dotted line where it lies near the models', else written in a band
    kept free at the edge it lies beyond: a line far off would stretch the axis until the models' values
    could not be told apart (an eval loss of 2.2 against adapted ones of 0.01 to 0.04)."""
    lo, hi = (min(ys), max(ys)) if ys else (value, value)
    width = max(hi - lo, 0.05 * max(abs(lo), abs(hi)), 1e-12)
    if lo - 2 * width <= value <= hi + 2 * width:
        ax.axhline(value, color="grey", ls=":", lw=1, label="base model")
        return
    above = value > hi
    margin = 0.08 * width
    ax.set_ylim(lo - margin - (0 if above else 0.2 * width), hi + margin + (0.2 * width if above else 0))
    ax.text(
        0.02, 0.98 if above else 0.02, f"base model {value:.4g}, {'above' if above else 'below'} this axis",
        transform=ax.transAxes, ha="left", va="top" if above else "bottom", fontsize=8, color="0.35",
    )  # fmt: skip


def _cost_ticks(ax: Any, integer: bool) -> None:
    """A few cost ticks, each written with as few decimals as tell it from its neighbours: at the default
    density an s/example axis's labels (0.1900 0.1925 …) ran into one another."""
    from matplotlib.ticker import Formatter, MaxNLocator

    class Compact(Formatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return self.format_ticks([x])[0]

        def format_ticks(self, values: Sequence[float]) -> list[str]:
            locs = sorted(values)
            step = min((b - a for a, b in zip(locs, locs[1:], strict=False) if b > a), default=0.0)
            step = step or abs(locs[0] if locs else 0.0) or 1.0
            decimals = next((d for d in range(10) if abs(round(step, d) - step) <= step * 1e-6), 10)
            return [f"{x:,.{decimals}f}" for x in values]

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], integer=integer))
    ax.xaxis.set_major_formatter(Compact())
