"""Architecture layouts: where each family keeps its parts, units, and module accessors.

This is the only module that knows where each architecture keeps its decoder layers, final norm,
LM head and linear modules. Everything else asks for :class:`UnitSpec` objects and module paths.

A *unit* is one linear module in one decoder layer (docs/design.md §2). Fused modules (Phi-3 ``qkv_proj``,
GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``, Phi-3 ``gate_up_proj``) are one unit whose ``role`` is
the fused name and whose ``covers`` lists the canonical roles it computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from layercard.errors import LayercardError
from layercard.models.roles import (
    CANONICAL_ROLES,
    FUSED_ROLES,
    RoleSpec,
    explicit_roles,
    parse_roles,
    role_order,
    role_spec,
)

# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """One linear module in one decoder layer."""

    layer: int
    role: str
    covers: tuple[str, ...]
    name: str
    d_in: int
    d_out: int
    input_group: str
    module_kind: str

    @property
    def key(self) -> str:
        """``"<layer>.<role>"``: the unit's name in cards, plans and reports."""
        return f"{self.layer}.{self.role}"


@dataclasses.dataclass(frozen=True)
class ArchLayout:
    """Where an architecture keeps its parts; paths are relative to the (PEFT-unwrapped) model."""

    family: str
    embed_path: str
    layers_path: str
    final_norm_path: str | None
    lm_head_path: str
    roles: Mapping[str, RoleSpec]
    # Modules of a decoder layer holding weight matrices that no role names (the generic layout only):
    # never adapted, e.g. a mixture of experts' fused expert weights.
    unmapped: tuple[str, ...] = ()
    # Each layer's own roles where the layers differ (the generic layout only: a hybrid of attention and
    # linear-attention or state-space layers, dense and MoE layers, layers sharing another's keys); None
    # where every layer has ``roles``. ``roles`` is then every role some layer has.
    layer_roles: tuple[Mapping[str, RoleSpec], ...] | None = None

    def roles_of(self, layer: int) -> Mapping[str, RoleSpec]:
        """The roles decoder layer ``layer`` has."""
        return self.roles if self.layer_roles is None else self.layer_roles[layer]


_LLAMA_ROLES = {
    "q": role_spec("self_attn.q_proj", "q"),
    "k": role_spec("self_attn.k_proj", "k"),
    "v": role_spec("self_attn.v_proj", "v"),
    "o": role_spec("self_attn.o_proj", "o"),
    "gate": role_spec("mlp.gate_proj", "gate"),
    "up": role_spec("mlp.up_proj", "up"),
    "down": role_spec("mlp.down_proj", "down"),
}
_PHI3_ROLES = {
    "qkv": role_spec("self_attn.qkv_proj", "qkv"),
    "o": role_spec("self_attn.o_proj", "o"),
    "gate_up": role_spec("mlp.gate_up_proj", "gate_up"),
    "down": role_spec("mlp.down_proj", "down"),
}
_GPT2_ROLES = {
    "qkv": role_spec("attn.c_attn", "qkv"),
    "o": role_spec("attn.c_proj", "o"),
    "up": role_spec("mlp.c_fc", "up"),
    "down": role_spec("mlp.c_proj", "down"),
}
_NEOX_ROLES = {
    "qkv": role_spec("attention.query_key_value", "qkv"),
    "o": role_spec("attention.dense", "o"),
    "up": role_spec("mlp.dense_h_to_4h", "up"),
    "down": role_spec("mlp.dense_4h_to_h", "down"),
}


@dataclasses.dataclass(frozen=True)
class _Family:
    """Candidate paths per part; the first that resolves on the model wins (they move between versions)."""

    embed: tuple[str, ...]
    layers: tuple[str, ...]
    norm: tuple[str, ...]
    head: tuple[str, ...]
    roles: Mapping[str, RoleSpec]


_LLAMA_LIKE = _Family(
    embed=("model.embed_tokens", "model.language_model.embed_tokens"),
    layers=("model.layers", "model.language_model.layers"),
    norm=("model.norm", "model.language_model.norm"),
    head=("lm_head",),
    roles=_LLAMA_ROLES,
)
_FAMILIES: dict[str, _Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "phi3": dataclasses.replace(_LLAMA_LIKE, roles=_PHI3_ROLES),
    "gpt2": _Family(
        embed=("transformer.wte",),
        layers=("transformer.h",),
        norm=("transformer.ln_f",),
        head=("lm_head",),
        roles=_GPT2_ROLES,
    ),
    "gpt_neox": _Family(
        embed=("gpt_neox.embed_in",),
        layers=("gpt_neox.layers",),
        norm=("gpt_neox.final_layer_norm",),
        head=("lm_head", "embed_out"),
        roles=_NEOX_ROLES,
    ),
}
# config.model_type -> family
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


