"""PNG figures of a card: resnorm heat map, per-layer profiles, coupling matrix, card comparison."""

from __future__ import annotations

from pathlib import Path

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
    ax.set_ylabel("layer")
    ax.set_title(f"log10 resnorm (δ={card.delta:g})\n{card.model['id']} · {card.task['name']}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def profiles(card: Card, path: Path) -> Path:
    """Per-layer profiles: resnorm, gradient norm, activation energy and first-step rate."""
    rows = card.layer_table()
    layers = [r["layer"] for r in rows]
    fig, axes = new_figure(4, 1, figsize=(7, 8), sharex=True)
    for ax, (key, label) in zip(
        axes,
        [
            ("resnorm", "resnorm"),
            ("gradnorm", "‖∇W‖_F"),
            ("energy", "energy tr(Σ)/d"),
            ("rate", "first-step rate"),
        ],
        strict=True,
    ):
        ax.plot(layers, [r.get(key, np.nan) for r in rows], marker="o", ms=3)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("layer")
    fig.suptitle(
        f"Layer Card profiles · roles {','.join(card.roles)}\n{card.model['id']} · {card.task['name']}",
        fontsize=9,
    )
    return _save(fig, path)


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
    ax.set_title(f"coupling (cosine of update effects, {card.coupling['direction']})", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def compare_plot(a: Card, b: Card, path: Path, rho: float | None, score: str = "resnorm") -> Path:
    """Per-layer ``score`` (a layer_table column) of two cards side by side, and one against the other,
    titled with their Spearman ρ (None: undefined, a constant column)."""
    ra = [r[score] for r in a.layer_table()]
    rb = [r[score] for r in b.layer_table()]
    # A log axis only where every value is positive (rate can be negative, a score zero).
    scale = "log" if all(v > 0 for v in ra + rb) else "linear"
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    axes[0].plot(ra, marker="o", ms=3, label=a.task["name"])
    axes[0].plot(rb, marker="s", ms=3, label=b.task["name"])
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel(score)
    axes[0].set_yscale(scale)
    axes[0].legend(fontsize=8)
    axes[1].scatter(ra, rb, s=12)
    for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
        axes[1].annotate(str(i), (x, y), fontsize=6)
    axes[1].set_xscale(scale)
    axes[1].set_yscale(scale)
    axes[1].set_xlabel(f"{score} · {a.task['name']}")
    axes[1].set_ylabel(f"{score} · {b.task['name']}")
    shown = "undefined (a constant column)" if rho is None else f"{rho:.3f}"
    axes[1].set_title(f"Spearman ρ of per-layer {score} = {shown}", fontsize=9)
    return _save(fig, path)


def write_all(card: Card, out: Path) -> list[Path]:
    """The card's figures in folder ``out`` (of :data:`FIGURES`, those the card has data for)."""
    heat, prof, coup = FIGURES
    paths = [heatmap(card, out / heat), profiles(card, out / prof)]
    c = coupling(card, out / coup)
    if c is not None:
        paths.append(c)
    return paths
