"""Bottleneck adapters (houlsby, parallel) and the adapter-folder loader, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from layercard.adapters import (
    ADAPTER_ATTR,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterSet,
    add_adapters,
    attached_adapters,
    load_adapter,
    load_adapters,
    save_adapters,
    sublayer_paths,
)
from layercard.errors import LayercardError

KINDS = ("houlsby", "parallel")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run ~10x faster on one intra-op thread on a shared CPU (no oversubscription spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(aset: AdapterSet, seed: int = 0) -> None:
    """Random (not constant: a LayerNorm would cancel a constant shift) non-zero adapter weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aset.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_sublayer_paths_come_from_the_layout():
    assert sublayer_paths(tiny_model("llama"), 2) == ("model.layers.2.self_attn", "model.layers.2.mlp")
    assert sublayer_paths(tiny_model("gpt2"), 0) == ("transformer.h.0.attn", "transformer.h.0.mlp")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_is_the_base_and_disabling_restores_it(family: str, kind: str):
    model = tiny_model(family)
    ids = _ids()
    base = _logits(model, ids)
    aset = add_adapters(model, kind, [1, 3], bottleneck=4)
    assert attached_adapters(model) is aset
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
    _perturb(aset)
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    aset.enabled = False
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
    aset.enabled = True
    aset.set_enabled_layers([])
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
    aset.set_enabled_layers([1])
    partial = _logits(model, ids)
    assert not torch.equal(partial, base) and not torch.equal(partial, adapted)
    aset.set_enabled_layers(None)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)
    with pytest.raises(LayercardError, match=r"layers \[2\]"):
        aset.set_enabled_layers([2])
    aset.remove()
    assert attached_adapters(model) is None and not hasattr(model, ADAPTER_ATTR)
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)


def test_houlsby_and_parallel_differ_and_params_live_in_the_model():
    model = tiny_model("llama")
    n_base = sum(p.numel() for p in model.parameters())
    outs = {}
    for kind in KINDS:
        with add_adapters(model, kind, [2], bottleneck=4, seed=3) as aset:
            # d·r + r + r·d + d per sublayer, two sublayers
            assert sum(p.numel() for p in model.parameters()) == n_base + 2 * (32 * 4 * 2 + 4 + 32)
            _perturb(aset)
            outs[kind] = _logits(model, _ids())
    assert not torch.equal(outs["houlsby"], outs["parallel"])
    assert sum(p.numel() for p in model.parameters()) == n_base


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_the_outputs(kind: str):
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = _ids()
    base = _logits(model, ids)
    aset = add_adapters(model, kind, [0, 2], bottleneck=4)
    opt = torch.optim.Adam(aset.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert aset.adapters["0"]["attn"].up.weight.abs().sum() > 0
    assert (_logits(model, ids) - base).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind: str):
    model = tiny_model("llama")
    ids = _ids()
    aset = add_adapters(model, kind, [1, 2], bottleneck=4, activation="gelu")
    _perturb(aset)
    want = _logits(model, ids)
    save_adapters(aset, tmp_path / "ad", base_model_hash="abc")
    cfg = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert cfg["kind"] == kind and cfg["layers"] == [1, 2] and cfg["bottleneck"] == 4
    assert cfg["base_model_hash"] == "abc" and cfg["schema_version"] == 1

    fresh = tiny_model("llama")
    loaded = load_adapters(fresh, tmp_path / "ad")
    assert loaded.activation == "gelu"
    torch.testing.assert_close(_logits(fresh, ids), want, rtol=0, atol=0)
    loaded.remove()
    with pytest.raises(LayercardError, match="trained on base model abc"):
        load_adapters(fresh, tmp_path / "ad", model_hash="def")