def base_model(model: nn.Module) -> nn.Module:
    """The model PEFT wraps, so paths match PEFT ``target_modules`` naming; other models unchanged."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Activation (gradient) checkpointing of ``model``'s decoder layers for the block, turned off after it
    unless it was on before: each layer keeps only its input for backward and recomputes the rest there.

    Non-reentrant, so that it needs no input gradients with a frozen base: transformers turns those on
    with it (for the reentrant kind), and they would carry every step's backward down to the embeddings,
    where a frozen base's stops at the lowest adapted layer; they are turned off again. A model whose
    ``transformers`` class offers no checkpointing is refused."""
    if not on:
        yield
        return
    base = base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise LayercardError(
            f"gradient_checkpointing: {type(base).__name__} offers no activation checkpointing in "
            "transformers; train without it"
        )
    # transformers 5 renamed the gradient_checkpointing_* methods activation_checkpointing_*
    new_api = hasattr(base, "activation_checkpointing_enable")
    was = any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
    if not was:
        hooked = input_gradients_on(base)
        if new_api:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not hooked and callable(getattr(base, "disable_input_require_grads", None)):
            with contextlib.suppress(AttributeError):
                base.disable_input_require_grads()
    try:
        yield
    finally:
        if not was:
            base.activation_checkpointing_disable() if new_api else base.gradient_checkpointing_disable()


def input_gradients_on(model: nn.Module) -> bool:
    """Whether ``model`` makes its input embeddings' output require gradients (transformers'
    ``enable_input_require_grads``, which its checkpointing turns on): every backward then runs down to the
    embeddings, where a frozen base's stops at the lowest adapted layer."""
    base = base_model(model)
    return bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))


def model_type(model: nn.Module) -> str | None:
    """The architecture's name in its config (``llama``, ``gpt2``), or None where it has none."""
    cfg = getattr(base_model(model), "config", None)
    return getattr(cfg, "model_type", None)


