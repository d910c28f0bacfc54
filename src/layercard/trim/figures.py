"""The trace and trim figures (docs/design.md §8): the one place the lens curves and the sweep are drawn.

:func:`plot_trace` and :func:`plot_sweep` write trace.png and trim.png; :func:`draw_trace` and
:func:`draw_sweep` draw the same panels onto a caller's axes (a report's figure, for instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from layercard.plotting import new_figure, save_png
from layercard.trim.sweep import row_value

__all__ = ["draw_sweep", "draw_trace", "plot_sweep", "plot_trace", "sweep_legend"]

# the chosen K in the one style of both panels; the trace's candidates are dotted in colours of their own
_CHOSEN = {"color": "black", "ls": "-", "lw": 1.2, "alpha": 0.6}


class Curves(Protocol):
    """What the trace figures read of a :class:`layercard.trim.lens.Trace` (which imports this module to
    draw itself, so it is not imported here)."""

    curve_on: Sequence[float]
    curve_off: Sequence[float]
    candidates: dict[str, int]
    n_examples: int
    n_target_tokens: int
    task: dict[str, Any]
    provenance: dict[str, Any] | None

    @property
    def n_layers(self) -> int: ...


def _save_png(fig: Any, path: Path) -> Path:
    save_png(fig, path)
    return path


def draw_trace(ax: Any, tr: Curves, *, chosen_k: int | None = None) -> None:
    """Both lens curves of ``tr`` on ``ax``, the boundary candidates of the 'on' curve marked, and
    ``chosen_k`` too when given. No title, legend or grid: the caller's figure sets those."""
    from matplotlib.ticker import MaxNLocator

    layers = list(range(tr.n_layers))
    ax.plot(layers, tr.curve_on, marker="o", ms=3, label="adapter on")
    ax.plot(layers, tr.curve_off, marker="o", ms=3, ls="--", color="grey", label="adapter off")
    styles = {"sharpest_rise": ("tab:red", "sharpest rise"), "half_final": ("tab:green", "half of final")}
    for key, layer in tr.candidates.items():
        color, label = styles.get(key, ("tab:purple", key))
        ax.axvline(layer, color=color, ls=":", lw=1.5, label=f"{label}: layer {layer}")
    if chosen_k is not None:
        ax.axvline(chosen_k, **_CHOSEN, label=f"chosen K={chosen_k}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (output of)")
    ax.set_ylabel("P(gold next token), logit lens")


def draw_sweep(ax: Any, result: dict[str, Any]) -> list[Any]:
    """The selection metric of a trim result (trim.json) against K on ``ax``, the loss on a twin axis
    when the metric is another one, the chosen K marked. No title, legend or grid: the caller sets those,
    passing the returned lines (both axes') as the legend's handles."""
    from matplotlib.ticker import MaxNLocator

    rows = result["sweep"]
    ks = [r["k"] for r in rows]
    metric = result["metric"]
    vals = [row_value(r, metric) for r in rows]
    lines = ax.plot(ks, [v if v is not None else float("nan") for v in vals], marker="o", label=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("boundary K (adapters kept in layers ≤ K)")
    ax.set_ylabel(metric)
    if metric != "loss" and any(r.get("loss") is not None for r in rows):
        ax2 = ax.twinx()
        loss = [r["loss"] if r.get("loss") is not None else float("nan") for r in rows]
        lines += ax2.plot(ks, loss, marker="s", ms=3, ls="--", color="grey", label="loss")
        ax2.set_ylabel("loss")
        # ax's legend is drawn over the twin's lines, not under them
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
    lines.append(ax.axvline(result["chosen_k"], **_CHOSEN, label=f"chosen K={result['chosen_k']}"))
    return lines


def sweep_legend(ax: Any, handles: list[Any], title: str, fontsize: float = 8) -> None:
    """The sweep's legend in one row above ``ax`` and ``title`` above it: inside the panel the legend hid
    points wherever it stood (the loss is lowest, and so drawn lowest, at the largest K)."""
    ax.legend(
        handles=handles, fontsize=fontsize, loc="lower center", bbox_to_anchor=(0.5, 1.0),
        ncol=len(handles), frameon=False, borderaxespad=0.2,
    )  # fmt: skip
    ax.set_title(title, fontsize=9, pad=2.0 * fontsize + 6)


def plot_trace(tr: Curves, path: str | Path) -> Path:
    """trace.png: both lens curves with the boundary candidates of the 'on' curve marked."""
    fig, ax = new_figure(figsize=(7, 4))
    draw_trace(ax, tr)
    title = f"{(tr.provenance or {}).get('model_id', '')} · {tr.task.get('name', '')}".strip(" ·")
    ax.set_title(
        f"logit lens · {title}\n{tr.n_examples} examples, {tr.n_target_tokens} target tokens", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save_png(fig, Path(path))


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """trim.png: the selection metric and loss against the boundary K, the chosen K marked."""
    fig, ax = new_figure(figsize=(7, 4))
    sweep_legend(ax, draw_sweep(ax, result), f"trim sweep · {result['task'].get('name', '')}")
    ax.grid(alpha=0.3)
    return _save_png(fig, Path(path))