def test_missing_or_extra_tensor_is_an_error(tmp_path):
    model = tiny_model("llama")
    aset = add_adapters(model, "houlsby", [1], bottleneck=4)
    save_adapters(aset, tmp_path / "ad")
    aset.remove()
    weights = tmp_path / "ad" / WEIGHTS_FILE
    tensors = load_file(str(weights))
    gone = "adapters.1.mlp.up.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(weights))
    with pytest.raises(LayercardError, match=f"missing {gone}"):
        load_adapters(model, tmp_path / "ad")
    assert attached_adapters(model) is None  # a failed load leaves the model clean
    save_file({**tensors, "adapters.9.attn.up.bias": torch.zeros(32)}, str(weights))
    with pytest.raises(LayercardError, match="unexpected adapters.9.attn.up.bias"):
        load_adapters(model, tmp_path / "ad")
    first = add_adapters(model, "houlsby", [0])
    with pytest.raises(LayercardError, match="already has layercard adapters"):
        add_adapters(model, "parallel", [1])
    with pytest.raises(LayercardError, match="already attached"):
        first.attach(model)
    first.remove()


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(LayercardError, match="houlsby, parallel"):
        add_adapters(model, "prefix", [0])
    with pytest.raises(LayercardError, match=r"out of range"):
        add_adapters(model, "houlsby", [7])
    with pytest.raises(LayercardError, match="bottleneck"):
        add_adapters(model, "houlsby", [0], bottleneck=0)


def test_an_adapter_that_would_replicate_base_layers_is_refused(tmp_path):
    """PEFT's layer_replication grows the base itself, which detaching does not undo: the shared base would
    be wrong for everything after it."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "layer_replication": [[0, 2], [0, 2]]}))
    base = tiny_model("llama")
    before = {n: tuple(p.shape) for n, p in base.named_parameters()}
    with pytest.raises(
        LayercardError, match=r"adapter_config.json: layer_replication: \[\[0, 2\], \[0, 2\]\];"
    ):
        load_adapter(base, tmp_path)
    assert {n: tuple(p.shape) for n, p in base.named_parameters()} == before


def test_a_peft_adapter_saved_only_as_a_pickle_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(LayercardError, match="holds adapter_model.bin but no adapter_model.safetensors"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_a_config_asking_for_more_than_its_weights_hold_is_refused_before_building(tmp_path):
    """A rank or bottleneck width that none of the saved tensors has is refused before any module is built
    (built first, a 1e9 rank asks for hundreds of GiB)."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "p"
    )
    cfg_file = tmp_path / "p" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "r": 10**9}))
    with pytest.raises(
        LayercardError, match=r"adapter_config.json: rank 1000000000: larger than any LoRA tensor"
    ):
        load_adapter(tiny_model("llama"), tmp_path / "p")
    model = tiny_model("llama")
    save_adapters(add_adapters(model, "houlsby", [1], bottleneck=4), tmp_path / "b")
    ours = tmp_path / "b" / CONFIG_FILE
    ours.write_text(json.dumps({**json.loads(ours.read_text()), "bottleneck": 10**9}))
    fresh = tiny_model("llama")
    with pytest.raises(LayercardError, match=r"bottleneck 1000000000: no tensor of .* has it"):
        load_adapter(fresh, tmp_path / "b")
    assert attached_adapters(fresh) is None


def test_load_adapter_dispatches_peft_and_ours(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = _ids()
    # A PEFT folder.
    model = tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    want = _logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "lora"))
    got = load_adapter(tiny_model("llama"), tmp_path / "lora")
    assert isinstance(got, PeftModel)
    torch.testing.assert_close(_logits(got, ids), want)
    assert not any(p.requires_grad for p in got.parameters())

    # Ours.
    model = tiny_model("llama")
    aset = add_adapters(model, "parallel", [3], bottleneck=4)
    _perturb(aset)
    want = _logits(model, ids)
    save_adapters(aset, tmp_path / "ours")
    fresh = tiny_model("llama")
    got = load_adapter(fresh, tmp_path / "ours", is_trainable=True)
    assert got is fresh and attached_adapters(fresh) is not None
    torch.testing.assert_close(_logits(got, ids), want, rtol=0, atol=0)
    trainable = {n for n, p in got.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(ADAPTER_ATTR) for n in trainable)

    # Neither.
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayercardError, match="adapter_config.json.*layercard_adapter.json"):
        load_adapter(tiny_model("llama"), tmp_path / "empty")


