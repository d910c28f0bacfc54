"""The frontier figure of a search plan: predicted quality against each budgeted cost and against parameters
(docs/design.md §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layercard.plan.space import budget_label
from layercard.plotting import new_figure, plain_text, save_png

FRONTIER = "tab:blue"
_NEUTRAL = "0.45"
# colours for rules and trained placements a caller gave none: none of them the frontier's blue or a
# grey the measured points' legend entry could be mistaken for
_SPARE = (
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:green",
    "tab:red",
)
# where a measured point's name may go, in points from it (x on the side its place on the axis chose),
# nearest first
_NAME_ROWS = (-8, 8, -18, 18, -28, 28)

_LABELS = {
    "params": "trainable parameters",
    "modules": "adapted modules",
    "step_time": "s per training step",
    "memory": "peak training memory (MiB)",
}


def plot_frontier(
    plan: Any,
    path: str | Path,
    measured: dict[str, dict[str, float]] | None = None,
    colors: dict[str, Any] | None = None,
) -> Path:
    """One panel per cost the plan was budgeted on, and one for parameters always: the frontier, the chosen
    placement, the fixed rules.

    ``measured``: trained placements by name, each with its measured fraction of the reference's loss drop
    (``fraction``), its predicted one (``predicted``), its costs by kind and, where they differ, the
    predicted costs (``<kind>_predicted``); drawn as predicted → measured. ``colors``: a colour per name,
    for a measured point or a rule of that name, so that a placement keeps the colour of a caller's other
    figures.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pred = plan.predicted
    color_of = _point_colors([*(pred.get("defaults") or {}), *(measured or {})], colors or {})
    kinds = list(pred["frontier"])
    fig, axes = new_figure(1, len(kinds), figsize=(7.0 * len(kinds), 4.2), squeeze=False)
    placed: list[tuple[Any, list[Any]]] = []  # each panel's measured names
    marks: dict[Any, list[tuple[float, float]]] = {}  # and its points, which the names keep off
    err = pred["quality"].get("model_error", pred["quality"]["expected_error"])
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = pred["frontier"][kind]
        xs, ys = [r[kind] for r in rows], [r["quality"] for r in rows]
        ax.plot(xs, ys, marker="o", ms=4, color=FRONTIER, label="frontier (predicted)")
        errs = [r.get("error", err) for r in rows]  # each placement's expected error, else the model's
        shown_error = all(e is not None for e in errs)
        if shown_error:
            lo = [y - e for y, e in zip(ys, errs, strict=True)]
            hi = [y + e for y, e in zip(ys, errs, strict=True)]
            ax.fill_between(xs, lo, hi, color=FRONTIER, alpha=0.12)
            if len(xs) == 1:  # a band over one cost has no width: its error as a bar
                ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor=FRONTIER, alpha=0.5, capsize=4)
        for name, row in (pred.get("defaults") or {}).items():
            if row is not None and kind in row:
                # a fixed rule's own expected error: one that leaves depth out is less certain
                yerr = None if row.get("error") is None else [row["error"]]
                shown_error |= yerr is not None
                ax.errorbar(
                    [row[kind]], [row["quality"]], yerr=yerr, fmt="s", ms=6, capsize=3, label=name,
                    color=color_of[name],
                )  # fmt: skip
        chosen = pred["candidate"]
        shown_error |= chosen.get("error") is not None
        if chosen.get("error") is not None:  # the plan's own expected error, as the rules show theirs
            ax.errorbar(
                [chosen[kind]], [chosen["quality"]], yerr=[chosen["error"]], fmt="none", ecolor="black",
                capsize=3, zorder=4,
            )  # fmt: skip
        ax.scatter(
            [chosen[kind]], [chosen["quality"]], marker="*", s=160, color="black", zorder=5, label="plan"
        )
        # every point the panel's cost axis spans: its scale, and where a measured point's name has room
        span = xs + [m[k] for m in (measured or {}).values() for k in (kind, f"{kind}_predicted") if k in m]
        log = _wide(span)
        names: list[Any] = []
        for name, m in (measured or {}).items():
            if kind not in m:
                continue
            ax.annotate(
                "", (m[kind], m["fraction"]), (m.get(f"{kind}_predicted", m[kind]), m["predicted"]),
                arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 0.8},
            )  # fmt: skip
            ax.errorbar(
                [m[kind]], [m["fraction"]], yerr=None if m.get("se") is None else [m["se"]], fmt="D", ms=5,
                color=color_of[name], capsize=2, zorder=6,
            )  # fmt: skip
            # a name near the axis' right end is written to the left of its point, inside the panel
            right = _position(m[kind], span, log) > 0.8
            text = ax.annotate(
                name, (m[kind], m["fraction"]), fontsize=7, xytext=(-4 if right else 4, -8),
                textcoords="offset points", ha="right" if right else "left", va="center",
            )  # fmt: skip
            names.append(text)
        placed.append((ax, names))
        marks[ax] = [(t.xy[0], t.xy[1]) for t in names] + [(chosen[kind], chosen["quality"])]
        marks[ax] += [
            (r[kind], r["quality"]) for r in (pred.get("defaults") or {}).values() if r and kind in r
        ]
        if (target := pred.get("target")) is not None:
            ax.axhline(
                target["fraction"], color="tab:green", ls="--", lw=1, label=f"target {target['fraction']:g}"
            )
        for b in pred.get("budgets", []):
            if b.startswith(f"{kind}="):
                cap = _cap(b, pred["reference"])
                ax.axvline(cap, color="tab:red", ls=":", label=f"budget {budget_label(b)}")
        # a log axis where the costs span a decade or more (parameters, mostly); over a narrower range its
        # ticks would read 1.1×10³, so the axis is linear with whole numbers
        ax.set_xscale("log" if log else "linear")
        if not log and kind != "step_time":
            from matplotlib.ticker import MaxNLocator, StrMethodFormatter

            # whole numbers on whole ticks; over a span of a few MiB the ticks fall between them, and a
            # whole-number label would name a tick by its neighbour's value
            width = max(span) - min(span) if span else 0.0
            if width >= 5 or kind == "modules":
                # six-figure peaks (a 70B model's MiB) print 7-character labels: fewer of them fit a panel
                wide = len(f"{max(span, default=0):,.0f}") >= 7
                ticks = MaxNLocator(nbins=5, integer=True) if wide else MaxNLocator(integer=True)
                ax.xaxis.set_major_locator(ticks)
                ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
            else:
                ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.1f}" if width >= 0.5 else "{x:,.2f}"))
        label = _LABELS.get(kind, kind)
        if kind == "memory" and pred.get("memory_figure") == "first_step":
            label += ", the first steps' figure: a training process of its own"
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of the reference's loss drop")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if shown_error:
            handles.append(Patch(facecolor=FRONTIER, alpha=0.12, edgecolor=FRONTIER, lw=0.8))
            labels.append("expected error of the prediction")
        if names:
            # one entry for every measured point, in no placement's colour: their names say whose
            handles.append(Line2D([], [], marker="D", ms=5, ls="none", color=_NEUTRAL))
            labels.append("measured ± its sampling error (arrow from predicted)")
        # Beside the panel, not on it: the trained placements' points sit anywhere under the frontier.
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"{plan.card['model_id']} · {plan.card['task']} · policy {plan.config['policy']}", fontsize=9
    )
    plain_text(fig)
    fig.tight_layout()
    # the names are placed once the panels have their final size: how near two points lie is only
    # known on the page
    for ax, names in placed:
        _separate(fig, ax, names, marks[ax])
    save_png(fig, path)
    return Path(path)