def _try_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (relative to the PEFT-unwrapped model)."""
    mod = _try_module(base_model(model), path)
    if mod is None:
        raise LayercardError(f"model {model_type(model)!r}: no module at path {path!r}")
    return mod


def _first_path(root: nn.Module, candidates: Sequence[str]) -> str | None:
    return next((p for p in candidates if _try_module(root, p) is not None), None)


def layout_for(model: nn.Module) -> ArchLayout:
    """The layout of ``model``: the family table by ``config.model_type``, else a generic search."""
    root = base_model(model)
    mtype = model_type(model)
    family = _MODEL_TYPES.get(mtype or "")
    tried: list[str] = []
    if family is not None:
        fam = _FAMILIES[family]
        embed, layers, head = (_first_path(root, c) for c in (fam.embed, fam.layers, fam.head))
        if embed and layers and head and _has_roles(root, layers, fam.roles):
            return ArchLayout(family, embed, layers, _first_path(root, fam.norm), head, dict(fam.roles))
        tried += [*fam.layers, *fam.head]
    layout = _generic_layout(root)
    if layout is not None:
        _check_widths(root, layout, mtype)
        return layout
    if any(_is_ssm_mixer(m) for m in root.modules()):
        raise LayercardError(
            f"model_type {mtype!r} ({type(root).__name__}): its layers are state-space (Mamba) mixers, with "
            "no attention or MLP modules to adapt; layercard places adapters on attention and MLP modules"
        )
    tried.append("any nn.ModuleList of decoder layers holding q/k/v/o/gate/up/down nn.Linear or Conv1D")
    raise LayercardError(
        f"model_type {mtype!r} ({type(root).__name__}): no known layout; looked for {', '.join(tried)}"
    )


def _check_widths(root: nn.Module, layout: ArchLayout, mtype: str | None) -> None:
    """Refuse a model whose embedding or LM head is narrower or wider than its decoder layers.

    Such a model (OPT-350m: ``word_embed_proj_dim`` with ``project_in``/``project_out``) projects between
    the residual stream and the head, which the logit lens, the card's hooks and the adapters' width would
    all miss.
    """
    config = getattr(root, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        return
    head = _try_module(root, layout.lm_head_path)
    embed = _try_module(root, layout.embed_path)
    widths = [
        (f"{layout.lm_head_path}.in_features", getattr(head, "in_features", None)),
        (f"{layout.embed_path}.embedding_dim", getattr(embed, "embedding_dim", None)),
    ]
    for field, width in widths:
        if isinstance(width, int) and width != hidden:
            raise LayercardError(
                f"model_type {mtype!r} ({type(root).__name__}): {field} is {width} but hidden_size is "
                f"{hidden} (a projection sits between the decoder layers and the embedding or LM head); "
                "layercard reads the residual stream through the LM head and cannot map this model"
            )


def _has_roles(root: nn.Module, layers_path: str, roles: Mapping[str, RoleSpec]) -> bool:
    layers = _try_module(root, layers_path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    return all(_try_module(layers[0], spec[0]) is not None for spec in roles.values())


# --- generic fallback -------------------------------------------------------------------------------------

# Leaf names that say the role on their own.
_LEAF_ROLES = {
    "q_proj": "q",
    "query": "q",
    "wq": "q",
    "q_lin": "q",
    "query_proj": "q",
    "k_proj": "k",
    "key": "k",
    "wk": "k",
    "k_lin": "k",
    "key_proj": "k",
    "v_proj": "v",
    "value": "v",
    "wv": "v",
    "v_lin": "v",
    "value_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "wo": "o",
    "out_lin": "o",
    "qkv_proj": "qkv",
    "c_attn": "qkv",
    "query_key_value": "qkv",
    "wqkv": "qkv",
    "qkv": "qkv",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "gate_up_proj": "gate_up",
    "c_fc": "up",
    "fc1": "up",
    "fc_in": "up",
    "dense_h_to_4h": "up",
    "fc2": "down",
    "fc_out": "down",
    "dense_4h_to_h": "down",
}
# Leaf names whose role depends on whether they sit in the attention or the MLP block.
_CONTEXT_ROLES = {
    "c_proj": ("o", "down"),
    "dense": ("o", None),
    "proj": ("o", None),
    "out": ("o", None),
    "w1": (None, "gate"),
    "w3": (None, "up"),
    "w2": (None, "down"),
}
_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "ff")


def _is_ssm_mixer(mod: nn.Module) -> bool:
    """A state-space (Mamba) mixer: it holds the ``A_log`` state matrix. Its linear modules are no
    attention or MLP, and PEFT refuses LoRA on a Mamba mixer's ``out_proj``."""
    return isinstance(getattr(mod, "A_log", None), nn.Parameter)


def _is_linear(mod: nn.Module) -> bool:
    base = _unwrap_linear(mod)
    return isinstance(base, nn.Linear) or _is_conv1d(base)


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _unwrap_linear(mod: nn.Module) -> nn.Module:
    """PEFT wraps a target in a module holding the original as ``base_layer``."""
    while hasattr(mod, "base_layer") and isinstance(mod.base_layer, nn.Module):
        mod = mod.base_layer
    return mod


def _classify(relpath: str) -> str | None:
    parts = relpath.lower().split(".")
    leaf, parents = parts[-1], parts[:-1]
    if leaf in _LEAF_ROLES:
        return _LEAF_ROLES[leaf]
    if leaf in _CONTEXT_ROLES:
        in_attn = any(w in p for p in parents for w in _ATTN_WORDS)
        in_mlp = any(
            p == w or p.startswith(w + "_") or p.endswith("_" + w) for p in parents for w in _MLP_WORDS
        )
        attn_role, mlp_role = _CONTEXT_ROLES[leaf]
        if in_attn and not in_mlp:
            return attn_role
        if in_mlp and not in_attn:
            return mlp_role
    return None


