"""Architectures whose decoder layers differ, whose final norm has narrower siblings, or whose logits are
scaled after the LM head: the generic layout, the logit lens and the trace's self-check."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from torch import nn

from layercard import models
from layercard.errors import LayercardError
from layercard.models import layouts as L
from layercard.tasks import load_task

torch.set_num_threads(1)


def _jamba() -> nn.Module:
    """A tiny Jamba: layers 0 and 2 a state-space mixer and a dense MLP, 1 and 3 attention and experts."""
    from transformers import AutoModelForCausalLM, JambaConfig

    cfg = JambaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=8,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_a_hybrids_layers_each_keep_their_own_roles():
    model = _jamba()
    layout = models.layout_for(model)
    assert layout.family == "generic" and layout.layer_roles is not None
    by_layer = {}
    for u in models.units(model, "all-linear"):
        by_layer.setdefault(u.layer, []).append(u.role)
    # read from layer 0 alone, the attention layers were missed (or the default roles refused)
    assert by_layer == {
        0: ["gate", "up", "down"],
        1: ["q", "k", "v", "o"],
        2: ["gate", "up", "down"],
        3: ["q", "k", "v", "o"],
    }
    assert sorted({u.layer for u in models.units(model, "q,v")}) == [1, 3]
    assert any(name.startswith("mamba") for name in layout.unmapped)  # said, not adapted
    assert any("experts" in name for name in layout.unmapped)
    for u in models.units(model, "all-linear"):
        assert models.get_module(model, u.name).in_features == u.d_in


def test_a_hybrid_is_carded_planned_and_adapted_on_exactly_its_planned_modules():
    from peft import get_peft_model

    from layercard.card import compute_card
    from layercard.config import CardConfig, PlanConfig
    from layercard.models import LoadedModel
    from layercard.plan import check_lora_model, make_plan

    model = _jamba()
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny-jamba", models.weights_hash(model), "tiny")
    task = load_task("synthetic:facts").subset(8)
    card = compute_card(loaded, task, CardConfig(examples=4, max_length=48, batch_size=4, calibrate=False))
    assert len(card.units) == 14
    plan = make_plan(card, PlanConfig(policy="all", roles="q,v", rank=2))
    assert sorted({u.layer for u in plan.units}) == [1, 3]
    check_lora_model(plan, get_peft_model(model, plan.peft_config()))


def test_a_hybrids_cost_calibration_times_the_layers_that_hold_the_roles():
    from layercard.card import compute_card
    from layercard.config import CardConfig
    from layercard.models import LoadedModel

    model = _jamba()
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny-jamba", models.weights_hash(model), "tiny")
    task = load_task("synthetic:facts").subset(8)
    cfg = CardConfig(examples=4, max_length=48, batch_size=4, roles="q,v", calibrate=True, calibrate_steps=1)
    card = compute_card(loaded, task, cfg)
    # layer 0, the bottom one, holds no q or v (nor layer 2): the calibration's single layers are 3 and 1,
    # and its "every layer" rows reach down to layer 1, where their backward stops
    assert [row["layers"] for row in card.cost["measured"]] == [[3], [1], [1, 3], [1, 3]]


def test_same_layers_keep_one_role_map():
    assert models.layout_for(tiny_model("llama", seed=0)).layer_roles is None


def test_the_final_norm_is_the_one_as_wide_as_the_head():
    """Gemma 3n and 4 keep a narrower per-layer-input norm beside the final one; the last norm-named child
    had been taken, and the trace failed on its width."""
    model = tiny_model("llama", seed=0)
    model.model.per_layer_projection_norm = nn.LayerNorm(8)  # registered after `norm`
    assert L._generic_norm(model, "model.layers", "lm_head") == "model.norm"
    model.model.zz_norm = nn.LayerNorm(32)  # as wide: the usual name still wins
    assert L._generic_norm(model, "model.layers", "lm_head") == "model.norm"


def _last_hidden_and_logits(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    store = {}
    hook = models.decoder_layers(model)[-1].register_forward_hook(
        lambda m, a, o: store.__setitem__("h", models.hidden_of(o))
    )
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.randint(3, 90, (2, 10))).logits
    finally:
        hook.remove()
    return store["h"], logits


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [("CohereConfig", "logit_scale", 0.0625), ("GraniteConfig", "logits_scaling", 8.0)],
    ids=["multiplier", "divisor"],
)
def test_the_lens_applies_the_output_scaling_the_config_asks_for(config, field, value):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, config)(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **{field: value},
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    hidden, logits = _last_hidden_and_logits(model)
    with torch.no_grad():
        torch.testing.assert_close(models.logits_from_hidden(model, hidden), logits)


def test_a_trace_whose_lens_is_not_the_models_output_is_refused():
    from peft import LoraConfig, get_peft_model

    from layercard.trim.lens import trace

    model = tiny_model("llama", seed=0)
    model.config.logits_scaling = 4.0  # the lens divides by it; Llama's own forward does not
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    task = load_task("synthetic:facts", split="test").subset(4)
    with pytest.raises(LayercardError, match="the logit lens at the last layer gives"):
        trace(peft, tiny_tokenizer(), task, task.examples, batch_size=4, max_length=48, progress=False)
    del model.config.logits_scaling
    t = trace(peft, tiny_tokenizer(), task, task.examples, batch_size=4, max_length=48, progress=False)
    assert t.curve_on[-1] == pytest.approx(t.model_prob, rel=1e-4)


def test_a_role_set_the_card_has_none_of_is_named():
    from layercard.card import compute_card
    from layercard.config import CardConfig, PlanConfig
    from layercard.models import LoadedModel
    from layercard.plan import make_plan

    model = tiny_model("llama", seed=0)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", models.weights_hash(model), "tiny")
    task = load_task("synthetic:facts").subset(4)
    card = compute_card(
        loaded, task, CardConfig(examples=4, max_length=48, batch_size=4, roles="q,v", calibrate=False)
    )
    with pytest.raises(LayercardError, match=r"roles 'mlp': the card measured q,v, none of gate,up,down"):
        make_plan(card, PlanConfig(policy="all", roles="mlp"))


def test_layer_outputs_that_are_not_one_stream_are_refused_by_the_lens(monkeypatch):
    """Gemma 3n's layers carry several streams (AltUp): the lens had failed on them with an IndexError."""
    import contextlib

    from layercard.trim import lens

    model = tiny_model("llama", seed=0)
    real = lens._layer_outputs

    @contextlib.contextmanager
    def several_streams(m):
        with real(m) as store:
            yield store
        store[0] = torch.stack([store[0], store[0]])  # (streams, batch, positions, hidden)

    monkeypatch.setattr(lens, "_layer_outputs", several_streams)
    ids = torch.randint(3, 90, (2, 10))
    with pytest.raises(LayercardError, match=r"decoder layer 0's output has shape \(2, 2, 10, 32\)"):
        lens.lens_logits(model, ids)
