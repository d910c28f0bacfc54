"""The run report: one self-contained HTML file (figures inline as base64 PNG) plus ``report.md``.

Built from a run folder's artifacts only (see :mod:`layercard.pipeline` for the layout): card.json,
plan.json, train_metrics.json, trace.json / trim.json and eval.json. Nothing is recomputed on the model,
so a report can be rebuilt anywhere the folder is copied. A missing stage (no coupling, trimming off, no
base evaluation) leaves its section with a line saying so instead of failing.

Sections: headline comparison, Layer Card (heat map, profiles), coupling matrix, plans, training curves,
boundary trace and sweep, predicted vs measured gain, quality against cost, evaluation, provenance.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from layercard.artifacts import atomic_path, read_json, write_text
from layercard.errors import LayercardError

__all__ = ["HTML_FILE", "MD_FILE", "REPORT_VERSION", "build_report", "collect_results", "report_inputs"]

HTML_FILE = "report.html"
MD_FILE = "report.md"
FIGURES_DIR = "figures"
# Part of the report stage's fingerprint: bump when the report's content changes.
REPORT_VERSION = 1
_DPI = 100


# ---------------------------------------------------------------------------------------------------------
# Reading a run folder
# ---------------------------------------------------------------------------------------------------------


def _layout(root: Path) -> Any:
    from layercard.pipeline import RunLayout

    return RunLayout(root)


def _maybe(path: Path, kind: str | None = None) -> dict[str, Any] | None:
    return read_json(path, kind=kind) if path.is_file() else None


def placement_names(root: Path) -> list[str]:
    """Placements in config order (run.json), else every plan folder in name order."""
    lay = _layout(root)
    run = _maybe(lay.run_json)
    if run is not None:
        return [p["name"] for p in run["config"]["placements"]]
    plans = root / "plan"
    return sorted(p.name for p in plans.iterdir() if (p / "plan.json").is_file()) if plans.is_dir() else []


def _run_config(root: Path) -> dict[str, Any] | None:
    run = _maybe(_layout(root).run_json)
    return run["config"] if run is not None else None


def _active(root: Path) -> tuple[bool, bool]:
    """(trim, base eval) as the run's config has them: a stage switched off may have left an old folder."""
    cfg = _run_config(root)
    if cfg is None:
        return True, True
    return bool(cfg.get("trim", {}).get("enabled", True)), bool(cfg.get("eval", {}).get("base", True))


def _trim_target(root: Path, trim: dict[str, Any]) -> str:
    rec = _maybe(root / "trim" / "stage.json")
    if rec is not None and rec.get("config", {}).get("placement"):
        return str(rec["config"]["placement"])
    return Path(trim["adapter"]).parent.name  # .../train/<placement>/adapter


def report_inputs(root: str | Path) -> list[Path]:
    """Every artifact file the report reads (their hashes fingerprint the report stage)."""
    root = Path(root)
    lay = _layout(root)
    names = placement_names(root)
    trim_on, base_on = _active(root)
    cands = [lay.run_json, lay.card_json]
    cands += [lay.plan_json(n) for n in names] + [lay.train_metrics(n) for n in names]
    cands += [lay.eval_json(n) for n in names]
    if trim_on:
        cands += [lay.trim_json, lay.trim_dir / "trace.json", lay.eval_json("trimmed")]
    if base_on:
        cands.append(lay.eval_json("base"))
    return [p for p in cands if p.is_file()]


