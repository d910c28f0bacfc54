"""The figures read as drawn: no mark takes another's colour or style, no text covers another text or the
data, every series is named, and one outlier layer or a far-off base model does not flatten the rest."""

from __future__ import annotations

import dataclasses
import itertools
import types
from typing import Any

import numpy as np
import pytest

from layercard.card import Card, GroupRow, UnitRow
from layercard.cost import CostModel
from layercard.plan import PlanConfig, make_plan

N_LAYERS = 30

COST = CostModel(
    intercept_s=1.0, per_layer_backward_s=0.5, per_module_s=0.1, n_layers=8, batch_size=4, batch_tokens=192,
    measured=[], device="cpu", memory_resident_mib=100.0, memory_base_mib=110.0, memory_per_layer_mib=5.0,
    memory_per_module_mib=2.0, memory_per_mparam_mib=16.0,
).to_dict()  # fmt: skip


def _card(n: int = N_LAYERS, *, cost: dict[str, Any] | None = None, coupling: bool = False) -> Card:
    """A hand-made card of ``n`` layers, a ``q`` and a ``v`` unit each; layer 11 the outlier a real
    30-layer card had (energy 26 among values near 0.05, first-step rate −43 among values near 0.05)."""
    units, groups = [], []
    for i in range(n):
        outlier = i == 11 and n > 11
        rate = -43.3 if outlier else 0.12 - 0.006 * i
        for role, proj in (("q", "q_proj"), ("v", "v_proj")):
            units.append(
                UnitRow(
                    key=f"{i}.{role}", layer=i, role=role, name=f"model.layers.{i}.self_attn.{proj}", d_in=32,
                    d_out=32, group=f"{i}.attn_in", grad_norm=1.0 + 0.1 * i, resnorm=0.4 + 0.01 * i,
                    captured={str(r): 0.1 * (1 - 2.0**-r) for r in (1, 2, 4, 8)}, rate=rate / 2,
                    rate_linear=abs(rate) / 2, rate_quadratic=0.0, lora_params=512,
                    grad_eig_energy=[1.0] * 32,
                )
            )  # fmt: skip
        groups.append(
            GroupRow(
                key=f"{i}.attn_in", layer=i, input_group="attn_in", d_in=32, n=10, sketched=None,
                eigenvalues=[1.0] * 32, energy=26.2 if outlier else 0.03 + 0.003 * i, kappa=1.0,
                effective_rank=32.0, noise_amplification=1.0,
            )
        )  # fmt: skip
    cpl = None
    if coupling:
        rng = np.random.default_rng(0)
        m = np.clip(np.corrcoef(rng.normal(size=(n, 40))), -1, 1)
        cpl = {"level": "layer", "layers": list(range(n)), "matrix": m.tolist(), "direction": "grad"}
    return Card(
        provenance={}, config={"delta": 1e-3}, model={"id": "model-x", "hash": "h" * 64, "family": "llama",
        "n_layers": n, "d_model": 32}, task={"name": "task-y", "data_hash": "d" * 64}, roles=["q", "v"],
        n_positions=10, n_target_tokens=10, loss=1.0, units=units, groups=groups, coupling=cpl, cost=cost,
        default_score="gradnorm",
    )  # fmt: skip


@pytest.fixture(scope="module")
def plan():
    """A search plan with every fixed rule drawn (on this card's two roles two of them fit no budget)."""
    plan = make_plan(_card(8, cost=COST), PlanConfig("recommend", budget="params=0.5x"))
    p = plan.predicted["candidate"]["params"]
    rules = {
        name: {"params": p * x, "quality": q, "error": 0.04}
        for name, x, q in (("peft-default", 1.1, 0.95), ("all-linear", 0.8, 0.99), ("last-n", 1.2, 0.93))
    }
    return dataclasses.replace(plan, predicted={**plan.predicted, "defaults": rules})


def _capture(monkeypatch, module: Any, name: str = "save_png") -> list[Any]:
    """The figures ``module`` writes through its ``name``, each drawn once more as it was saved."""
    figs: list[Any] = []
    real = getattr(module, name)

    def keep(fig, *a, **k):
        figs.append(fig)
        return real(fig, *a, **k)

    monkeypatch.setattr(module, name, keep)
    return figs


def _drawn(fig: Any) -> Any:
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _overlap(a: Any, b: Any, slack: float = 0.0) -> bool:
    return a.x0 < b.x1 - slack and b.x0 < a.x1 - slack and a.y0 < b.y1 - slack and b.y0 < a.y1 - slack


