"""LoRA-drop importance and the layer selections made from it (docs/design.md §7)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

from layercard.card import CardConfig, compute_card
from layercard.errors import LayercardError
from layercard.models import LoadedModel, decoder_layers, weights_hash
from layercard.plan import Plan, PlanConfig, make_plan
from layercard.tasks import batches, encode_task, load_task
from layercard.train import layer_importance, layers_by_coverage, select_layers
from layercard.train.importance import _branch_hooks, _State

N_LAYERS = 4
ZEROED = 2


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic:facts", split="train")


def _lora_model(*, trained: bool = True, zero_layer: int | None = ZEROED):
    """A tiny Llama with LoRA on q and v; B drawn at random (as after training), one layer's B zeroed."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=not trained)
    model = get_peft_model(tiny_model("llama", layers=N_LAYERS), cfg)
    if zero_layer is not None:
        with torch.no_grad():
            for mod in decoder_layers(model)[zero_layer].modules():
                if isinstance(mod, LoraLayer):
                    mod.lora_B["default"].weight.zero_()
    return model


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _by_hand(model, task, examples, batch_size: int) -> dict[int, float]:
    """Σ over unpadded positions of ‖B·A·x·scaling‖² per layer, from each LoRA module's captured input."""
    sums = {i: 0.0 for i in range(N_LAYERS)}
    captured: list[tuple[int, LoraLayer, torch.Tensor]] = []
    handles = []
    for i, block in enumerate(decoder_layers(model)):
        for mod in block.modules():
            if isinstance(mod, LoraLayer):
                handles.append(
                    mod.register_forward_hook(lambda m, a, o, i=i: captured.append((i, m, a[0].detach())))
                )
    sub = type(task)(task.name, task.source, task.split, task.format, tuple(examples))
    encoded = encode_task(tiny_tokenizer(), sub)
    model.eval()
    with torch.no_grad():
        for batch in batches(encoded, batch_size, 0, sort_by_length=True):
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = batch["attention_mask"].double()
            for i, m, x in captured:
                delta = m.lora_B["default"](m.lora_A["default"](x)) * m.scaling["default"]
                sums[i] += float((delta.double().pow(2).sum(-1) * mask).sum())
    for h in handles:
        h.remove()
    total = sum(sums.values())
    return {i: v / total for i, v in sums.items()}


def test_importance_matches_the_definition_and_a_zeroed_layer_gets_none(task):
    model = _lora_model()
    examples = task.examples[:6]
    before = _hooks_left(model)
    imp = layer_importance(model, tiny_tokenizer(), task, examples, batch_size=4)
    assert _hooks_left(model) == before  # every hook removed
    assert sorted(imp) == list(range(N_LAYERS))
    assert imp[ZEROED] == 0.0
    assert all(imp[i] > 0 for i in range(N_LAYERS) if i != ZEROED)
    assert math.fsum(imp.values()) == pytest.approx(1.0)
    expect = _by_hand(model, task, examples, batch_size=4)
    assert imp == pytest.approx(expect, rel=1e-6)
    assert select_layers(imp, N_LAYERS - 1) == [i for i in range(N_LAYERS) if i != ZEROED]


def test_hooks_are_removed_when_the_pass_fails():
    model = _lora_model()
    before = _hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), _branch_hooks(model, _State()) as layers:
        assert layers == list(range(N_LAYERS)) and _hooks_left(model) > before
        raise RuntimeError("boom")
    assert _hooks_left(model) == before


def test_importance_refuses_what_it_cannot_measure(task):
    tok = tiny_tokenizer()
    with pytest.raises(LayercardError, match="every LoRA branch output is zero") as e:
        layer_importance(_lora_model(trained=False, zero_layer=None), tok, task, task.examples[:2])
    assert "\n" not in str(e.value)
    with pytest.raises(LayercardError, match="no LoRA adapter"):
        layer_importance(tiny_model("llama", layers=N_LAYERS), tok, task, task.examples[:2])
    with pytest.raises(LayercardError, match="no examples"):
        layer_importance(_lora_model(), tok, task, [])
    # a disabled adapter, and LoRA on raw parameters, would be counted as zero importance
    model = _lora_model()
    with pytest.raises(LayercardError, match=r"layer 0 self_attn\.q_proj: the adapter is disabled"):
        with model.disable_adapter():
            layer_importance(model, tok, task, task.examples[:2])
    raw = LoraConfig(r=4, target_modules=["v_proj"], target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(LayercardError, match=r"q_proj: LoRA on raw parameters \(target_parameters\)"):
        layer_importance(get_peft_model(tiny_model("llama"), raw), tok, task, task.examples[:2])


IMP = {0: 0.1, 1: 0.4, 2: 0.0, 3: 0.3, 4: 0.2}


@pytest.mark.parametrize("k, expect", [(1, [1]), (2, [1, 3]), (3, [1, 3, 4]), (5, [0, 1, 2, 3, 4])])
def test_select_layers(k, expect):
    assert select_layers(IMP, k) == expect


@pytest.mark.parametrize(
    "share, expect",
    [
        (0.3, [1]),
        (0.4, [1]),
        (0.5, [1, 3]),
        (0.7, [1, 3]),
        (0.9, [1, 3, 4]),
        (0.95, [0, 1, 3, 4]),
        (1.0, [0, 1, 3, 4]),
    ],
)
def test_layers_by_coverage(share, expect):
    assert layers_by_coverage(IMP, share) == expect


def test_selection_ties_and_bad_input():
    assert select_layers({0: 0.5, 1: 0.5}, 1) == [0]  # ties go to the lower layer
    assert layers_by_coverage({5: 2.0, 7: 6.0}, 0.75) == [7]  # unnormalised importance works too
    for call, says in [
        (lambda: select_layers(IMP, 0), "k must be"),
        (lambda: select_layers(IMP, 6), "k must be"),
        (lambda: layers_by_coverage(IMP, 0.0), "share must be"),
        (lambda: layers_by_coverage(IMP, 1.5), "share must be"),
        (lambda: layers_by_coverage({0: 0.0, 1: 0.0}, 0.5), "every layer's importance is zero"),
        (lambda: select_layers({0: float("nan")}, 1), "layer 0"),
        (lambda: select_layers({0: -1.0}, 1), "layer 0"),
        (lambda: select_layers({}, 1), "no layers"),
    ]:
        with pytest.raises(LayercardError, match=says):
            call()


def test_a_lora_drop_plan_is_a_restricted_plan(task):
    """The benchmark's composition: a reference plan restricted to the important layers."""
    base = tiny_model("llama", layers=N_LAYERS)
    loaded = LoadedModel(base, tiny_tokenizer(), "tiny", weights_hash(base), "memory")
    cfg = CardConfig(roles="q,v", examples=4, max_length=48, batch_size=4, calibrate=False)
    card = compute_card(loaded, task, cfg, progress=False)
    reference = make_plan(card, PlanConfig("peft-default"))
    layers = layers_by_coverage({0: 0.1, 1: 0.5, 2: 0.0, 3: 0.4}, 0.9)
    plan = reference.restricted(layers, card, policy="lora-drop")
    assert plan.layers == [1, 3] and plan.config["policy"] == "lora-drop"
    assert {u.layer for u in plan.units} == {1, 3}
    assert Plan.from_dict(plan.to_dict(), source="plan.json") == plan
