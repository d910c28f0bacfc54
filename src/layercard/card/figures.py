"""PNG figures of a card: resnorm heat map, per-layer profiles, coupling matrix, card comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layercard.card.artifact import Card
from layercard.plotting import new_figure, save_png

# Every figure a card folder can hold: a rewrite removes those its new card has no data for.
FIGURES = ("card_heatmap.png", "card_profiles.png", "card_coupling.png")


def _save(fig, path: Path) -> Path:
    save_png(fig, path)
    return path


def heatmap(card: Card, path: Path) -> Path:
    """Layers × roles heat map of resnorm (log scale)."""
    roles = [r for r in dict.fromkeys(u.role for u in card.units)]
    mat = np.full((card.n_layers, len(roles)), np.nan)
    for u in card.units:
        mat[u.layer, roles.index(u.role)] = u.resnorm
    fig, ax = new_figure(figsize=(1.2 + 0.9 * len(roles), 0.22 * card.n_layers + 1.5))
    with np.errstate(divide="ignore"):
        im = ax.imshow(np.log10(mat), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_xlabel("role")
    ax.set_ylabel("layer")
    ax.set_title(f"log10 resnorm (δ={card.delta:g})\n{card.model['id']} · {card.task['name']}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("log10 resnorm", fontsize=8)
    return _save(fig, path)


# each profile's label says how a layer's value combines its units' (as Card.layer_table does) and, for
# the rate, which sign is a gain
_PROFILES = (
    ("resnorm", "resnorm\n(root-sum-square\nover the layer's roles)"),
    ("gradnorm", "‖∇W‖_F\n(root-sum-square\nover the layer's roles)"),
    ("energy", "energy tr(Σ)/d\n(mean over the\nlayer's inputs)"),
    ("rate", "first-step rate\n(loss decrease, sum over\nroles; < 0: loss rises)"),
)


def profiles(card: Card, path: Path) -> Path:
    """Per-layer profiles: resnorm, gradient norm, activation energy and first-step rate."""
    from matplotlib.ticker import MaxNLocator

    rows = card.layer_table()
    layers = [r["layer"] for r in rows]
    fig, axes = new_figure(4, 1, figsize=(7, 9.5), sharex=True)
    for ax, (key, label) in zip(axes, _PROFILES, strict=True):
        values = [r.get(key, np.nan) for r in rows]
        ax.plot(layers, values, marker="o", ms=3)
        _spread_scale(ax, values)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    # one column per layer, and none past the last (a 30-layer model had a tick at 30)
    axes[-1].set_xlim(-0.5, card.n_layers - 0.5)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("layer")
    fig.suptitle(
        f"Layer Card profiles · roles {','.join(card.roles)}\n{card.model['id']} · {card.task['name']}",
        fontsize=9,
    )
    fig.align_ylabels(axes)
    return _save(fig, path)


def _spread_scale(ax: Any, values: list[float], which: str = "y") -> None:
    """A log axis (``which``: "x" or "y") where the values are positive and the largest is over 30 times
    the median, a symmetric log one where they take both signs and so spread: on a linear axis one
    outlier layer (an energy of 26 among values near 0.05) flattens every other layer into a line."""
    from matplotlib.ticker import FuncFormatter

    v = np.abs(np.asarray([x for x in values if np.isfinite(x)], dtype=float))
    nonzero = v[v > 0]
    if nonzero.size < 2 or nonzero.max() <= 30 * np.median(nonzero):
        return
    set_scale, axis = (ax.set_xscale, ax.xaxis) if which == "x" else (ax.set_yscale, ax.yaxis)
    if all(x > 0 for x in values if np.isfinite(x)):
        set_scale("log")
    else:
        # linear up to the decade of the typical layer's size, logarithmic past it
        set_scale("symlog", linthresh=float(10 ** np.floor(np.log10(np.median(nonzero)))))
    axis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 0.01, -10: signed plain numbers


def coupling(card: Card, path: Path) -> Path | None:
    if not card.coupling:
        return None
    c = np.asarray(card.coupling["matrix"])
    fig, ax = new_figure(figsize=(6, 5))
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    layers = card.coupling["layers"]
    step = max(1, len(layers) // 10)
    ax.set_xticks(range(0, len(layers), step), layers[::step])
    ax.set_yticks(range(0, len(layers), step), layers[::step])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(
        f"coupling (cosine of update effects, {card.coupling['direction']})\n"
        f"{card.model['id']} · {card.task['name']}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("cosine of the layers' update effects", fontsize=8)
    return _save(fig, path)


def compare_plot(a: Card, b: Card, path: Path, rho: float | None, score: str = "resnorm") -> Path:
    """Per-layer ``score`` (a layer_table column) of two cards side by side, and one against the other,
    titled with their Spearman ρ (None: undefined, a constant column)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ra = [r[score] for r in a.layer_table()]
    rb = [r[score] for r in b.layer_table()]
    # A log axis only where every value is positive (rate can be negative, a score zero).
    scale = "log" if all(v > 0 for v in ra + rb) else "linear"
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    axes[0].plot(ra, marker="o", ms=3, label=a.task["name"])
    axes[0].plot(rb, marker="s", ms=3, label=b.task["name"])
    axes[0].set_xlim(-0.5, len(ra) - 0.5)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel(score)
    axes[0].set_yscale(scale)
    axes[0].legend(fontsize=8)
    axes[1].scatter(ra, rb, s=12)
    marked = _marked_layers(ra, rb)
    for i in marked:
        axes[1].annotate(str(i), (ra[i], rb[i]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    axes[1].set_xscale(scale)
    axes[1].set_yscale(scale)
    if scale == "linear":  # a signed score: symmetric log where one layer lies far beyond the rest
        _spread_scale(axes[0], ra + rb)
        _spread_scale(axes[1], ra, "x")
        _spread_scale(axes[1], rb)
    else:
        # plain numbers, and no labels on the minor ticks, which ran into each other
        for axis in (axes[0].yaxis, axes[1].xaxis, axes[1].yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    axes[1].set_xlabel(f"{score} · {a.task['name']}")
    axes[1].set_ylabel(f"{score} · {b.task['name']}")
    shown = "undefined (a constant column)" if rho is None else f"{rho:.3f}"
    named = (
        "every layer numbered"
        if len(marked) == len(ra)
        else "numbered: the layers at either end of each axis and those the cards rank most differently"
    )
    axes[1].set_title(f"Spearman ρ of per-layer {score} = {shown}\n{named}", fontsize=9)
    return _save(fig, path)


def _marked_layers(ra: list[float], rb: list[float], k: int = 3, all_up_to: int = 10) -> list[int]:
    """The layers whose numbers a comparison's scatter writes: all of a small model's; of a larger one's
    (whose numbers would pile up), the ``k`` lowest and highest by either card and the ``k`` whose ranks
    differ most between the two."""
    n = len(ra)
    if n <= all_up_to:
        return list(range(n))
    by_a, by_b = np.argsort(ra, kind="stable"), np.argsort(rb, kind="stable")
    rank_a, rank_b = np.empty(n), np.empty(n)
    rank_a[by_a], rank_b[by_b] = np.arange(n), np.arange(n)
    apart = np.argsort(-np.abs(rank_a - rank_b), kind="stable")
    picked = {*by_a[:k], *by_a[-k:], *by_b[:k], *by_b[-k:], *apart[:k]}
    return sorted(int(i) for i in picked)


def write_all(card: Card, out: Path) -> list[Path]:
    """The card's figures in folder ``out`` (of :data:`FIGURES`, those the card has data for)."""
    heat, prof, coup = FIGURES
    paths = [heatmap(card, out / heat), profiles(card, out / prof)]
    c = coupling(card, out / coup)
    if c is not None:
        paths.append(c)
    return paths