def _safetensors_params(folder: Path) -> int | None:
    """Parameter count of an adapter folder's safetensors files (read from the headers only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def _primary(ev: dict[str, Any] | None) -> tuple[str | None, float | None]:
    if not ev or not ev.get("metrics"):
        return None, None
    name = next(iter(ev["metrics"]))
    return name, ev["metrics"][name]


def collect_results(root: str | Path) -> dict[str, Any]:
    """One row per compared model (base, each placement, the trimmed adapter) from the artifacts.

    ``measured_gain`` is the base eval loss minus the row's eval loss (the loss drop the adapter bought);
    ``predicted_gain`` is the plan's set gain in the card score's units (a ranking, not a loss).
    """
    root = Path(root)
    lay = _layout(root)
    trim_on, base_on = _active(root)
    base_ev = _maybe(lay.eval_json("base")) if base_on else None
    base_loss = base_ev.get("loss") if base_ev else None
    primary = _primary(base_ev)[0]
    rows: list[dict[str, Any]] = []

    def eval_fields(ev: dict[str, Any] | None) -> dict[str, Any]:
        nonlocal primary
        if ev is None:
            return {"eval_loss": None, "metrics": {}, "primary_value": None, "s_per_example": None}
        name, value = _primary(ev)
        primary = primary or name
        loss = ev.get("loss")
        return {
            "eval_loss": loss,
            "measured_gain": (base_loss - loss) if base_loss is not None and loss is not None else None,
            "metrics": ev.get("metrics", {}),
            "primary_value": ev.get("metrics", {}).get(primary) if primary else value,
            "s_per_example": ev.get("timing", {}).get("s_per_example"),
        }

    if base_ev is not None:
        rows.append(
            {
                "name": "base",
                "kind": "base",
                "layers": [],
                "modules": 0,
                "trainable_params": 0,
                **eval_fields(base_ev),
                "measured_gain": 0.0,
            }
        )
    for name in placement_names(root):
        plan = _maybe(lay.plan_json(name))
        tm = _maybe(lay.train_metrics(name))
        ev = _maybe(lay.eval_json(name))
        pr = plan["predicted"] if plan else {}
        rows.append(
            {
                "name": name,
                "kind": "placement",
                "policy": plan["config"]["policy"] if plan else None,
                "layers": plan["layers"] if plan else [],
                "modules": pr.get("modules"),
                "trainable_params": tm["trainable_params"] if tm else pr.get("params"),
                "predicted_gain": pr.get("gain"),
                "predicted_fraction": pr.get("fraction"),
                "predicted_s_per_step": pr.get("step_time_s"),
                "s_per_step": tm.get("s_per_step") if tm else None,
                "peak_memory_mib": tm.get("peak_memory_mib") if tm else None,
                "peak_memory_kind": tm.get("peak_memory_kind") if tm else None,
                "steps": tm.get("steps") if tm else None,
                "final_train_loss": tm.get("final_train_loss") if tm else None,
                "final_val_loss": tm.get("final_val_loss") if tm else None,
                **eval_fields(ev),
            }
        )
    trim = _maybe(lay.trim_json) if trim_on else None
    if trim is not None:
        target = _trim_target(root, trim)
        parent = next((r for r in rows if r["name"] == target), {})
        after = trim["after"]
        ev = _maybe(lay.eval_json("trimmed"))
        rows.append(
            {
                "name": f"{target}-trimmed",
                "kind": "trimmed",
                "parent": target,
                "chosen_k": trim["chosen_k"],
                "layers": after["adapted_layers"],
                "modules": after["adapted_modules"],
                "trainable_params": _safetensors_params(lay.trimmed_adapter),
                # trained as its parent: the training cost is the parent's
                "s_per_step": parent.get("s_per_step"),
                "peak_memory_mib": parent.get("peak_memory_mib"),
                "peak_memory_kind": parent.get("peak_memory_kind"),
                **eval_fields(ev),
            }
        )
    for r in rows:
        r.setdefault("measured_gain", None)
    return {"primary_metric": primary, "base_loss": base_loss, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure written as PNG: file name, caption, and the bytes for inlining."""

    name: str
    caption: str
    png: bytes


def _save(fig: Any, path: Path) -> bytes:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, bbox_inches="tight", format="png")
        data = tmp.read_bytes()
    _plt().close(fig)
    return data


def _palette(names: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _fig_placements(rows: list[dict[str, Any]], n_layers: int, path: Path) -> bytes:
    """Which layers each placement adapts (the trimmed adapter included)."""
    plt = _plt()
    shown = [r for r in rows if r["kind"] != "base"]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.3 * n_layers), 0.9 + 0.45 * len(shown)))
    for i, r in enumerate(shown):
        for layer in r["layers"]:
            color = "tab:orange" if r["kind"] == "trimmed" else "tab:blue"
            ax.add_patch(plt.Rectangle((layer - 0.45, i - 0.38), 0.9, 0.76, color=color))
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_ylim(-0.6, len(shown) - 0.4)
    ax.set_yticks(range(len(shown)), [r["name"] for r in shown])
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_xlabel("layer")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("adapted layers per placement (orange: trimmed)", fontsize=9)
    return _save(fig, path)