def _generic_roles(layer: nn.Module) -> dict[str, RoleSpec]:
    found: dict[str, list[str]] = {}
    mixers = [path for path, mod in layer.named_modules() if _is_ssm_mixer(mod)]
    for path, mod in layer.named_modules():
        if not path or "base_layer" in path.split(".") or not _is_linear(mod):
            continue
        if any(not m or path.startswith(m + ".") for m in mixers):
            continue
        role = _classify(path)
        if role is not None:
            found.setdefault(role, []).append(path)
    # A role matched by several modules (e.g. MoE experts) is ambiguous: leave it out rather than guess.
    roles = {role: role_spec(paths[0], role) for role, paths in found.items() if len(paths) == 1}
    covered = [r for spec in roles.values() for r in spec[1]]
    if len(covered) != len(set(covered)):  # e.g. both qkv and q found: keep the separate ones
        for fused, parts in FUSED_ROLES.items():
            if fused in roles and any(p in roles for p in parts):
                del roles[fused]
    return roles


def _ordered(roles: Mapping[str, RoleSpec]) -> dict[str, RoleSpec]:
    return dict(sorted(roles.items(), key=lambda kv: role_order(kv[0])))


# The generic search reads every module of every layer list; layouts are asked for on hot paths (the lens
# asks per layer and batch), so one found is kept per model while its modules are the same.
_GENERIC: weakref.WeakKeyDictionary[nn.Module, tuple[int, ArchLayout | None]] = weakref.WeakKeyDictionary()


def _generic_layout(root: nn.Module) -> ArchLayout | None:
    stamp = sum(1 for _ in root.modules())
    kept = _GENERIC.get(root)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    layout = _search_generic_layout(root)
    _GENERIC[root] = (stamp, layout)
    return layout


def _search_generic_layout(root: nn.Module) -> ArchLayout | None:
    best: tuple[tuple[bool, int, int], str, list[dict[str, RoleSpec]]] | None = None
    for path, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        repeats = Counter(type(c).__name__ for c in mod).most_common(1)[0][1]
        # Every layer's own: a hybrid's first layer may be a linear-attention or state-space one, and a
        # model's first layers dense where the rest are MoE.
        per_layer = [_generic_roles(layer) for layer in mod]
        if not any(per_layer):
            continue
        # A vision or audio tower can have more layers than the text decoder; rank those last.
        text = not any(w in path.lower() for w in ("vision", "visual", "audio", "image", "encoder"))
        score = (text, repeats, sum(p.numel() for p in mod.parameters()))
        if best is None or score > best[0]:
            best = (score, path, per_layer)
    if best is None:
        return None
    _, layers_path, per_layer = best
    embed = _generic_embed(root)
    head = _generic_head(root, layers_path)
    if embed is None or head is None:
        return None
    roles: dict[str, RoleSpec] = {}
    for layer in per_layer:
        for role, spec in layer.items():
            roles.setdefault(role, spec)
    same = all(layer == per_layer[0] for layer in per_layer)
    unmapped: dict[str, None] = {}
    for layer, layer_roles in zip(get_module(root, layers_path), per_layer, strict=True):
        named = [spec[0] for spec in layer_roles.values()]
        owners = [name.rpartition(".")[0] for name, p in layer.named_parameters() if p.ndim >= 2]
        left = (o for o in owners if not any(o == n or o.startswith(n + ".") for n in named))
        unmapped |= dict.fromkeys(left)
    return ArchLayout(
        family="generic",
        embed_path=embed,
        layers_path=layers_path,
        final_norm_path=_generic_norm(root, layers_path, head),
        lm_head_path=head,
        roles=_ordered(roles),
        unmapped=tuple(unmapped),
        layer_roles=None if same else tuple(_ordered(layer) for layer in per_layer),
    )