def _points(ax: Any) -> list[tuple[float, float]]:
    """Every data point of ``ax``'s lines and scatters, in display coordinates."""
    out = []
    for line in ax.get_lines():
        xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
        if len(xy) > 1 or not line.get_label().startswith("chosen"):
            out += [tuple(p) for p in line.get_transform().transform(xy) if np.all(np.isfinite(p))]
    for c in ax.collections:
        out += [tuple(p) for p in c.get_offset_transform().transform(c.get_offsets())]
    return out


# ---------------------------------------------------------------------------------------------------------
# the frontier figure
# ---------------------------------------------------------------------------------------------------------


def _measured(plan: Any) -> dict[str, dict[str, float]]:
    """Three trained placements whose points lie close on the parameter axis, as in a real run."""
    p = plan.predicted["candidate"]["params"]
    return {
        name: {"params": p * x, "params_predicted": p * x, "fraction": f, "predicted": 0.99, "se": 0.004}
        for name, x, f in (("all-linear", 0.8, 1.0), ("recommend", 1.0, 1.002), ("peft-default", 1.2, 0.99))
    }


@pytest.mark.parametrize("colors", [None, {"recommend": "tab:orange", "last-n": "tab:blue"}])
def test_no_rule_takes_the_frontiers_colour(plan, tmp_path, monkeypatch, colors):
    from matplotlib.colors import same_color, to_hex

    import layercard.plan.figures as plan_figures

    figs = _capture(monkeypatch, plan_figures)
    plan_figures.plot_frontier(plan, tmp_path / "f.png", colors=colors)
    ax = figs[0].axes[0]
    frontier = next(line for line in ax.get_lines() if line.get_label() == "frontier (predicted)")
    rules = {
        c.get_label(): c.lines[0].get_color()
        for c in ax.containers
        if c.get_label() in plan.predicted["defaults"]
    }
    assert set(rules) == set(plan.predicted["defaults"]), rules
    assert not any(same_color(c, frontier.get_color()) for c in rules.values()), rules
    assert len({to_hex(c) for c in rules.values()}) == len(rules)  # nor one another's


def test_names_of_close_measured_points_do_not_overlap(plan, tmp_path, monkeypatch):
    import layercard.plan.figures as plan_figures

    figs = _capture(monkeypatch, plan_figures)
    measured = _measured(plan)
    plan_figures.plot_frontier(plan, tmp_path / "f.png", measured)
    fig = figs[0]
    renderer = _drawn(fig)
    ax = fig.axes[0]
    names = [t for t in ax.texts if t.get_text() in measured]
    assert sorted(t.get_text() for t in names) == sorted(measured)
    boxes = [t.get_window_extent(renderer) for t in names]
    assert not any(_overlap(a, b) for a, b in itertools.combinations(boxes, 2)), boxes


def test_the_frontier_legend_names_the_error_band_and_a_neutral_measured_point(plan, tmp_path, monkeypatch):
    from matplotlib.colors import to_rgb

    import layercard.plan.figures as plan_figures

    figs = _capture(monkeypatch, plan_figures)
    plan_figures.plot_frontier(plan, tmp_path / "f.png", _measured(plan), colors={"all-linear": "tab:red"})
    legend = figs[0].axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert any(label.startswith("expected error") for label in labels), labels
    i = next(i for i, label in enumerate(labels) if label.startswith("measured"))
    r, g, b = to_rgb(legend.legend_handles[i].get_color())
    assert r == g == b, (r, g, b)  # grey: the entry stands for every measured point, in whichever colour


# ---------------------------------------------------------------------------------------------------------
# the trim figures
# ---------------------------------------------------------------------------------------------------------

SWEEP = {
    "sweep": [
        {"k": k, "loss": 0.4 - 0.012 * (k - 14), "metrics": {"exact_match": min(0.9, 0.3 + 0.05 * (k - 14))}}
        for k in range(14, 30)
    ],
    "metric": "exact_match",
    "chosen_k": 25,
    "task": {"name": "e2e_nlg"},
}
TRACE = types.SimpleNamespace(
    curve_on=[1 / (1 + np.exp(-(i - 18) / 2)) for i in range(N_LAYERS)],
    curve_off=[0.6 / (1 + np.exp(-(i - 18) / 2)) for i in range(N_LAYERS)],
    candidates={"sharpest_rise": 18, "half_final": 19},
    n_examples=32,
    n_target_tokens=400,
    task={"name": "e2e_nlg"},
    provenance={"model_id": "m"},
    n_layers=N_LAYERS,
)


