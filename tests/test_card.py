"""compute_card end to end on tiny models, its artifact, and the card/compare commands."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard.card import Card, CardConfig, compute_card, stats
from layercard.card.probe import make_accumulators, run_probe
from layercard.card.summary import card_markdown
from layercard.cli import app
from layercard.errors import LayercardError
from layercard.models import LoadedModel, units, weights_hash
from layercard.tasks import load_task, target_entropy

FAST = dict(examples=8, max_length=48, batch_size=4, calibrate=False)  # timings differ run to run


def _loaded(family: str = "llama", **kw) -> LoadedModel:
    model = tiny_model(family, **kw)
    return LoadedModel(
        model=model,
        tokenizer=tiny_tokenizer(),
        model_id=f"tiny-{family}",
        model_hash=weights_hash(model),
        source="memory",
    )


@pytest.fixture(scope="module")
def facts():
    return load_task("synthetic:facts", split="train")


def _strip_volatile(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for k in ("wall_time_s", "created"):
        d["provenance"].pop(k)
    d.pop("timings")
    return d


def test_same_seed_same_card(facts):
    loaded = _loaded()
    a = compute_card(loaded, facts, CardConfig(**FAST), progress=False)
    b = compute_card(loaded, facts, CardConfig(**FAST), progress=False)
    assert _strip_volatile(a.to_dict()) == _strip_volatile(b.to_dict())
    c = compute_card(loaded, facts, CardConfig(**FAST, seed=1), progress=False)
    assert [u.resnorm for u in a.units] != [u.resnorm for u in c.units]  # another probe subset


def test_card_contents_and_roundtrip(facts, tmp_path):
    loaded = _loaded()
    card = compute_card(loaded, facts, CardConfig(**FAST, roles="all-linear"), progress=False)
    assert len(card.units) == 4 * 7 and card.n_layers == 4
    assert {g.input_group for g in card.groups} == {"attn_in", "attn_out", "mlp_in", "mlp_mid"}
    for u in card.units:
        assert u.grad_norm > 0 and u.resnorm > 0
        caps = [u.captured[str(r)] for r in stats.CAPTURE_RANKS]
        assert caps == sorted(caps)  # captured@r grows with r ...
        assert caps[-1] == pytest.approx(u.resnorm**2, rel=1e-5)  # ... up to resnorm² at full rank
        assert card.resnorm_sq(u) == pytest.approx(u.resnorm**2, rel=1e-6)  # δ re-evaluation
        assert u.lora_params == 8 * (u.d_in + u.d_out)
    # Stronger damping can only lower resnorm.
    assert all(card.resnorm_sq(u, 10.0) < card.resnorm_sq(u) for u in card.units)
    # the task's target entropy, read from the whole task in the card's seeded order
    h, n = target_entropy(loaded.tokenizer, facts, FAST["max_length"], seed=0)
    assert (card.task["target_entropy"], card.task["target_entropy_tokens"]) == (round(h, 4), n)
    assert n > card.n_target_tokens  # more than the probe set's few examples hold
    assert f"target entropy {h:.3f} nats per token" in card_markdown(card)
    path = card.save(tmp_path / "card.json")
    again = Card.load(path)
    assert again.to_dict() == card.to_dict()
    for score in ("capacity", "gradnorm", "rate", "rate_linear", "gradnorm_energy", "saturating"):
        assert again.layer_scores(score).shape == (4,)


def test_layer_group_passes_equal_one_pass(facts):
    loaded = _loaded()
    one = compute_card(loaded, facts, CardConfig(**FAST), progress=False)
    two = compute_card(loaded, facts, CardConfig(**FAST, layer_groups=3), progress=False)
    for a, b in zip(one.units, two.units, strict=True):
        assert a.key == b.key
        assert a.resnorm == pytest.approx(b.resnorm, rel=1e-6)
        assert a.rate == pytest.approx(b.rate, rel=1e-6, abs=1e-12)


def test_sketch_keeps_ranking_and_is_a_lower_bound(facts):
    loaded = _loaded(layers=12, hidden=64)
    cfg = dict(examples=16, max_length=64, batch_size=8, delta=1e-6, roles="all-linear", calibrate=False)
    exact = compute_card(loaded, facts, CardConfig(**cfg, sketch=None), progress=False)
    sk = compute_card(loaded, facts, CardConfig(**cfg, sketch=48), progress=False)
    assert all(g.sketched == 48 for g in sk.groups if g.d_in > 48)
    a = [u.resnorm for u in exact.units]
    b = [u.resnorm for u in sk.units]
    assert stats.spearman(a, b) >= 0.95
    # The sketch sees a subspace of the inputs, so it cannot explain more of the gradient.
    assert all(y <= x * (1 + 1e-3) for x, y in zip(a, b, strict=True))


def test_default_sketch_projects_only_inputs_wider_than_the_hidden_size(facts):
    loaded = _loaded()  # hidden 32, MLP 64 wide
    auto = compute_card(loaded, facts, CardConfig(**FAST, roles="all-linear"), progress=False)
    assert auto.config["sketch"] == "auto"
    assert {g.input_group: g.sketched for g in auto.groups if g.layer == 0} == {
        "attn_in": None,
        "attn_out": None,
        "mlp_in": None,
        "mlp_mid": 32,
    }
    exact = compute_card(loaded, facts, CardConfig(**FAST, roles="all-linear", sketch="off"), progress=False)
    assert all(g.sketched is None for g in exact.groups)
    # Only the sketched units change, and their resnorm can only fall.
    for a, e in zip(auto.units, exact.units, strict=True):
        if a.role == "down":
            assert a.resnorm <= e.resnorm * (1 + 1e-3)
        else:
            assert a.resnorm == pytest.approx(e.resnorm, rel=1e-6)
            assert a.grad_norm == pytest.approx(e.grad_norm, rel=1e-6)


def test_default_sketch_projects_every_input_of_a_wide_model_to_the_cap(facts):
    loaded = _loaded(hidden=1040, layers=1, intermediate_size=1100)  # wider than AUTO_EXACT_WIDTH
    card = compute_card(loaded, facts, CardConfig(**FAST, roles="all-linear"), progress=False)
    assert {g.input_group: g.sketched for g in card.groups} == {
        "attn_in": 512,
        "attn_out": 512,
        "mlp_in": 512,
        "mlp_mid": 512,
    }


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), ("off", None), (None, None), ("48", 48), (16, 16)]
)
def test_sketch_setting_values(value, expected):
    assert CardConfig(sketch=value).sketch == expected


@pytest.mark.parametrize("value", [0, "-3", "wide", 2.5])
def test_sketch_setting_refuses_other_values(value):
    with pytest.raises(LayercardError, match=r"card\.sketch: must be a positive integer, 'auto' or 'off'"):
        CardConfig(sketch=value)


def test_capacity_coupling_reads_exact_covariances():
    cfg = CardConfig(coupling=True, coupling_direction="capacity")
    assert cfg.sketch == "auto" and cfg.sketch_size(576) is None
    assert CardConfig().sketch_size(576) == 576
    assert CardConfig().sketch_size(1024) == 1024
    assert CardConfig().sketch_size(1025) == 512
    assert CardConfig().sketch_size(2048) == 512
    assert CardConfig(sketch=1024).sketch_size(2048) == 1024
    with pytest.raises(LayercardError, match="coupling_direction"):
        CardConfig(coupling=True, coupling_direction="capacity", sketch=64)


def test_coupling_and_cost(facts):
    loaded = _loaded()
    card = compute_card(
        loaded,
        facts,
        CardConfig(**{**FAST, "calibrate": True}, coupling=True, calibrate_steps=1),
        progress=False,
    )
    c = np.asarray(card.coupling["matrix"])
    assert c.shape == (4, 4)
    np.testing.assert_allclose(np.diag(c), 1.0)
    np.testing.assert_allclose(c, c.T, atol=1e-12)
    assert card.cost["n_layers"] == 4 and len(card.cost["measured"]) == 5
    assert all(m["s_per_step"] > 0 for m in card.cost["measured"])
    # one all-layer placement at a higher rank identifies the rank term (params differ at equal modules)
    all_layers = [m for m in card.cost["measured"] if len(m["layers"]) == 4]
    assert sorted(m["rank"] for m in all_layers) == [8, 32]
    assert all_layers[0]["modules"] == all_layers[1]["modules"]
    assert all(v >= 0 for k, v in card.cost.items() if k.endswith("_s"))
    # the card's markdown states the share of a step that grows with positions, as the card recorded it
    share = card.cost["step_position_share"]
    assert (
        0.0 <= share <= 1.0
        and card.cost["batch_scaling"]["half_positions"] * 2 == card.cost["batch_positions"]
    )
    said = card_markdown(card)
    assert f"so {100 * share:.0f}% of a step grows with the positions it computes" in said
    # ... and every fitted term, the rank's and the memory's too
    c = card.cost
    assert f"per million adapter parameters {c['per_mparam_s']:.4f} s" in said
    assert f"{c['batch_positions']:,.0f} padded positions" in said
    assert (
        f"per layer {c['memory_per_layer_mib']:.2f} MiB, per module {c['memory_per_module_mib']:.2f} MiB"
        in said
    )


def test_no_target_tokens_and_nonfinite_loss():
    model = tiny_model("llama")
    specs = units(model, "q,v")
    accs = make_accumulators(specs, lora_rank=2, a_draws=1, seed=0, sketch=None, device=torch.device("cpu"))
    batch = {
        "input_ids": torch.ones(1, 6, dtype=torch.long),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "labels": torch.full((1, 6), -100),
    }
    with pytest.raises(LayercardError, match="no target tokens"):
        run_probe(model, [batch], accs, n_target_tokens=0)
    batch["labels"] = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(LayercardError, match="non-finite loss"):
        run_probe(model, [batch], accs, n_target_tokens=5)


def test_config_validation_names_field():
    with pytest.raises(LayercardError, match="examples"):
        CardConfig(examples=0)
    with pytest.raises(LayercardError, match="delta"):
        CardConfig(delta=-1.0)
    with pytest.raises(LayercardError, match="coupling_direction"):
        CardConfig(coupling_direction="sideways")


# ---- CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _card_args(model, task, out, *extra):
    return [
        "card",
        "--model",
        str(model),
        "--task",
        task,
        "--out",
        str(out),
        "--examples",
        "6",
        "--max-length",
        "48",
        "--batch-size",
        "3",
        "--no-calibrate",
        *extra,
    ]


def test_cli_card_writes_artifacts(tiny_folder, tmp_path):
    out = tmp_path / "card"
    r = CliRunner().invoke(app, _card_args(tiny_folder, "synthetic:facts", out, "--coupling", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["default_score"] == "gradnorm_energy"
    for name in ("card.json", "card.md", "card_heatmap.png", "card_profiles.png", "card_coupling.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "card_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    card = Card.load(out / "card.json")
    assert card.provenance["model_hash"] == card.model["hash"]
    assert {"dtype": "float32", "device": "cpu"}.items() <= card.provenance["config"].items()
    assert "dtype" not in card.config  # the card's settings alone: a card's fingerprint is unchanged
    assert card.provenance["data_hash"] == card.task["data_hash"]


def test_cli_compare(tiny_folder, tmp_path):
    for name, task in (("a", "synthetic:facts"), ("b", "synthetic:format")):
        r = CliRunner().invoke(app, _card_args(tiny_folder, task, tmp_path / name))
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app,
        [
            "compare",
            str(tmp_path / "a/card.json"),
            str(tmp_path / "b/card.json"),
            "--out",
            str(tmp_path / "cmp.png"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert -1.0 <= res["spearman"] <= 1.0
    assert (tmp_path / "cmp.png").exists()
    # A card of another model is refused.
    other = json.loads((tmp_path / "b/card.json").read_text())
    other["model"]["hash"] = "0" * 64
    (tmp_path / "c.json").write_text(json.dumps(other))
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "a/card.json"), str(tmp_path / "c.json")])
    assert r.exit_code != 0 and "same model" in r.output


@pytest.mark.parametrize(
    "content, expect",
    [
        ('{"input": "a", "target": "b"}\n{"input": "c", "target": \n', ":2"),
        ('{"input": "a"}\n', "target"),
        ("", "no examples"),
    ],
)
def test_cli_bad_task_file(tiny_folder, tmp_path, content, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "card"
    r = CliRunner().invoke(app, _card_args(tiny_folder, str(bad), out))
    assert r.exit_code != 0
    assert expect in r.output and "bad.jsonl" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (out / "card.json").exists()


@pytest.mark.parametrize(
    "args, expect", [(["--roles", "q,x"], "x"), (["--model", "/no/such/model"], "/no/such")]
)
def test_cli_bad_model_or_role(tiny_folder, tmp_path, args, expect):
    base = _card_args(tiny_folder, "synthetic:facts", tmp_path / "card")
    i = base.index("--model")
    if args[0] == "--model":
        base[i + 1] = args[1]
    else:
        base += args
    r = CliRunner().invoke(app, base)
    assert r.exit_code != 0 and expect in r.output
    assert not (tmp_path / "card" / "card.json").exists()


def test_dataclass_replace_keeps_card_valid(facts):
    card = compute_card(_loaded(), facts, CardConfig(**FAST), progress=False)
    hot = dataclasses.replace(card, default_score="gradnorm")
    assert np.allclose(hot.layer_scores(), card.layer_scores("gradnorm"))


# ---- the real model ------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_card_whole_path(smollm2, tmp_path):
    """A small card on SmolLM2-135M: every unit measured, finite, and saved."""
    from conftest import shared_data

    task = load_task(str(shared_data("e2e_nlg/validation.jsonl")))
    card = compute_card(
        smollm2,
        task,
        CardConfig(roles="q,v", examples=4, max_length=96, batch_size=4, calibrate=False),
        progress=False,
    )
    assert card.n_layers == 30 and len(card.units) == 60
    assert {u.role for u in card.units} == {"q", "v"}
    assert all(np.isfinite(u.resnorm) and u.resnorm > 0 and u.grad_norm > 0 for u in card.units)
    assert 0 < card.loss < 10
    assert card.model["hash"] == smollm2.model_hash
    Card.load(card.save(tmp_path / "card.json"))


def test_cli_models_lists_builtin():
    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    names = [m["name"] for m in json.loads(r.stdout)["models"]]
    assert "smollm2" in names


def test_cli_card_records_the_prompt_it_measured_with(tiny_folder, tmp_path):
    """A card made with another prompt is another card: its task identity and plan both say so."""
    from layercard.plan import PlanConfig, make_plan

    plain, prompted = tmp_path / "plain", tmp_path / "prompted"
    r = CliRunner().invoke(app, _card_args(tiny_folder, "synthetic:facts", plain))
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app, [*_card_args(tiny_folder, "synthetic:facts", prompted), "--prompt", "Answer briefly: {input}"]
    )
    assert r.exit_code == 0, r.output
    a, b = Card.load(plain / "card.json"), Card.load(prompted / "card.json")
    assert a.task["data_hash"] != b.task["data_hash"]
    assert b.task["prompt"] is not None and "Answer briefly" in str(b.task["prompt"])
    plan = make_plan(b, PlanConfig(policy="all"))
    assert plan.card["prompt"] == b.task["prompt"]


def test_a_cards_timings_read_in_words():
    from layercard.card.summary import timings_text

    text = timings_text({"stats_s": 9.1, "probe_s": 18.6, "calibrate_s": 28.2, "total_s": 47.0})
    assert text == "47.0 s in all: probe pass 18.6 s (its statistics 9.1 s), cost calibration 28.2 s"
    assert timings_text({"new_part_s": 1.0}) == "time: new part 1.0 s"


def test_cli_card_says_when_its_prompts_give_no_instruction(tiny_folder, tmp_path):
    """A file no preset names, of bare inputs: the card is measured, and the command says how it read them."""
    rows = [{"input": f"sentence {i}", "target": "positive" if i % 2 else "negative"} for i in range(8)]
    data = tmp_path / "mine" / "good.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(app, _card_args(tiny_folder, str(data), tmp_path / "card"))
    assert r.exit_code == 0, r.output
    assert "each prompt is the record's input as it is, with no instruction" in " ".join(r.output.split())
    r = CliRunner().invoke(
        app, [*_card_args(tiny_folder, str(data), tmp_path / "c2"), "--prompt", "Say:\\n{input}"]
    )
    assert r.exit_code == 0 and "no instruction" not in r.output


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_a_role_set_takes_what_the_model_has_in_the_card_and_the_plan(facts, family):
    from layercard.config import PlanConfig
    from layercard.plan import make_plan

    loaded = _loaded(family)
    card = compute_card(loaded, facts, CardConfig(**FAST, roles="all-linear"), progress=False)
    assert card.roles == ["q", "k", "v", "o", "up", "down"]  # no gate in these models
    plan = make_plan(card, PlanConfig(policy="top", budget="layers=2", roles="mlp"))
    assert {u.role for u in plan.units} == {"up", "down"}
    with pytest.raises(LayercardError, match="has no module for role gate"):
        compute_card(loaded, facts, CardConfig(**FAST, roles="q,gate"), progress=False)
    with pytest.raises(LayercardError, match="no units for gate"):
        make_plan(card, PlanConfig(policy="top", budget="layers=2", roles="gate,up"))
    # the search's matrix sets too: q,v is the fused attention input, as PEFT's default for these models
    assert {u.role for u in make_plan(card, PlanConfig(policy="peft-default", budget="params=1x")).units} == {
        "qkv"
    }
    rec = make_plan(card, PlanConfig(policy="recommend", budget="params=0.3x"))
    assert rec.units and {u.role for u in rec.units} <= {"qkv", "o", "up", "down"}
    assert "gate" not in rec.config["roles"]  # the roles its units adapt, so the plan can be rebuilt
    assert rec.restricted(rec.layers[-1:], card, policy="lora-drop").layers == rec.layers[-1:]


def test_a_probe_pass_that_overflowed_is_one_line_naming_the_unit(tmp_path):
    huge = tmp_path / "huge"  # finite loss, overflowing gradient sums in float32
    model = tiny_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e4)
    model.save_pretrained(huge)
    tiny_tokenizer().save_pretrained(huge)
    r = CliRunner().invoke(app, _card_args(huge, "synthetic:facts", tmp_path / "card", "--roles", "q,v"))
    assert r.exit_code == 2, r.output
    assert "error: unit 0.q: its gradient sums are not finite" in " ".join(r.output.split())
    assert not (tmp_path / "card").exists()


def test_a_probe_rank_past_every_module_width_is_refused_before_the_pass(tiny_folder, tmp_path):
    r = CliRunner().invoke(
        app, _card_args(tiny_folder, "synthetic:facts", tmp_path / "card", "--lora-rank", "100000")
    )
    assert r.exit_code == 2 and "--lora-rank 100000: above the width of unit" in " ".join(r.output.split())
    assert not (tmp_path / "card").exists()
