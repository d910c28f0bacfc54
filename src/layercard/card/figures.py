"""PNG figures of a card: resnorm heat map, per-layer profiles, coupling matrix, card comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layercard.artifacts import atomic_path
from layercard.card.artifact import Card


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def heatmap(card: Card, path: Path) -> Path:
    """Layers × roles heat map of resnorm (log scale)."""
    plt = _plt()
    roles = [r for r in dict.fromkeys(u.role for u in card.units)]
    mat = np.full((card.n_layers, len(roles)), np.nan)
    for u in card.units:
        mat[u.layer, roles.index(u.role)] = u.resnorm
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(roles), 0.22 * card.n_layers + 1.5))
    with np.errstate(divide="ignore"):
        im = ax.imshow(np.log10(mat), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_ylabel("layer")
    ax.set_title(f"log10 resnorm (δ={card.delta:g})\n{card.model['id']} · {card.task['name']}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def profiles(card: Card, path: Path) -> Path:
    """Per-layer profiles: resnorm, gradient norm, activation energy and first-step rate."""
    plt = _plt()
    rows = card.layer_table()
    layers = [r["layer"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(7, 8), sharex=True)
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
    plt = _plt()
    c = np.asarray(card.coupling["matrix"])
    fig, ax = plt.subplots(figsize=(6, 5))
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


def compare_plot(a: Card, b: Card, path: Path, rho: float) -> Path:
    plt = _plt()
    ra = [r["resnorm"] for r in a.layer_table()]
    rb = [r["resnorm"] for r in b.layer_table()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(ra, marker="o", ms=3, label=a.task["name"])
    axes[0].plot(rb, marker="s", ms=3, label=b.task["name"])
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("resnorm")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].scatter(ra, rb, s=12)
    for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
        axes[1].annotate(str(i), (x, y), fontsize=6)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel(f"resnorm · {a.task['name']}")
    axes[1].set_ylabel(f"resnorm · {b.task['name']}")
    axes[1].set_title(f"Spearman ρ = {rho:.3f}", fontsize=9)
    return _save(fig, path)


def write_all(card: Card, out: Path) -> list[Path]:
    paths = [heatmap(card, out / "card_heatmap.png"), profiles(card, out / "card_profiles.png")]
    c = coupling(card, out / "card_coupling.png")
    if c is not None:
        paths.append(c)
    return paths