def _sweep_legend_clear(fig: Any, ax: Any, n_entries: int) -> None:
    renderer = _drawn(fig)
    legend = ax.get_legend()
    assert len(legend.get_texts()) == n_entries
    box = legend.get_window_extent(renderer)
    twins = [a for a in fig.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds]
    points = [p for a in [ax, *twins] for p in _points(a)]
    assert points and not any(box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1 for x, y in points)
    assert not _overlap(box, ax.bbox, slack=1.0)  # nothing of the panel lies under it
    assert not _overlap(box, ax.title.get_window_extent(renderer))


def test_the_sweep_legend_covers_no_point(tmp_path, monkeypatch):
    import layercard.trim.figures as trim_figures

    figs = _capture(monkeypatch, trim_figures)
    trim_figures.plot_sweep(SWEEP, tmp_path / "trim.png")
    _sweep_legend_clear(figs[0], figs[0].axes[0], 3)


def test_the_reports_sweep_legend_covers_no_point_and_chosen_k_has_one_style(tmp_path, monkeypatch):
    from matplotlib.colors import same_color

    import layercard.report.figures as report_figures

    figs = _capture(monkeypatch, report_figures)
    report_figures.fig_trace(TRACE, SWEEP, tmp_path / "trace.png")
    fig = figs[0]
    trace_ax, sweep_ax = fig.axes[0], fig.axes[1]
    _sweep_legend_clear(fig, sweep_ax, 3)
    chosen = [
        line for a in (trace_ax, sweep_ax) for line in a.get_lines() if line.get_label().startswith("chosen")
    ]
    rise = next(line for line in trace_ax.get_lines() if line.get_label().startswith("sharpest rise"))
    assert len(chosen) == 2
    a, b = chosen
    assert same_color(a.get_color(), b.get_color()) and a.get_linestyle() == b.get_linestyle()
    assert not (same_color(a.get_color(), rise.get_color()) and a.get_linestyle() == rise.get_linestyle())


# ---------------------------------------------------------------------------------------------------------
# the report's quality-cost and placements figures
# ---------------------------------------------------------------------------------------------------------


def _rows() -> list[dict[str, Any]]:
    """A run's rows as the demo's format task had them: a base model far above the adapted losses, two
    models at one point of the modules panel, and one model without a training time."""
    row = lambda name, s, mem, mod, inf, q, loss: {  # noqa: E731
        "name": name, "kind": "placement", "layers": list(range(N_LAYERS)), "s_per_step": s,
        "peak_memory_mib": mem, "modules": mod, "s_per_example": inf, "primary_value": q, "eval_loss": loss,
        "trainable_params": 1000 * mod,
    }  # fmt: skip
    base = {
        "name": "base",
        "kind": "base",
        "layers": [],
        "modules": 0,
        "eval_loss": 2.156,
        "primary_value": 0.0,
    }
    return [
        {**base, "s_per_example": 0.1846},
        row("recommend", 0.9365, 1858.2, 90, 0.1934, 0.9375, 0.0142),
        row("peft-default", 0.8806, 1827.8, 60, 0.1886, 0.8125, 0.0396),
        row("all-linear", 0.9649, 1983.8, 210, 0.2053, 0.9375, 0.0196),
        row("reference", 1.0644, 2047.5, 210, 0.1998, 0.9375, 0.0193),
        row("late", None, 1900.0, 120, 0.1950, 0.9, 0.03),  # no training time: not in the first panel
    ]


@pytest.fixture
def quality_cost(tmp_path, monkeypatch):
    import layercard.report.figures as report_figures

    figs = _capture(monkeypatch, report_figures)
    report_figures.fig_quality_cost(_rows(), "strict_match", tmp_path / "qc.png")
    fig = figs[0]
    _drawn(fig)
    return fig


