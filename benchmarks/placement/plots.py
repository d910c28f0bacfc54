"""The report's PNG plots: metric vs budget, quality vs cost, predicted vs measured, Spearman per score."""

from __future__ import annotations

from typing import Any

import numpy as np

from .jobs import variants
from .settings import POLICY_ORDER, Settings
from .summary import policy_value


def plots(out: dict[str, Any], bench: Any) -> None:
    """Metric vs budget per policy; quality vs cost; predicted vs measured; Spearman per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, res = bench.s, bench.results
    tasks = [t for t in bench.task_names if out["summary"].get(t)]
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(POLICY_ORDER)}
    rows = [r for r in out["rows"] if r["status"] == "done" and r["group"] == "grid"]
    if tasks:
        for draw, name in ((_budget, "budget"), (_cost, "cost"), (_predicted, "predicted")):
            fig = draw(plt, out, s, tasks, rows, colors)
            fig.tight_layout()
            fig.savefig(res / f"placement_{name}.png", dpi=110)
            plt.close(fig)
    sp = {t: v for t, v in out["spearman_single_layer"].items() if v}
    if sp:
        fig = _spearman(plt, out, s, sp)
        fig.tight_layout()
        fig.savefig(res / "placement_spearman.png", dpi=110)
        plt.close(fig)


def _budget(plt: Any, out: dict[str, Any], s: Settings, tasks: list[str], rows: list, colors: dict) -> Any:
    """Test loss and the task metric against the budget, one line per policy."""
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.2 * len(tasks)), squeeze=False)
    for i, t in enumerate(tasks):
        sm = out["summary"][t]
        for j, field in enumerate(("test_loss", "metric")):
            ax = axes[i][j]
            for p in POLICY_ORDER[:-1]:
                pts = [
                    (b, policy_value([r for r in rows if r["task"] == t], p, b, field))
                    for b in (*s.budgets, s.small_budget)
                ]
                pts = sorted({(b, v) for b, v in pts if v is not None})
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=colors[p])
            va = sm["all30"].get(field)
            vb = sm["base"].get(field if field == "test_loss" else "metric")
            if va is not None:
                ax.axhline(va, color="k", ls=":", lw=1)
                ax.scatter([s.n_layers], [va], color="k", marker="*", s=80, label="all 30", zorder=3)
            if vb is not None:
                ax.axhline(vb, color="grey", ls="--", lw=1, label="base")
            ticks = sorted({*(s.budgets if s.task(t).grid == "full" else (s.small_budget,)), s.n_layers})
            ax.set_xticks(ticks)
            ax.set_xlim(ticks[0] - 2, ticks[-1] + 2)
            ax.set_xlabel(f"budget (layers of {s.n_layers})")
            ax.set_ylabel("test loss" if field == "test_loss" else sm["base"].get("metric_name") or "metric")
            ax.set_title(t, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, ncol=2)
    return fig


def _cost(plt: Any, out: dict[str, Any], s: Settings, tasks: list[str], rows: list, colors: dict) -> Any:
    """The fraction of the all-30 loss drop against s/step, peak memory and adapted modules."""
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.2 * len(tasks)), squeeze=False)
    costs = (("s_per_step", "s/step"), ("peak_memory_mib", "peak memory MiB"), ("modules", "adapted modules"))
    for i, t in enumerate(tasks):
        tr = [r for r in rows if r["task"] == t and r.get("fraction_of_all30") is not None]
        for j, (field, lab) in enumerate(costs):
            ax = axes[i][j]
            for r in tr:
                if r.get(field) is None:
                    continue
                mk = {4: "o", 8: "s"}.get(r["budget"], "*")
                y = 100 * r["fraction_of_all30"]
                ax.scatter(r[field], y, color=colors[r["policy"]], marker=mk, s=30, label=r["policy"])
            ax.set_xlabel(lab)
            ax.set_ylabel("% of all-30 loss drop")
            ax.set_title(f"{t} (○ k=4, □ k=8, ★ all)", fontsize=9)
            ax.grid(alpha=0.3)
        h, lab = axes[i][0].get_legend_handles_labels()
        uniq = dict(zip(lab, h, strict=True))
        axes[i][0].legend(uniq.values(), uniq.keys(), fontsize=6, ncol=2)
    return fig


def _predicted(plt: Any, out: dict[str, Any], s: Settings, tasks: list[str], rows: list, colors: dict) -> Any:
    """The plan's predicted fraction of the all-30 gain against the measured fraction of its loss drop."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for i, t in enumerate(tasks):
        ax = axes[0][i]
        for r in rows:
            pr = (r.get("predicted") or {}).get("fraction")
            if r["task"] != t or pr is None or r.get("fraction_of_all30") is None:
                continue
            ax.scatter(pr, r["fraction_of_all30"], color=colors[r["policy"]], s=25, label=r["policy"])
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("predicted fraction of all-30 gain (frozen score)")
        ax.set_ylabel("measured fraction of all-30 loss drop")
        ax.set_title(t, fontsize=9)
        ax.grid(alpha=0.3)
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6)
    return fig


def _spearman(plt: Any, out: dict[str, Any], s: Settings, sp: dict[str, Any]) -> Any:
    """Every score's Spearman with the single-layer drops, per task; the frozen score highlighted."""
    names = [v.name for v in variants(s)]
    fig, ax = plt.subplots(figsize=(12, 4))
    w = 0.8 / len(sp)
    for i, (t, tab) in enumerate(sp.items()):
        vals = [tab["variants"][n]["spearman"] for n in names]
        ax.bar(
            np.arange(len(names)) + i * w,
            [v if v is not None else 0 for v in vals],
            w,
            label=f"{t} ({'select' if t in s.select_tasks else 'confirm'})",
        )
    fz = (out["frozen_default"] or {}).get("variant", {}).get("name")
    if fz in names:
        ax.axvspan(names.index(fz) - 0.1, names.index(fz) + 0.9, color="gold", alpha=0.25, label="frozen")
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman with single-layer loss drop")
    ax.axhline(0, color="k", lw=0.8)
    lows = [
        v["spearman"] for tab in sp.values() for v in tab["variants"].values() if v["spearman"] is not None
    ]
    ax.set_ylim(min(-0.2, min(lows, default=0.0) - 0.05), 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig
