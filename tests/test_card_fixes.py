"""The card's edges: all-or-nothing card folders, non-finite statistics, the model's context, eval mode,
the caller's random state, cut counts, compare on any column, and hand-edited card.json fields."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard.card import Card, CardConfig, compute_card, stats, write_card_folder
from layercard.card import figures as card_figures
from layercard.card.coupling import layer_effects
from layercard.cli import app
from layercard.errors import LayercardError
from layercard.models import LoadedModel, weights_hash
from layercard.tasks import load_task

FAST = dict(examples=8, max_length=48, batch_size=4, calibrate=False)


def _loaded(family: str = "llama", **kw) -> LoadedModel:
    model = tiny_model(family, **kw)
    return LoadedModel(model, tiny_tokenizer(), f"tiny-{family}", weights_hash(model), "memory")


@pytest.fixture(scope="module")
def facts():
    return load_task("synthetic:facts", split="train")


@pytest.fixture(scope="module")
def coupled(facts) -> Card:
    return compute_card(_loaded(), facts, CardConfig(**FAST, coupling=True), progress=False)


def _folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---- a card folder is written whole or not at all ----------------------------------------------------


def test_a_card_that_cannot_be_written_leaves_the_folder_as_it_was(coupled, tmp_path, monkeypatch):
    out = tmp_path / "card"
    write_card_folder(coupled, out)
    before = _folder(out)
    bad = dataclasses.replace(
        coupled, units=[dataclasses.replace(coupled.units[0], rate=math.inf), *coupled.units[1:]]
    )
    with pytest.raises(
        LayercardError, match=r"card\.json: refusing to write a non-finite number at units\[0\]\.rate"
    ):
        write_card_folder(bad, out)
    assert _folder(out) == before  # no new card.md or figures beside the old card.json, no temporaries

    def broken(*_a, **_k):
        raise LayercardError("no figure")

    monkeypatch.setattr(card_figures, "profiles", broken)
    with pytest.raises(LayercardError, match="no figure"):
        write_card_folder(coupled, out)
    assert _folder(out) == before


def test_a_card_without_coupling_removes_the_old_coupling_figure(coupled, tmp_path):
    out = tmp_path / "card"
    assert [p.name for p in write_card_folder(coupled, out)][-1] == "card_coupling.png"
    plain = dataclasses.replace(coupled, coupling=None)
    written = write_card_folder(plain, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json",
        "card.md",
        "card_heatmap.png",
        "card_profiles.png",
    ]
    assert written == [out / "card_heatmap.png", out / "card_profiles.png"]
    assert Card.load(out) == plain


def test_a_non_finite_statistic_is_named_before_anything_is_written(facts, tmp_path, monkeypatch):
    def overflowing(*_a, **_k):
        return -math.inf, 1.0, math.inf

    monkeypatch.setattr(stats, "first_step_rate", overflowing)
    with pytest.raises(LayercardError, match=r"unit 0\.q \(.*q_proj\): its rate is not finite") as e:
        compute_card(_loaded(), facts, CardConfig(**FAST), progress=False)
    assert "--lr" in str(e.value) and "\n" not in str(e.value)
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "card"
    out.mkdir()
    (out / "card.json").write_text("{}")  # an earlier card, kept
    args = ["card", "-m", str(folder), "-t", "synthetic:facts", "-o", str(out), "--examples", "4"]
    r = CliRunner().invoke(app, [*args, "--max-length", "48", "--no-calibrate", "--json"])
    assert r.exit_code != 0 and "its rate is not finite" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert _folder(out) == {"card.json": b"{}"}


# ---- the first-step scale -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("lr", {"lr": 1e154}),
        ("lora_alpha", {"lora_alpha": 1e160}),
        ("lr", {"lr": 1e300, "lora_alpha": 1e200}),  # a product past the float range
    ],
)
def test_a_first_step_past_the_float_range_is_refused_before_the_pass(field, values):
    with pytest.raises(LayercardError, match=rf"card\.{field}: lr·lora_alpha/lora_rank = .* at most 1e\+150"):
        CardConfig(**values)
    CardConfig(lr=1e140)  # large, still representable when squared


def test_the_first_step_rate_overflows_to_infinity_not_an_exception():
    g = np.ones((4, 3))
    a = [np.ones((2, 3))]
    rate, lin, quad = stats.first_step_rate(g, a, [np.eye(2)], lr=1e160, scale=2.0, curvature=1.0)
    assert math.isfinite(lin) and quad == math.inf and rate == -math.inf


# ---- the model's context --------------------------------------------------------------------------------


def test_examples_longer_than_the_models_context_are_cut_to_it(tmp_path, capsys):
    rows = [{"input": " ".join(["a b c d e"] * 12), "target": "w1 w2 w3"} for _ in range(3)]
    rows.append({"input": "a b", "target": "w1"})
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(data), chat_template=False)
    loaded = _loaded("gpt2", n_positions=32)
    cfg = CardConfig(examples=4, max_length=128, batch_size=4, calibrate=False)
    card = compute_card(loaded, task, cfg, progress=False)
    assert card.task["max_length"] == 32 and card.task["examples_cut"] == 3
    assert card.config["max_length"] == 128  # what was asked
    err = capsys.readouterr().err
    assert "the model reads at most 32 positions (n_positions in its config)" in " ".join(err.split())
    assert "--max-length 128 acts as 32: 3 of 4 probe examples" in " ".join(err.split())
    Card.from_dict(card.to_dict())


# ---- eval mode and the caller's state ------------------------------------------------------------------


def test_coupling_runs_in_eval_mode_and_restores_each_modules_mode(facts):
    loaded = _loaded("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    cfg = CardConfig(**FAST, coupling=True, coupling_examples=4)
    evaluated = compute_card(loaded, facts, cfg, progress=False)
    model = loaded.model
    model.train()
    model.transformer.h[1].eval()  # a caller's mix of modes
    modes = {n: m.training for n, m in model.named_modules()}
    trained = compute_card(loaded, facts, cfg, progress=False)
    assert trained.coupling["matrix"] == evaluated.coupling["matrix"]
    assert {n: m.training for n, m in model.named_modules()} == modes

    specs = [n for n, _ in model.named_modules() if n.endswith("c_fc")][:2]
    g = torch.Generator().manual_seed(0)
    dirs = {}
    for i, name in enumerate(specs):
        w = model.get_submodule(name).weight  # Conv1D: (d_in, d_out); a direction is d_out × d_in
        dirs[i] = {name: torch.randn(w.shape[1], w.shape[0], generator=g)}
    ids = torch.randint(3, 90, (2, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    _, first = layer_effects(model, dirs, [batch])
    _, again = layer_effects(model, dirs, [batch])
    np.testing.assert_array_equal(first, again)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_the_callers_random_state_is_left_as_it_was(facts):
    loaded = _loaded()  # building the tiny model seeds the generator itself
    torch.manual_seed(123)
    before = torch.get_rng_state()
    compute_card(loaded, facts, CardConfig(**FAST), progress=False)
    assert torch.equal(torch.get_rng_state(), before)


# ---- cut examples are said and recorded whatever the progress switch ---------------------------------------


def test_cut_examples_are_said_without_progress_and_recorded(facts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAYERCARD_PROGRESS", "0")
    card = compute_card(_loaded(), facts, CardConfig(**{**FAST, "max_length": 8}), progress=False)
    n = card.task["examples_cut"]
    assert n == card.task["n_examples"] == 8 and card.task["max_length"] == 8
    assert f"{n} of 8 probe examples are longer than max_length 8" in capsys.readouterr().err
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "card"
    args = ["card", "-m", str(folder), "-t", "synthetic:facts", "-o", str(out), "--examples", "4"]
    r = CliRunner().invoke(app, [*args, "--max-length", "8", "--no-calibrate", "--json"])
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # the summary alone on stdout
    assert "4 of 4 probe examples are longer than max_length 8" in r.stderr
    assert Card.load(out).task["examples_cut"] == 4


# ---- compare ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_cards(facts, tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    loaded = _loaded()
    a = compute_card(loaded, facts, CardConfig(**FAST), progress=False)
    b = compute_card(loaded, load_task("synthetic:format", split="train"), CardConfig(**FAST), progress=False)
    return a, b, a.save(root / "a.json"), b.save(root / "b.json")


def test_compare_plots_the_score_it_correlates(two_cards, tmp_path, monkeypatch):
    a, b, _, _ = two_cards
    shown = {}
    monkeypatch.setattr(card_figures, "_save", lambda fig, path: shown.setdefault("fig", fig) and path)
    card_figures.compare_plot(a, b, tmp_path / "c.png", 0.5, "rate")
    left, scatter = shown["fig"].axes
    assert list(left.lines[0].get_ydata()) == [r["rate"] for r in a.layer_table()]
    assert list(left.lines[1].get_ydata()) == [r["rate"] for r in b.layer_table()]
    assert left.get_ylabel() == "rate" and "rate" in scatter.get_title()


@pytest.mark.parametrize("score", ["layer", "nope"])
def test_compare_refuses_what_is_no_per_layer_score(two_cards, score):
    _, _, pa, pb = two_cards
    r = CliRunner().invoke(app, ["compare", str(pa), str(pb), "--score", score])
    assert r.exit_code == 2 and f"--score {score!r}: not a per-layer column; valid: resnorm, " in r.output


def test_compare_of_a_constant_column_is_undefined_and_valid_json(two_cards, tmp_path):
    _, _, pa, pb = two_cards
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SciPy's warning about constant input
        assert stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    out = tmp_path / "cmp.png"
    r = CliRunner().invoke(
        app, ["compare", str(pa), str(pb), "--score", "lora_params", "--json", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output

    def refuse(c):
        raise ValueError(c)

    res = json.loads(r.stdout, parse_constant=refuse)
    assert res["spearman"] is None and out.exists()
    assert "ConstantInputWarning" not in r.output
    r = CliRunner().invoke(app, ["compare", str(pa), str(pb), "--score", "lora_params"])
    assert r.exit_code == 0 and "lora_params: undefined (lora_params is the same in every layer" in " ".join(
        r.output.split()
    )
    r = CliRunner().invoke(app, ["compare", str(pa), str(pb), "--score", "rate", "--out", str(out)])
    assert r.exit_code == 0 and "Spearman ρ of per-layer rate: " in r.output


# ---- hand-edited card.json ---------------------------------------------------------------------------------


def _pop(path: str):
    def change(d):
        *head, last = path.split(".")
        for k in head:
            d = d[k]
        d.pop(last)

    return change


def _set(path: str, value):
    def change(d):
        *head, last = path.split(".")
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(last) if isinstance(d, list) else last] = value

    return change


def _duplicate_unit(d):
    d["units"].append(copy.deepcopy(d["units"][0]))


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (_set("config.horizon_steps", "abc"), r"config\.horizon_steps: must be an integer >= 1, got 'abc'"),
        (_set("config.lr", "x"), r"config\.lr: must be a finite number > 0, got 'x'"),
        (_pop("config.lora_rank"), r"config\.lora_rank: missing"),
        (_pop("provenance"), r"provenance: missing"),
        (_set("provenance", "x"), r"provenance: must be a mapping, got 'x'"),
        (_pop("task.n_examples"), r"task\.n_examples: missing"),
        (_set("task.examples_cut", 99), r"task\.examples_cut: must be an integer in 0\.\.8, got 99"),
        (_set("groups.0.n", 0), r"groups\[0\]\.n: must be an integer >= 1, got 0"),
        (_set("units.0.captured.x", 0.1), r"units\[0\]\.captured: keys must be ranks .*, got 'x'"),
        (_duplicate_unit, r"units\[28\]\.key: is used twice, got '0\.q'"),
        (_set("units.0.layer", 1), r"units\[0\]\.layer: must be its group .*'s layer 0, got 1"),
        (_set("units.0.role", "qq"), r"units\[0\]\.role: must be a role \(q, k, .*\), got 'qq'"),
        (_set("roles.0", "attn"), r"roles\[0\]: must be a role .*, got 'attn'"),
        (_set("units.0.grad_norm", 1e308), r"units\[0\]: its gradnorm score is not finite"),
        # the cost model: a negative term would price a step below nothing, a zero batch divides by zero
        (_set("cost.intercept_s", -5.0), r"cost\.intercept_s: must be a finite number >= 0, got -5\.0"),
        (_set("cost.per_module_s", -1), r"cost\.per_module_s: must be a finite number >= 0, got -1"),
        (_set("cost.batch_size", 0), r"cost\.batch_size: must be an integer >= 1, got 0"),
        (_pop("cost.n_layers"), r"cost\.n_layers: missing"),
        (_set("cost.n_layers", 7), r"cost\.n_layers: must be the card's 4 layers, got 7"),
        (
            _set("cost.step_position_share", -3),
            r"cost\.step_position_share: must be a share in \[0, 1\], got -3",
        ),
        (_set("cost.memory_module_width", 0.0), r"cost\.memory_module_width: must be a finite number > 0"),
        # a misspelt field would be dropped and its default taken
        (_set("default_scroe", "gradnorm"), r"default_scroe: unknown field \(did you mean default_score\?\)"),
    ],
)
def test_a_hand_edited_card_field_fails_where_it_is_read(coupled, tmp_path, change, expect):
    from layercard.cost import CostModel

    d = json.loads(json.dumps(coupled.to_dict()))
    # a calibrated card's cost model, as the card records it
    d["cost"] = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.5, per_module_s=0.1, n_layers=d["model"]["n_layers"],
        batch_size=4, batch_tokens=192, measured=[], device="cpu", memory_base_mib=110.0,
        step_position_share=0.5, memory_module_width=64.0,
    ).to_dict()  # fmt: skip
    Card.from_dict(json.loads(json.dumps(d)))  # as it was: valid
    change(d)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(d))
    with pytest.raises(LayercardError, match=expect) as e:
        Card.load(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_card_without_the_newer_task_fields_still_loads(coupled):
    d = json.loads(json.dumps(coupled.to_dict()))
    for key in ("max_length", "examples_cut", "examples_clipped"):
        d["task"].pop(key)
    d["config"].pop("horizon_steps")
    assert Card.from_dict(d).task["n_examples"] == 8


# ---- several processes ------------------------------------------------------------------------------------


def test_the_warning_that_siblings_are_stopped_is_dropped(caplog):
    from layercard.card.distributed import _quiet_sibling_stops

    log = logging.getLogger("torch.multiprocessing.spawn")
    with caplog.at_level(logging.WARNING, logger=log.name):
        with _quiet_sibling_stops():
            log.warning("Terminating process %s via signal SIGTERM", 1)
            log.warning("Unable to shutdown process %s via SIGTERM , forcefully exiting via SIGKILL", 2)
        log.warning("Terminating process %s via signal SIGTERM", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "Unable to shutdown process 2 via SIGTERM , forcefully exiting via SIGKILL",
        "Terminating process 3 via signal SIGTERM",
    ]


# ---- what a plan needs to know of each module ------------------------------------------------------------


def test_a_gpt2_card_records_conv1d_modules_and_its_plans_set_fan_in_fan_out(facts, coupled):
    from layercard.plan import PlanConfig, make_plan

    card = compute_card(_loaded("gpt2"), facts, CardConfig(**FAST), progress=False)
    assert {u.module_kind for u in card.units} == {"conv1d"}
    card = Card.from_dict(json.loads(json.dumps(card.to_dict())))  # kept through card.json
    plan = make_plan(card, PlanConfig(policy="uniform", budget="layers=2"))
    assert plan.lora_config["fan_in_fan_out"] is True and plan.peft_config().fan_in_fan_out
    assert plan.restricted(plan.layers[:1], card).lora_config["fan_in_fan_out"] is True
    assert make_plan(card, PlanConfig(budget="params=0.25x")).lora_config["fan_in_fan_out"] is True
    assert {u.module_kind for u in coupled.units} == {"linear"}
    assert (
        "fan_in_fan_out"
        not in make_plan(coupled, PlanConfig(policy="uniform", budget="layers=2")).lora_config
    )
    old = json.loads(json.dumps(coupled.to_dict()))  # a card written before the kind was kept still loads
    for u in old["units"]:
        u.pop("module_kind")
    assert Card.from_dict(old).units[0].module_kind is None
    old["units"][0]["module_kind"] = "conv"
    with pytest.raises(
        LayercardError, match=r"units\[0\]\.module_kind: must be linear or conv1d, got 'conv'"
    ):
        Card.from_dict(old)


def test_names_with_dollar_signs_are_drawn_as_written(coupled, tmp_path):
    """A task or model name holding two '$' is text, not a formula: the card's figures draw it."""
    odd = r"price_$\frac{a}$"
    card = dataclasses.replace(
        coupled, task={**coupled.task, "name": odd}, model={**coupled.model, "id": f"m_{odd}"}
    )
    written = write_card_folder(card, tmp_path / "card")
    assert [p.name for p in written] == ["card_heatmap.png", "card_profiles.png", "card_coupling.png"]