def test_inference_cost_ticks_are_few_and_apart(quality_cost):
    renderer = _drawn(quality_cost)
    ax = next(a for a in quality_cost.axes if a.get_xlabel() == "inference s/example")
    lo, hi = ax.get_xlim()
    shown = [
        t
        for t, x in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True)
        if t.get_text() and lo <= x <= hi
    ]
    assert 2 <= len(shown) <= 6, [t.get_text() for t in shown]
    boxes = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0)
    gap = 0.5 * quality_cost.dpi * 8 / 72  # half a character at the tick labels' size
    assert all(b.x0 - a.x1 >= gap for a, b in itertools.pairwise(boxes)), [t.get_text() for t in shown]


def test_a_far_off_base_model_does_not_squash_the_models(quality_cost):
    for ax in quality_cost.axes:
        if ax.get_ylabel().startswith("eval loss"):
            lo, hi = ax.get_ylim()
            assert hi < 2.156 and lo <= 0.0142 and hi >= 0.0396, (lo, hi)
            assert (0.0396 - 0.0142) / (hi - lo) > 0.5
            assert any("2.156" in t.get_text() for t in ax.texts)


def test_models_at_one_point_are_drawn_apart(quality_cost):
    ax = quality_cost.axes[2]  # the primary metric against modules: all-linear and reference at one point
    at = {}
    for c in ax.collections:
        if c.get_label() in ("all-linear", "reference"):
            at[c.get_label()] = c.get_offset_transform().transform(c.get_offsets())[0]
    assert len(at) == 2 and abs(at["all-linear"][0] - at["reference"][0]) >= 3, at


def test_the_quality_cost_legend_names_models_of_every_panel(quality_cost):
    (legend,) = quality_cost.legends
    assert {"recommend", "peft-default", "all-linear", "reference", "late"} <= {
        t.get_text() for t in legend.get_texts()
    }


def _plans() -> dict[str, Any]:
    def plan(matrices, roles, rank):
        units = [types.SimpleNamespace(role=r, rank=rank) for r in roles]
        return types.SimpleNamespace(
            units=units, predicted={"candidate": {"matrices": matrices, "rank": rank}}
        )

    return {
        "recommend": plan("mlp", ["gate", "up", "down"], 2),
        "peft-default": plan("q,v", ["q", "v"], 8),
        "all-linear": plan("all-linear", ["q", "k", "v", "o", "gate", "up", "down"], 1),
        "reference": plan("all-linear", ["q", "k", "v", "o", "gate", "up", "down"], 8),
    }


def test_placements_over_the_same_layers_are_told_apart(tmp_path, monkeypatch):
    import layercard.report.figures as report_figures

    figs = _capture(monkeypatch, report_figures)
    rows = _rows()[:5]
    report_figures.fig_placements(rows, N_LAYERS, tmp_path / "p.png", plans=_plans())
    report_figures.fig_placements(rows, N_LAYERS, tmp_path / "q.png")  # no plans: modules and parameters
    for fig, want in zip(figs, (["mlp, rank 2", "q,v, rank 8", "all-linear, rank 1", "all-linear, rank 8"],
                                ["90 modules", "60 modules", "210 modules, 210,000", "210 modules, 210,000"]),
                         strict=True):  # fmt: skip
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert len(set(labels)) == len(labels) == 4, labels
        assert all(w in label for w, label in zip(want, labels, strict=True)), labels
        assert "hollow" not in ax.get_title()  # no trimmed adapter drawn
    trimmed = {
        **rows[1],
        "name": "recommend-trimmed",
        "kind": "trimmed",
        "parent": "recommend",
        "layers": [0, 1],
    }
    report_figures.fig_placements([*rows, trimmed], N_LAYERS, tmp_path / "t.png", plans=_plans())
    ax = figs[-1].axes[0]
    assert "hollow" in ax.get_title() and "mlp, rank 2" in ax.get_yticklabels()[-1].get_text()


# ---------------------------------------------------------------------------------------------------------
# the card's figures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def card_figs(monkeypatch):
    from layercard.card import figures as card_figures

    return card_figures, _capture(monkeypatch, card_figures, "_save")


def test_the_heatmap_and_coupling_name_their_colour_bars(card_figs, tmp_path):
    card_figures, figs = card_figs
    card = _card(coupling=True)
    card_figures.heatmap(card, tmp_path / "h.png")
    card_figures.coupling(card, tmp_path / "c.png")
    heat, coup = figs
    assert heat.axes[0].get_xlabel() == "role" and heat.axes[1].get_ylabel() == "log10 resnorm"
    assert coup.axes[1].get_ylabel()
    assert "model-x" in coup.axes[0].get_title() and "task-y" in coup.axes[0].get_title()