def _path_of(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((p for p, m in root.named_modules() if m is target), None)


def _generic_embed(root: nn.Module) -> str | None:
    get = getattr(root, "get_input_embeddings", None)
    with contextlib.suppress(Exception):
        path = _path_of(root, get() if callable(get) else None)
        if path is not None:
            return path
    embeds = [(m.num_embeddings, p) for p, m in root.named_modules() if isinstance(m, nn.Embedding)]
    return max(embeds)[1] if embeds else None


def _generic_head(root: nn.Module, layers_path: str) -> str | None:
    get = getattr(root, "get_output_embeddings", None)
    with contextlib.suppress(Exception):
        path = _path_of(root, get() if callable(get) else None)
        if path is not None:
            return path
    heads = [
        p
        for p, m in root.named_modules()
        if isinstance(m, nn.Linear)
        and not p.startswith(layers_path + ".")
        and p.split(".")[-1] in _HEAD_NAMES
    ]
    return heads[-1] if heads else None


_HEAD_NAMES = ("lm_head", "embed_out", "head", "output", "unembed")


_NORM_NAMES = ("norm", "final_norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


def _generic_norm(root: nn.Module, layers_path: str, head_path: str | None = None) -> str | None:
    """The final norm: a module named like a norm beside the layer list (``model.norm``, ``ln_f``...) whose
    weight is as wide as the LM head's input (Gemma 3n and 4 keep narrower per-layer-input norms there
    too), by its usual name where several are, else the last."""
    parent = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent_mod = _try_module(root, parent)
    if parent_mod is None:
        return None
    head = _try_module(root, head_path) if head_path else None
    width = getattr(head, "in_features", None)
    names = []
    for n, mod in parent_mod.named_children():
        if not ("norm" in n.lower() or n.lower().startswith("ln")):
            continue
        weight = getattr(mod, "weight", None)
        if isinstance(width, int) and isinstance(weight, torch.Tensor) and weight.numel() != width:
            continue
        names.append(n)
    if not names:
        return None
    name = next((n for n in names if n.lower() in _NORM_NAMES), names[-1])
    return f"{parent}.{name}" if parent else name


# ---------------------------------------------------------------------------------------------------------
# Parts of a model
# ---------------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order.

    Layer ``i``'s output (its forward return value, a tensor; :func:`hidden_of` takes it out of a tuple
    for architectures that return one) is the residual stream after layer ``i``, *before* the final norm.
    With ``output_hidden_states=True`` transformers returns ``hidden_states[i + 1]`` equal to that output
    for ``i < L - 1``, but ``hidden_states[L]`` (the last) is *after* the final norm. So the logits are
    ``logits_from_hidden(model, output of layer L - 1)``, which is ``lm_head(final_norm(h))`` for every
    family here except those with logit soft-capping (Gemma 2/3 when configured). ``hidden_states[0]`` is
    layer 0's input: the token embeddings after any scaling (Gemma) or position embeddings (GPT-2), so not
    always the raw output of :func:`input_embeddings`.
    """
    layout = layout_for(model)
    layers = get_module(model, layout.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise LayercardError(f"{layout.layers_path}: expected nn.ModuleList, found {type(layers).__name__}")
    return layers


def num_layers(model: nn.Module) -> int:
    """The number of decoder layers."""
    return len(decoder_layers(model))


def context_length(model: nn.Module) -> tuple[str, int] | None:
    """The most positions the model reads, with the config field that says so (a learned position table
    has no row past it), or None where the config gives none."""
    config = getattr(base_model(model), "config", None)
    for name in ("n_positions", "max_position_embeddings", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def past_context(model: nn.Module, longest: int) -> str | None:
    """Where ``longest`` positions are more than the model reads: "the model reads at most N positions
    (FIELD in its config)", to start a message with; else None (also where the config says nothing)."""
    context = context_length(model)
    if context is None or longest <= context[1]:
        return None
    return f"the model reads at most {context[1]} positions ({context[0]} in its config)"


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream (the LM head's input)."""
    # The config's value holds under sharding too, where a weight may be a flattened shard.
    size = getattr(getattr(base_model(model), "config", None), "hidden_size", None)
    return int(size) if size else int(lm_head(model).in_features)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer, or None when the architecture has none."""
    path = layout_for(model).final_norm_path
    return None if path is None else get_module(model, path)


def weights_dtype(model: nn.Module) -> str:
    """The dtype a model's weights are held in, by name (``float32``), as artifacts record it."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def running_on(model: nn.Module) -> dict[str, str]:
    """The dtype and device type a model computes in, as artifacts' provenance records them: figures
    measured at another precision or on another device are not comparable."""
    return {"dtype": weights_dtype(model), "device": next(model.parameters()).device.type}


def tied_modules(model: nn.Module) -> set[str]:
    """Names of the modules whose weight is one tensor with another module's (an lm_head tied to the
    token embeddings): a change merged into one changes the other too."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection from the residual stream to vocabulary logits."""
    return get_module(model, layout_for(model).lm_head_path)


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding module."""
    return get_module(model, layout_for(model).embed_path)


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's forward output (a tensor, or a tuple starting with it)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LayercardError(f"decoder layer output: expected a tensor or tuple, found {type(output).__name__}")


# model types whose ``logits_scaling`` multiplies the logits (Granite's and MiniCPM3's divides them)
_LOGITS_SCALING_MULTIPLIES = ("hyperclovax",)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits the model would produce if ``hidden`` (pre-final-norm residual stream) left the last layer.

    Applies the final norm, the LM head, and the output scaling the config asks for: multipliers
    (Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``), ``logits_scaling`` (a divisor for
    Granite and MiniCPM3, a multiplier for HyperCLOVA X) and soft-capping (Gemma's
    ``final_logit_softcapping``, RecurrentGemma's ``logits_soft_cap``). ``trace`` checks the result
    against the model's own output, since another architecture may scale in a way of its own.
    """
    norm = final_norm(model)
    h = norm(hidden) if norm is not None else hidden
    logits = lm_head(model)(h)
    config = getattr(base_model(model), "config", None)
    for name in ("logit_scale", "lm_head_multiplier"):
        scale = _number(getattr(config, name, None))
        if scale is not None and scale != 1:
            logits = logits * scale
    scaling = _number(getattr(config, "logits_scaling", None))
    if scaling is not None and scaling not in (0, 1):
        multiplies = str(getattr(config, "model_type", "")).startswith(_LOGITS_SCALING_MULTIPLIES)
        logits = logits * scaling if multiplies else logits / scaling
    cap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def linear_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The frozen weight of the linear module at ``name``, beneath any PEFT wrapper.

    ``d_out × d_in`` for ``nn.Linear``, ``d_in × d_out`` for GPT-2's Conv1D (its own layout); statistics of
    the matrix that do not depend on its orientation, such as its singular values, may use either.
    """
    return _unwrap_linear(get_module(model, name)).weight


def _shape(mod: nn.Module) -> tuple[int, int, str]:
    base = _unwrap_linear(mod)
    if _is_conv1d(base):
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out), "conv1d"
    if isinstance(base, nn.Linear):
        return int(base.in_features), int(base.out_features), "linear"
    raise LayercardError(f"module {type(base).__name__}: not nn.Linear or Conv1D")


def units(
    model: nn.Module, roles: str | Sequence[str] = "q,v", layers: Sequence[int] | None = None
) -> list[UnitSpec]:
    """Units for ``roles`` in ``layers`` (all when None), sorted by (layer, canonical role order).

    A fused module is included once if it covers any requested role. A role named explicitly that the
    model lacks is an error; role sets ('attention', 'mlp', 'all-linear') take what the model has.
    """
    wanted = parse_roles(roles)
    explicit = explicit_roles(roles)
    layout = layout_for(model)
    available = {r for spec in layout.roles.values() for r in spec[1]}
    missing = [r for r in wanted if r in explicit and r not in available]
    if missing:
        have = ",".join(r for r in CANONICAL_ROLES if r in available)
        raise LayercardError(
            f"roles: model {layout.family!r} ({model_type(model)}) has no module for role "
            f"{','.join(missing)}; it has {have}"
        )
    if not any(set(spec[1]) & set(wanted) for spec in layout.roles.values()):
        raise LayercardError(f"roles {roles!r}: none of {','.join(wanted)} exist in model {layout.family!r}")
    blocks = decoder_layers(model)
    n = len(blocks)
    idx = list(range(n)) if layers is None else [int(i) for i in layers]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise LayercardError(f"layers: {bad} out of range; the model has layers 0..{n - 1}")
    out: list[UnitSpec] = []
    for i in sorted(set(idx)):
        # a layer lacking a role (a hybrid's linear-attention layer has no q) has no unit for it
        chosen = [(name, spec) for name, spec in layout.roles_of(i).items() if set(spec[1]) & set(wanted)]
        for role, (rel, covers, group) in chosen:
            name = f"{layout.layers_path}.{i}.{rel}"
            mod = _try_module(blocks[i], rel)
            if mod is None:
                raise LayercardError(f"layer {i}: no module {name!r} for role {role!r}")
            d_in, d_out, kind = _shape(mod)
            out.append(UnitSpec(i, role, covers, name, d_in, d_out, group, kind))
    return out


def peft_target_names(units: Sequence[UnitSpec]) -> list[str]:
    """Full module paths for PEFT ``target_modules`` / ``rank_pattern`` (exact-match keys)."""
    return list(dict.fromkeys(u.name for u in units))


def weights_hash(model: nn.Module) -> str:
    """sha256 over state-dict names, shapes, dtypes and bytes (reads every weight; fine for small models)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()
