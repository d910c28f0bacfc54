"""Architecture layouts, units, model loading and caching.

This package is the only place that knows where each architecture keeps its decoder layers, final norm,
LM head and linear modules; everything else asks for :class:`UnitSpec` objects and module paths
(docs/design.md §2, §10). Modules: :mod:`~layercard.models.roles` (role names and specs),
:mod:`~layercard.models.layouts` (family tables, generic fallback, units, module accessors) and
:mod:`~layercard.models.loading` (built-ins, GGUF conversion cache, devices, ``load_model``).
"""

from __future__ import annotations

from layercard.models.layouts import (
    ArchLayout,
    UnitSpec,
    activation_checkpointing,
    base_model,
    context_length,
    decoder_layers,
    final_norm,
    get_module,
    hidden_of,
    hidden_size,
    input_embeddings,
    input_gradients_on,
    layout_for,
    linear_weight,
    lm_head,
    logits_from_hidden,
    model_type,
    num_layers,
    past_context,
    peft_target_names,
    running_on,
    tied_modules,
    units,
    weights_dtype,
    weights_hash,
)
from layercard.models.loading import (
    BUILTIN_MODELS,
    LoadedModel,
    builtin_path,
    cache_dir,
    config_folder_hash,
    config_num_layers,
    list_models,
    load_model,
    resolve_device,
    tokenizer_folder_hash,
    weights_folder_hash,
)
from layercard.models.roles import CANONICAL_ROLES, FUSED_ROLES, ROLE_SETS, explicit_roles, parse_roles

# Old private names still used outside the package; callers are moving to the public names.
_base = base_model
_folder_hash = weights_folder_hash

__all__ = [
    "ArchLayout",
    "BUILTIN_MODELS",
    "CANONICAL_ROLES",
    "FUSED_ROLES",
    "LoadedModel",
    "ROLE_SETS",
    "UnitSpec",
    "activation_checkpointing",
    "base_model",
    "builtin_path",
    "cache_dir",
    "config_num_layers",
    "context_length",
    "decoder_layers",
    "final_norm",
    "get_module",
    "hidden_of",
    "hidden_size",
    "input_embeddings",
    "input_gradients_on",
    "layout_for",
    "linear_weight",
    "list_models",
    "lm_head",
    "load_model",
    "logits_from_hidden",
    "model_type",
    "num_layers",
    "past_context",
    "explicit_roles",
    "parse_roles",
    "peft_target_names",
    "resolve_device",
    "units",
    "tied_modules",
    "tokenizer_folder_hash",
    "config_folder_hash",
    "running_on",
    "weights_dtype",
    "weights_folder_hash",
    "weights_hash",
]