def test_profiles_span_the_layers_and_an_outlier_does_not_flatten_the_rest(card_figs, tmp_path):
    card_figures, figs = card_figs
    card_figures.profiles(_card(), tmp_path / "p.png")
    axes = figs[0].axes
    _drawn(figs[0])
    assert axes[-1].get_xlim() == (-0.5, N_LAYERS - 0.5)
    lo, hi = axes[-1].get_xlim()
    assert max(x for x in axes[-1].get_xticks() if lo <= x <= hi) <= N_LAYERS - 1
    labels = {ax.get_ylabel().split("\n")[0]: ax for ax in axes}
    assert "root-sum-square" in labels["resnorm"].get_ylabel()
    assert labels["energy tr(Σ)/d"].get_yscale() == "log"
    rate = labels["first-step rate"]
    assert rate.get_yscale() == "symlog" and "< 0: loss rises" in rate.get_ylabel().replace("\n", " ")
    # a signed axis writes its negative ticks with their sign
    texts = [t.get_text() for t in rate.get_yticklabels() if t.get_text()]
    assert any(t.startswith(("-", "\u2212")) for t in texts), texts


def test_compare_numbers_a_few_layers_of_a_deep_model(card_figs, tmp_path):
    card_figures, figs = card_figs
    a = _card()
    b = dataclasses.replace(a, task={"name": "other", "data_hash": "e" * 64})
    card_figures.compare_plot(a, b, tmp_path / "c.png", 1.0, "resnorm")
    numbered = [int(t.get_text()) for t in figs[0].axes[1].texts]
    assert 0 < len(numbered) <= 15 and {0, N_LAYERS - 1} <= set(numbered), numbered
    assert figs[0].axes[0].get_xlim() == (-0.5, N_LAYERS - 0.5)


def test_a_symmetric_log_axis_keeps_its_negative_ticks_signed():
    from layercard.plotting import new_figure, plain_text

    fig, ax = new_figure()
    ax.plot([0, 1, 2], [-40.0, 0.01, 0.1])
    ax.set_yscale("symlog", linthresh=0.01)
    plain_text(fig)
    fig.canvas.draw()
    texts = [t.get_text() for t, y in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True) if y < 0]
    assert texts and all(t.startswith(("-", "\u2212")) for t in texts if t), texts


def test_a_process_set_to_typeset_with_latex_still_draws_plain_figures(tmp_path):
    """A notebook's ``text.usetex`` does not reach layercard's figures: without LaTeX they would fail."""
    import matplotlib
    from matplotlib.text import Text

    from layercard.plotting import new_figure, save_png

    with matplotlib.rc_context({"text.usetex": True}):
        fig, ax = new_figure()
        ax.plot([1, 10, 100], [0.5, 0.2, 0.1])
        ax.set_xscale("log")
        ax.set_title("task a_b at $2 and $3")
        png = save_png(fig, tmp_path / "f.png")
    assert png.startswith(b"\x89PNG")
    texts = fig.findobj(Text)
    assert len(texts) > 5 and not any(t.get_usetex() for t in texts)  # tick labels made while drawing too


def test_a_long_runs_loss_is_drawn_as_a_sliding_mean_over_its_faint_raw_losses(tmp_path, monkeypatch):
    import layercard.report.figures as report_figures

    assert report_figures.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    rng = np.random.default_rng(0)
    long = [[s, 2.0 - s / 3000 + float(rng.normal(0, 0.5))] for s in range(1, 3001)]
    short = [[s, 2.0 - s / 50] for s in range(1, 51)]
    curves = {
        "long": types.SimpleNamespace(loss_curve=long, val_curve=[[1500, 1.6], [3000, 1.2]]),
        "short": types.SimpleNamespace(loss_curve=short, val_curve=[]),
    }
    figs = _capture(monkeypatch, report_figures, "_save")
    report_figures.fig_training(curves, tmp_path / "training.png")
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["long train (mean of 120 logged steps)", "long validation", "short train"]
    faint, mean = ax.lines[0], ax.lines[1]
    assert faint.get_alpha() < 0.5 and len(faint.get_ydata()) == len(mean.get_ydata()) == 3000
    assert np.std(np.diff(mean.get_ydata()[200:])) < np.std(np.diff(faint.get_ydata())) / 20
    assert list(ax.lines[3].get_ydata()) == [v for _, v in short]  # a short run's losses as they are