def _fig_training(curves: dict[str, dict[str, Any]], path: Path) -> bytes:
    plt = _plt()
    colors = _palette(list(curves))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, m in curves.items():
        lc = m.get("loss_curve") or []
        if lc:
            ax.plot([s for s, _ in lc], [v for _, v in lc], color=colors[name], lw=1.2, label=f"{name} train")
        vc = m.get("val_curve") or []
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


def _fig_trace(trace: dict[str, Any] | None, trim: dict[str, Any], path: Path) -> bytes:
    """Logit-lens curves with the boundary candidates, and the sweep's metric against K."""
    plt = _plt()
    panels = 2 if trace is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    axes = axes[0]
    chosen = trim["chosen_k"]
    if trace is not None:
        ax = axes[0]
        layers = list(range(len(trace["curve_on"])))
        ax.plot(layers, trace["curve_on"], marker="o", ms=3, label="adapter on")
        ax.plot(layers, trace["curve_off"], marker="o", ms=3, ls="--", color="grey", label="adapter off")
        styles = {"sharpest_rise": "tab:red", "half_final": "tab:green"}
        for key, layer in trace["candidates"].items():
            ax.axvline(
                layer,
                color=styles.get(key, "tab:purple"),
                ls=":",
                lw=1.5,
                label=f"{key.replace('_', ' ')}: layer {layer}",
            )
        ax.axvline(chosen, color="black", lw=1, alpha=0.6, label=f"chosen K = {chosen}")
        ax.set_xlabel("layer (output of)")
        ax.set_ylabel("P(gold next token), logit lens")
        ax.set_title(f"boundary trace · {trace['n_examples']} examples", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    rows = trim["sweep"]
    metric = trim["metric"]
    ks = [r["k"] for r in rows]

    def value(r: dict[str, Any]) -> float:
        v = r.get("loss") if metric == "loss" else r.get("metrics", {}).get(metric)
        return float("nan") if v is None else float(v)

    ax.plot(ks, [value(r) for r in rows], marker="o", label=metric)
    ax.set_xlabel("boundary K (adapters kept in layers ≤ K)")
    ax.set_ylabel(metric)
    if metric != "loss" and any(r.get("loss") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(
            ks,
            [r["loss"] if r.get("loss") is not None else float("nan") for r in rows],
            marker="s",
            ms=3,
            ls="--",
            color="grey",
        )
        ax2.set_ylabel("loss (grey)")
    ax.axvline(chosen, color="tab:red", ls=":", label=f"chosen K = {chosen}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title("trim sweep", fontsize=9)
    return _save(fig, path)


def _fig_gain(rows: list[dict[str, Any]], score: str, path: Path) -> bytes:
    plt = _plt()
    pts = [r for r in rows if r["kind"] == "placement" and r.get("predicted_gain") is not None]
    colors = _palette([r["name"] for r in rows])  # the same colour per model as in the cost chart
    fig, ax = plt.subplots(figsize=(6, 4.5))
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


def _fig_quality_cost(rows: list[dict[str, Any]], primary: str | None, path: Path) -> bytes:
    """Primary metric (top) and eval loss (bottom) against each cost, one point per model."""
    plt = _plt()
    shown = [r for r in rows if r["kind"] != "base"]
    colors = _palette([r["name"] for r in rows])
    base = next((r for r in rows if r["kind"] == "base"), None)
    qualities = [("primary_value", primary or "primary metric"), ("eval_loss", "eval loss (lower is better)")]
    fig, axes = plt.subplots(2, len(_COSTS), figsize=(4 * len(_COSTS), 7), squeeze=False)
    for row_i, (qkey, qlabel) in enumerate(qualities):
        for col, (ckey, clabel) in enumerate(_COSTS):
            ax = axes[row_i][col]
            for r in shown:
                x, y = r.get(ckey), r.get(qkey)
                if x is None or y is None:
                    continue
                if r["kind"] == "trimmed":  # hollow and larger: it shares its parent's training cost
                    ax.scatter(
                        [x],
                        [y],
                        s=110,
                        marker="s",
                        facecolors="none",
                        edgecolors=colors[r["name"]],
                        linewidths=2,
                        label=r["name"],
                    )
                else:
                    ax.scatter([x], [y], s=45, marker="o", color=colors[r["name"]], label=r["name"])
            if base is not None and base.get(qkey) is not None:
                ax.axhline(base[qkey], color="grey", ls=":", lw=1, label="base model")
            ax.grid(alpha=0.3)
            if row_i == len(qualities) - 1:
                ax.set_xlabel(clabel)
            if col == 0:
                ax.set_ylabel(qlabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    fig.suptitle("quality against cost (hollow square: trimmed adapter)", fontsize=10)
    fig.tight_layout()
    fig.legend(
        uniq.values(),
        uniq.keys(),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(6, len(uniq)),
        fontsize=9,
    )
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Tables (shared by HTML and markdown)
# ---------------------------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    if isinstance(x, int) and not isinstance(x, bool) and spec == ",":
        return f"{x:,}"
    return format(x, spec)


def _layers(layers: Sequence[int]) -> str:
    if not layers:
        return "—"
    s = sorted(layers)
    if len(s) > 3 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}–{s[-1]} ({len(s)})"
    return ", ".join(map(str, s)) + f" ({len(s)})"


@dataclasses.dataclass(frozen=True)
class Table:
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
            return c.replace("|", "\\|")

        lines = ["| " + " | ".join(map(cell, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        return "\n".join(lines)


def _headline(results: dict[str, Any]) -> Table:
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
    ]
    rows = [
        [
            r["name"],
            _layers(r["layers"]),
            _f(r.get("modules")),
            _f(r.get("trainable_params"), ","),
            _f(r.get("s_per_step"), ".3f"),
            _f(r.get("peak_memory_mib"), ",.0f"),
            _f(r.get("eval_loss")),
            _f(r.get("measured_gain")),
            _f(r.get("primary_value")),
            _f(r.get("s_per_example"), ".3f"),
        ]
        for r in results["rows"]
    ]
    return Table(header, rows)


def _plans_table(plans: dict[str, dict[str, Any]]) -> Table:
    header = [
        "placement",
        "policy",
        "budget",
        "layers",
        "modules",
        "params",
        "rank",
        "predicted gain",
        "of all-layer gain",
        "redundancy ρ",
        "predicted s/step",
    ]
    rows = []
    for name, plan in plans.items():
        pr, cfg = plan["predicted"], plan["config"]
        frac = pr.get("fraction")
        rows.append(
            [
                name,
                cfg["policy"],
                str(cfg.get("budget") or "—"),
                _layers(plan["layers"]),
                _f(pr.get("modules")),
                _f(pr.get("params"), ","),
                str(cfg.get("rank")),
                f"{_f(pr.get('gain'))} ({pr.get('score')})",
                "—" if frac is None else f"{100 * frac:.1f}%",
                _f(pr.get("redundancy"), ".3f"),
                _f(pr.get("step_time_s"), ".3f"),
            ]
        )
    return Table(header, rows)


def _train_table(metrics: dict[str, dict[str, Any]]) -> Table:
    header = [
        "placement",
        "steps",
        "s/step (measured)",
        "s/step (predicted)",
        "tokens/s",
        "peak MiB",
        "train loss first → last",
        "val loss",
    ]
    rows = [
        [
            name,
            str(m["steps"]),
            _f(m.get("s_per_step"), ".3f"),
            _f(m.get("predicted_step_time_scaled_s") or m.get("predicted_step_time_s"), ".3f"),
            _f(m.get("tokens_per_s"), ",.0f"),
            _f(m.get("peak_memory_mib"), ",.0f"),
            f"{_f(m.get('first_train_loss'))} → {_f(m.get('final_train_loss'))}",
            _f(m.get("final_val_loss")),
        ]
        for name, m in metrics.items()
    ]
    return Table(header, rows)


def _sweep_table(trim: dict[str, Any]) -> Table:
    metric = trim["metric"]
    shown = list(dict.fromkeys([metric, *trim.get("metrics", [])]))[:4]
    header = ["K", "adapted layers", "modules", *shown, "loss", "s/example"]
    rows = []
    for r in trim["sweep"]:
        vals = [_f(r["loss"] if m == "loss" else r.get("metrics", {}).get(m)) for m in shown]
        mark = " ✓" if r["k"] == trim["chosen_k"] else ""
        rows.append(
            [
                f"{r['k']}{mark}",
                str(r["n_adapted_layers"]),
                str(r["adapted_modules"]),
                *vals,
                _f(r.get("loss")),
                _f(r.get("s_per_example"), ".3f"),
            ]
        )
    return Table(header, rows)


def _eval_table(results: dict[str, Any]) -> Table:
    names = list(dict.fromkeys(m for r in results["rows"] for m in r.get("metrics", {})))
    header = ["model", *names, "loss"]
    rows = [
        [r["name"], *[_f(r["metrics"].get(m)) for m in names], _f(r.get("eval_loss"))]
        for r in results["rows"]
    ]
    return Table(header, rows)


def _stages_table(root: Path) -> Table:
    """Each stage's record (status, fingerprint, wall time), for the stages the run's config has."""
    lay = _layout(root)
    names = placement_names(root)
    trim_on, base_on = _active(root)
    dirs = [lay.card_dir, *(lay.plan_dir(n) for n in names), *(lay.train_dir(n) for n in names)]
    dirs += [lay.trim_dir] if trim_on else []
    dirs += [
        lay.eval_dir(n) for n in (["base"] if base_on else []) + names + (["trimmed"] if trim_on else [])
    ]
    recs = [d / "stage.json" for d in dirs] + [lay.report_record]
    rows = []
    for p in recs:
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append(
            [
                str(d.get("stage")),
                str(d.get("status")),
                str(d.get("fingerprint", ""))[:12],
                _f(d.get("wall_time_s"), ".1f"),
            ]
        )
    return Table(["stage", "status", "fingerprint", "wall s"], rows)


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3:
        return None
    from layercard.card.stats import spearman

    rho = spearman(list(xs), list(ys))
    return None if rho is None or not math.isfinite(rho) else float(rho)


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Doc:
    """Sections accumulated once, rendered as HTML and as markdown."""

    title: str
    parts: list[tuple[str, Any]] = dataclasses.field(default_factory=list)  # (kind, payload)

    def h2(self, text: str) -> None:
        self.parts.append(("h2", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, t: Table) -> None:
        self.parts.append(("table", t))

    def figure(self, f: Figure) -> None:
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
        out = [f"# {self.title}", ""]
        for kind, x in self.parts:
            if kind == "h2":
                out += [f"## {x}", ""]
            elif kind == "p":
                out += [x, ""]
            elif kind == "table":
                out += [x.markdown(), ""]
            else:
                out += [f"![{x.caption}]({figures_rel}/{x.name})", ""]
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


def build_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``figures/``) for a run folder.

    ``out`` is the HTML path (default ``RUN_DIR/report.html``); the markdown goes beside it with the
    ``.md`` suffix and the PNG figures into ``figures/`` beside it. Returns the paths written.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise LayercardError(f"{root}: no such run folder")
    lay = _layout(root)
    if not lay.card_json.is_file() and not any((root / "plan").glob("*/plan.json")):
        raise LayercardError(f"{root}: not a layercard run folder (no card/card.json or plan/*/plan.json)")
    html_path = Path(out) if out is not None else root / HTML_FILE
    md_path = html_path.with_suffix(".md")
    fig_dir = html_path.parent / FIGURES_DIR
    if fig_dir.is_dir():
        shutil.rmtree(fig_dir)  # the report owns its figures: none may linger from an earlier report
    fig_dir.mkdir(parents=True, exist_ok=True)

    run_cfg = _run_config(root)
    card = None
    if lay.card_json.is_file():
        from layercard.card import Card

        card = Card.load(lay.card_json)
    names = placement_names(root)
    plans = {n: d for n in names if (d := _maybe(lay.plan_json(n), "plan")) is not None}
    metrics = {n: d for n in names if (d := _maybe(lay.train_metrics(n))) is not None}
    trim = _maybe(lay.trim_json) if _active(root)[0] else None
    trace = _maybe(lay.trim_dir / "trace.json") if trim is not None and trim.get("trace") else None
    results = collect_results(root)
    rows = results["rows"]
    figures: list[Figure] = []

    def fig(name: str, caption: str, make: Callable[[Path], bytes | Path | None]) -> Figure | None:
        got = make(fig_dir / name)
        if got is None:
            return None
        data = got if isinstance(got, bytes) else Path(got).read_bytes()
        f = Figure(name, caption, data)
        figures.append(f)
        return f

    model_id = card.model["id"] if card else (run_cfg or {}).get("model", "?")
    task_name = card.task["name"] if card else "?"
    doc = _Doc(f"layercard run · {model_id} · {task_name}")
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc.p(f"Run folder {root.resolve()}; report built {created} from the artifacts only.")

    # ---- headline
    doc.h2("Headline: quality against cost")
    doc.p(
        "One row per model: the base model, each trained placement, and the trimmed adapter (adapters "
        "above the boundary K dropped). Loss drop = base eval loss − the model's eval loss. The trimmed "
        "adapter was trained as its parent, so its training cost is the parent's."
    )
    doc.table(_headline(results))
    if any(r.get("peak_memory_kind") == "process_peak_rss" for r in rows):
        doc.p(
            "Peak memory on CPU is the process's peak resident set: placements trained later in the same "
            "process cannot show less than an earlier one, so compare it only across separate runs."
        )

    # ---- card
    doc.h2("Layer Card")
    if card is None:
        doc.p("No card.json in this run.")
    else:
        from layercard.card import figures as card_figures
        from layercard.card.summary import top_layers

        doc.p(
            f"{card.model['id']} ({card.n_layers} layers), task {card.task['name']} ({card.task['split']}), "
            f"{card.task['n_examples']} probe examples, {card.n_target_tokens} target tokens, probe loss "
            f"{card.loss:.4f}; roles {','.join(card.roles)}. Top-5 layers by the planner's score "
            f"'{card.default_score}': {top_layers(card, card.default_score)}; by resnorm: "
            f"{top_layers(card, 'resnorm')}. Score basis: {card.default_score_basis}."
        )
        f = fig(
            "card_heatmap.png",
            "Layer Card heat map: log10 resnorm per layer and role",
            lambda p: card_figures.heatmap(card, p),
        )
        doc.figure(f)
        f = fig(
            "card_profiles.png",
            "Per-layer profiles: resnorm, gradient norm, activation energy, first-step rate",
            lambda p: card_figures.profiles(card, p),
        )
        doc.figure(f)
        doc.h2("Coupling matrix")
        if card.coupling:
            f = fig(
                "card_coupling.png",
                "Layer coupling: cosines of the layers' update effects on the output",
                lambda p: card_figures.coupling(card, p),
            )
            if f is not None:
                doc.figure(f)
        else:
            doc.p("The card was computed without coupling (card.coupling: false).")

    # ---- plans
    doc.h2("Plans")
    if plans:
        doc.table(_plans_table(plans))
        n_layers = card.n_layers if card else 1 + max((x for r in rows for x in r["layers"]), default=0)
        doc.figure(
            fig(
                "placements.png",
                "Adapted layers of every placement",
                lambda p: _fig_placements(rows, n_layers, p),
            )
        )
        for name, plan in plans.items():
            for w in plan.get("warnings", []):
                doc.p(f"{name}: warning: {w}")
    else:
        doc.p("No plans in this run.")

    # ---- training
    doc.h2("Training")
    if metrics:
        doc.table(_train_table(metrics))
        doc.figure(
            fig(
                "training.png",
                "Training loss per step (solid) and validation loss (dashed)",
                lambda p: _fig_training(metrics, p),
            )
        )
    else:
        doc.p("No training metrics in this run.")

    # ---- trim
    doc.h2("Boundary trace and trimming")
    if trim is None:
        doc.p("Trimming was not run (trim.enabled: false).")
    else:
        target = _trim_target(root, trim)
        cands = ", ".join(
            f"{k.replace('_', ' ')} at layer {v}" for k, v in (trim.get("candidates") or {}).items()
        )
        b, a = trim["before"], trim["after"]
        doc.p(
            f"Placement {target}: candidates {cands or '— (fixed window)'}; swept K = {trim['ks']} on "
            f"{trim['task']['n_examples']} {trim['task']['split']} examples by {trim['metric']}; chosen K = "
            f"{trim['chosen_k']}: adapted layers {b['n_adapted_layers']} → {a['n_adapted_layers']}, modules "
            f"{b['adapted_modules']} → {a['adapted_modules']}, inference s/example "
            f"{_f(b['s_per_example'], '.3f')} → {_f(a['s_per_example'], '.3f')}."
        )
        if a["n_adapted_layers"] == b["n_adapted_layers"]:
            doc.p(
                "No layer could be dropped: the best boundary keeps every adapted layer, so the trimmed "
                "adapter is the trained one (the logit lens shows where the gold token becomes likely; "
                "adapters above that layer are the ones trimming can remove)."
            )
        doc.figure(
            fig(
                "trace.png",
                "Logit-lens P(gold token) by layer with the adapter on and off, "
                "boundary candidates marked (left); sweep of the metric over K (right)",
                lambda p: _fig_trace(trace, trim, p),
            )
        )
        doc.table(_sweep_table(trim))

    # ---- predicted vs measured
    doc.h2("Predicted vs measured gain")
    pts = [
        r
        for r in rows
        if r["kind"] == "placement"
        and r.get("predicted_gain") is not None
        and r.get("measured_gain") is not None
    ]
    scores = list(dict.fromkeys(str(p["predicted"].get("score")) for p in plans.values()))
    score = "/".join(scores) or "?"
    if len(scores) > 1:
        doc.p(
            f"The placements were planned with different scores ({', '.join(scores)}): their predicted gains "
            "are in different units and do not rank against each other."
        )
    if pts:
        rho = _spearman([r["predicted_gain"] for r in pts], [r["measured_gain"] for r in pts])
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
            fig(
                "gain.png",
                "Predicted set gain (plan) against the measured loss drop",
                lambda p: _fig_gain(rows, score, p),
            )
        )
    else:
        doc.p("Needs plans and the evaluations of the base model and the placements.")

    # ---- quality vs cost
    doc.h2("Quality vs cost")
    if any(r["kind"] != "base" for r in rows):
        doc.figure(
            fig(
                "quality_cost.png",
                "Primary metric (top) and eval loss (bottom) against train s/step, "
                "peak memory, adapted modules and inference s/example; dotted: the base model",
                lambda p: _fig_quality_cost(rows, results["primary_metric"], p),
            )
        )
    else:
        doc.p("No trained placements to compare.")

    # ---- evaluation
    doc.h2("Evaluation")
    if rows:
        first = next(
            (lay.eval_json(n) for n in ("base", *names, "trimmed") if lay.eval_json(n).is_file()), None
        )
        ev = _maybe(first) if first is not None else None
        if ev is not None:
            t = ev.get("task", {})
            doc.p(
                f"{ev['n']} examples of {t.get('name')} ({t.get('split')}), greedy decoding, "
                f"batch {ev['config'].get('batch_size')}."
            )
        doc.table(_eval_table(results))
    else:
        doc.p("No evaluations in this run.")

    # ---- provenance
    doc.h2("Provenance")
    if card is not None:
        v = card.provenance.get("versions", {})
        doc.p(
            f"Model {card.model['id']} weights sha256 {card.model['hash'][:16]}…; task data sha256 "
            f"{card.task['data_hash'][:16]}…; seed {card.provenance.get('seed')}; "
            + ", ".join(f"{k} {val}" for k, val in v.items())
            + f"; machine {card.provenance.get('machine', {}).get('processor', '?')} "
            f"({card.provenance.get('machine', {}).get('cpu_count', '?')} CPUs)."
        )
    doc.table(_stages_table(root))

    write_text(html_path, doc.html())
    write_text(md_path, doc.markdown(FIGURES_DIR if fig_dir.parent == md_path.parent else str(fig_dir)))
    return {
        "html": str(html_path),
        "markdown": str(md_path),
        "figures": [str(fig_dir / f.name) for f in figures],
    }