def _opt(**kw) -> torch.nn.Module:
    """A tiny OPT, whose decoder layers hold fc1 and fc2 directly (no MLP module)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(
        vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", KINDS)
def test_a_layer_without_an_mlp_module_takes_no_bottleneck_adapter(kind: str):
    """A hook on the whole decoder layer would run the adapter after the residual sum, not beside the MLP."""
    model = _opt()
    with pytest.raises(LayercardError) as e:
        add_adapters(model, kind, [1, 3], bottleneck=4)
    msg = str(e.value)
    assert msg.startswith("layer 1: the MLP modules (model.decoder.layers.1.fc2) sit directly in the decoder")
    assert "--kind lora" in msg and "\n" not in msg
    assert attached_adapters(model) is None and not model._forward_hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_a_model_that_projects_around_its_layers_takes_no_adapter():
    """OPT-350m: 16-wide embeddings around a 32-wide residual stream (project_in / project_out)."""
    model = _opt(word_embed_proj_dim=16, do_layer_norm_before=False)
    with pytest.raises(LayercardError, match="lm_head.in_features is 16 but hidden_size is 32"):
        add_adapters(model, "parallel", [0], bottleneck=4)
    assert attached_adapters(model) is None


def test_an_adapter_that_does_not_fit_leaves_the_base_as_it_was(tmp_path):
    from peft import LoraConfig, get_peft_model

    from layercard.adapters import attached

    wide = get_peft_model(tiny_model("llama", hidden=64), LoraConfig(r=2, target_modules=["q_proj"]))
    wide.save_pretrained(tmp_path / "wide")  # another width: PEFT wraps the layers, then fails on the weights
    base = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    with pytest.raises(LayercardError, match="PEFT cannot load this adapter"):
        with attached(base, tmp_path / "wide"):
            pass
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, before)
    assert all(p.requires_grad for p in base.parameters())


def test_a_folder_of_another_architecture_or_a_damaged_config_is_refused_and_leaves_the_model(tmp_path):
    model = tiny_model("llama")
    aset = add_adapters(model, "houlsby", [1, 2], bottleneck=4)
    save_adapters(aset, tmp_path / "ad")
    aset.remove()
    cfg = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert cfg["model_type"] == "llama" and cfg["n_layers"] == 4 and cfg["d"] == 32

    # the same width, another architecture: its weights would load, and mean nothing there
    other = tiny_model("qwen2")
    flags = [p.requires_grad for p in other.parameters()]
    with pytest.raises(LayercardError, match=r"of a model of architecture llama; this model.s is qwen2"):
        load_adapter(other, tmp_path / "ad")
    assert [p.requires_grad for p in other.parameters()] == flags  # not frozen by a load that failed
    assert attached_adapters(other) is None

    def damaged(**change) -> str:
        (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps({**cfg, **change}))
        with pytest.raises(LayercardError) as e:
            load_adapters(tiny_model("llama"), tmp_path / "ad")
        assert "\n" not in str(e.value)
        return str(e.value).split(": ", 1)[1]

    assert damaged(layers=["a"]) == "layers[0]: must be an integer >= 0, got 'a' (text)"
    assert damaged(layers="12") == "layers: must be a list, got '12' (text)"
    assert damaged(layers=[1.5]).startswith("layers[0]: must be an integer >= 0")
    assert damaged(bottleneck="x") == "bottleneck: must be an integer >= 1, got 'x' (text)"
    assert damaged(schema_version=True).startswith("schema_version: this layercard reads 1")
    assert damaged(d=64).endswith("adapters of a model of width 64; this model's is 32")


def test_a_peft_adapter_that_does_not_fit_leaves_the_base_as_it_was(tmp_path):
    """load_adapter itself undoes what PEFT wrapped before it found the weights do not fit (the base's
    flags too), and draws nothing from the caller's random state."""
    from peft import LoraConfig, get_peft_model

    other = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))  # weights are rank 2
    base = tiny_model("llama")
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    state = torch.get_rng_state()
    with pytest.raises(LayercardError, match="PEFT cannot load this adapter"):
        load_adapter(base, tmp_path)
    assert not any(type(m).__module__.startswith("peft.") for m in base.modules())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert torch.equal(torch.get_rng_state(), state)
