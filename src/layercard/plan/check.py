"""Checks of a plan against a model: the model is the card's, and PEFT adapts exactly what was planned."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

from layercard.errors import LayercardError, expect, message_line
from layercard.plan.artifact import Plan


def check_model_matches(plan: Plan, loaded: Any, *, where: str = "plan") -> None:
    """Refuse a model other than the one the plan's card measured (compared by weight hash)."""
    want, got = plan.card.get("model_hash"), getattr(loaded, "model_hash", None)
    if want != got:
        raise LayercardError(
            f"{where} is for model {plan.card.get('model_id')} ({str(want)[:12]}), but the loaded model is "
            f"{getattr(loaded, 'model_id', '?')} ({str(got)[:12]}); run card and plan for this model"
        )


def check_plan(plan: Plan, model: Any) -> dict[str, Any]:
    """Apply the plan's LoraConfig with PEFT and verify exactly the planned modules get the planned ranks.

    The model is restored afterwards (LoRA unloaded, ``requires_grad`` as before). Any mismatch raises.
    """
    from torch import nn

    from layercard.models import LoadedModel, decoder_layers, get_module

    expect("check_plan", "plan", plan, Plan, "read plan.json with Plan.load")
    expect("check_plan", "model", model, (LoadedModel, nn.Module), "load it with layercard.load_model")
    if isinstance(model, LoadedModel):  # what every other function of the API takes
        model = model.model
    if hasattr(model, "peft_config"):
        raise LayercardError("plan check: the model already carries PEFT adapters; pass the base model")
    if plan.kind != "lora":
        n = len(decoder_layers(model))
        bad = [layer for layer in plan.layers if not 0 <= layer < n]
        if bad:
            raise LayercardError(f"plan check: layers {bad} do not exist; the model has layers 0..{n - 1}")
        names = [u.name for u in plan.units]
        for name in names:
            get_module(model, name)
        return {"matched": names, "ok": True}

    from peft import get_peft_model

    for u in plan.units:  # a clear error before PEFT's own
        mod = get_module(model, u.name)
        if not isinstance(mod, nn.Module):
            raise LayercardError(f"plan check: {u.name} is not a module")
    from layercard.adapters import kept_torch_rng, undone_on_failure

    cfg = plan.peft_config()
    requires = [p.requires_grad for p in model.parameters()]
    # a failed injection may have left LoRA layers behind: undone_on_failure takes them off
    with warnings.catch_warnings(), kept_torch_rng(model), undone_on_failure(model):
        # PEFT warns on unmatched pattern keys; we check them below and raise instead.
        warnings.simplefilter("ignore")
        try:
            peft_model = get_peft_model(model, cfg)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise LayercardError(
                f"plan check: PEFT refused the plan's LoraConfig ({message_line(e)})"
            ) from None
    try:
        return {"matched": check_lora_model(plan, peft_model), "ok": True}
    finally:
        peft_model.unload()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


def check_lora_model(plan: Plan, peft_model: Any) -> list[str]:
    """Verify a PEFT model built from ``plan.peft_config()``: exactly the planned modules are adapted,
    every pattern key hits only its own module, and each module has the planned rank and scale.

    Returns the adapted module names, sorted. Used by :func:`check_plan` and by train on its own model.
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model  # PEFT's module names (current_key) are relative to this
    wrapped = sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer))
    planned = sorted(u.name for u in plan.units)
    if wrapped != planned:
        missing = sorted(set(planned) - set(wrapped))
        extra = sorted(set(wrapped) - set(planned))
        parts = ([f"not adapted: {_names(missing)}"] if missing else []) + (
            [f"adapted but not planned: {_names(extra)}"] if extra else []
        )
        raise LayercardError(
            f"plan check: PEFT adapted {len(wrapped)} modules, the plan lists {len(planned)} "
            f"({'; '.join(parts)})"
        )
    lc = plan.lora_config or {}
    for attr in ("rank_pattern", "alpha_pattern"):
        for key in lc.get(attr) or {}:
            hits = _pattern_hits(key, wrapped)
            if hits != [key]:
                raise LayercardError(
                    f"plan check: {attr} key {key!r} matches {len(hits)} adapted modules "
                    f"{hits[:3]}; it must match exactly itself"
                )
    for u in plan.units:
        mod = inner.get_submodule(u.name)
        got = int(mod.lora_A["default"].out_features)
        if got != u.rank:
            raise LayercardError(f"plan check: {u.name} got LoRA rank {got}, the plan says {u.rank}")
        alpha = float((lc.get("alpha_pattern") or {}).get(u.name, lc.get("lora_alpha")))
        want_scale = alpha / u.rank
        if not math.isclose(float(mod.scaling["default"]), want_scale, rel_tol=1e-6):
            raise LayercardError(
                f"plan check: {u.name} got LoRA scale {mod.scaling['default']}, the plan implies {want_scale}"
            )
    return wrapped


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (", …" if len(names) > 4 else "")


def _pattern_hits(key: str, names: Sequence[str]) -> list[str]:
    # PEFT 0.21's own rule (peft.utils.other.get_pattern_key and the unmatched-pattern warning).
    return [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