def _point_colors(names: list[str], given: dict[str, Any]) -> dict[str, Any]:
    """A colour per name: the caller's unless it is the frontier's, else a spare one that no name of the
    caller's has (so that a rule does not take the colour a placement has in the caller's other figures)."""
    from matplotlib.colors import same_color

    out = {n: given[n] for n in names if n in given and not same_color(given[n], FRONTIER)}
    spare = [c for c in _SPARE if not any(same_color(c, v) for v in given.values())] or list(_SPARE)
    for i, n in enumerate(n for n in dict.fromkeys(names) if n not in out):
        out[n] = spare[i % len(spare)]
    return out


def _separate(fig: Any, ax: Any, names: list[Any], marks: list[tuple[float, float]]) -> None:
    """Move the names of measured points off each other and off the panel's marks (data points): in the
    order of their points along the axis, each takes the nearest place beside its point that clears the
    names placed before it and the marks (the least crowded one where none does; another name weighs more
    than a mark)."""
    if not names:
        return
    renderer = fig.canvas.get_renderer()
    r = 4.0 * fig.dpi / 72  # a marker's half-width, in pixels
    dots = [(x - r, y - r, x + r, y + r) for x, y in ax.transData.transform(marks)] if marks else []
    placed: list[tuple[float, float, float, float]] = []
    for text in sorted(names, key=lambda t: ax.transData.transform(t.xy)[0]):
        side = 1 if text.xyann[0] > 0 else -1
        best: tuple[float, tuple[float, float]] | None = None
        for dx, dy in [(side * 5, y) for y in _NAME_ROWS] + [(-side * 5, y) for y in _NAME_ROWS]:
            _put(text, dx, dy)
            box = text.get_window_extent(renderer).padded(1.0).extents
            clash = 10 * sum(_shared_area(box, b) for b in placed) + sum(_shared_area(box, d) for d in dots)
            if best is None or clash < best[0]:
                best = (clash, (dx, dy))
            if clash == 0:
                break
        assert best is not None
        _put(text, *best[1])
        placed.append(tuple(text.get_window_extent(renderer).extents))


def _put(text: Any, dx: float, dy: float) -> None:
    text.xyann = (dx, dy)
    text.set_horizontalalignment("left" if dx > 0 else "right")


def _shared_area(a: Sequence[float], b: Sequence[float]) -> float:
    """The area two boxes (x0, y0, x1, y1) share."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _wide(xs: list[float]) -> bool:
    """Whether costs ``xs`` span a decade or more (all positive), so that a log axis reads them best."""
    return bool(xs) and min(xs) > 0 and max(xs) >= 10 * min(xs)


def _position(x: float, xs: list[float], log: bool) -> float:
    """Where ``x`` lies between the least and the largest of ``xs`` on the axis (log or linear), 0 to 1
    (0.5 when they are all one value, or on a log axis not all positive)."""
    lo, hi = min(xs), max(xs)
    if not hi > lo or (log and not (lo > 0 and x > 0)):
        return 0.5
    if log:
        return (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (x - lo) / (hi - lo)


def _cap(text: str, reference: dict[str, float]) -> float:
    from layercard.config import Budget

    return Budget.parse(text).cap(reference)
