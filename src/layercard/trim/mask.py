"""Which modules are adapters and in which decoder layer; switching them off per layer (docs/design.md §8).

PEFT tuner layers (every ``BaseTunerLayer`` inside decoder layer ``ℓ > K``) get their
``_disable_adapters`` flag set for the block, which is the flag PEFT's own ``disable_adapter()`` sets;
their forward then returns ``base_layer(x)`` exactly, without computing the LoRA branch, which is bit for
bit what a model without that LoRA module computes. (``enable_adapters()`` is not used because it also
flips ``requires_grad``.) Layercard bottleneck adapters use
:meth:`layercard.adapters.AdapterSet.set_enabled_layers`. A merged adapter is refused: disabling it would
unmerge the weights.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from layercard.errors import LayercardError

__all__ = ["adapted_layers", "adapted_modules", "adapters_off", "masked_layers"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model PEFT wraps (module names then match PEFT's target names); other models unchanged."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def _layers_path(model: nn.Module) -> str:
    from layercard.models import layout_for

    return layout_for(model).layers_path


def _layer_of(name: str, layers_path: str) -> int | None:
    """Decoder layer index of a module path relative to the base model, or None outside the layers."""
    m = re.match(rf"{re.escape(layers_path)}\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def _tuner_layers(model: nn.Module) -> list[tuple[str, int | None, nn.Module]]:
    """Every PEFT tuner layer (LoRA wrapper) of ``model``: (path relative to the base, layer, module)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    layers_path = _layers_path(model)
    return [
        (name, _layer_of(name, layers_path), mod)
        for name, mod in _unwrap(model).named_modules()
        if isinstance(mod, BaseTunerLayer)
    ]


def _bottleneck(model: nn.Module) -> Any:
    from layercard.adapters import attached_adapters

    return attached_adapters(model)


def adapted_layers(model: nn.Module) -> tuple[int, ...]:
    """Decoder layers that carry an adapter (PEFT tuner layers or layercard bottleneck adapters)."""
    found = {layer for _, layer, _ in _tuner_layers(model) if layer is not None}
    aset = _bottleneck(model)
    if aset is not None:
        found.update(aset.layers)
    return tuple(sorted(found))


def adapted_modules(model: nn.Module, keep_upto: int | None = None) -> list[str]:
    """Adapted modules that run at inference when layers ``> keep_upto`` are trimmed (None: all).

    LoRA: the path of each wrapped linear module; bottleneck adapters: ``<sublayer path>:<kind>`` (one
    per attention and MLP sublayer). Modules outside the decoder layers always count.
    """
    from layercard.adapters import sublayer_paths

    out = [
        name
        for name, layer, _ in _tuner_layers(model)
        if layer is None or keep_upto is None or layer <= keep_upto
    ]
    aset = _bottleneck(model)
    if aset is not None:
        for i in aset.layers:
            if keep_upto is None or i <= keep_upto:
                out += [f"{p}:{aset.kind}" for p in sublayer_paths(model, i)]
    return out


@contextlib.contextmanager
def _tuners_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Set PEFT's per-module ``_disable_adapters`` flag on ``modules`` for the block, then restore it."""
    saved: list[tuple[nn.Module, bool]] = []
    try:
        for mod in modules:
            if getattr(mod, "merged", False):
                raise LayercardError(
                    "adapter is merged into the weights; masking layers needs an unmerged adapter"
                )
            saved.append((mod, bool(mod._disable_adapters)))
            mod._disable_adapters = True
        yield
    finally:
        for mod, flag in reversed(saved):
            mod._disable_adapters = flag


@contextlib.contextmanager
def masked_layers(model: nn.Module, keep_upto: int) -> Iterator[tuple[int, ...]]:
    """Switch off the adapters of decoder layers ``> keep_upto`` for the block; yields the layers kept.

    No copy of the model: PEFT tuner layers get their ``_disable_adapters`` flag (their forward is then
    exactly ``base_layer(x)``), bottleneck adapters are narrowed with ``set_enabled_layers``. Everything is
    restored on exit. ``keep_upto=-1`` switches off every layer's adapter.
    """
    from layercard.models import num_layers

    n = num_layers(model)
    if not _is_int(keep_upto) or not -1 <= keep_upto < n:
        raise LayercardError(f"keep_upto={keep_upto!r}: must be an integer in -1..{n - 1}")
    tuners = _tuner_layers(model)
    aset = _bottleneck(model)
    if not any(layer is not None for _, layer, _ in tuners) and aset is None:
        raise LayercardError("model has no adapters in its decoder layers (neither PEFT nor layercard)")
    drop = [mod for _, layer, mod in tuners if layer is not None and layer > keep_upto]
    before = aset.enabled_layers if aset is not None else ()
    with _tuners_disabled(drop):
        try:
            if aset is not None:
                aset.set_enabled_layers([i for i in before if i <= keep_upto])
            yield tuple(i for i in adapted_layers(model) if i <= keep_upto)
        finally:
            if aset is not None:
                aset.set_enabled_layers(before)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Every adapter of ``model`` off for the block (decoder layers or not): the base model's outputs."""
    aset = _bottleneck(model)
    was = aset.enabled if aset is not None else None
    with _tuners_disabled(mod for _, _, mod in _tuner_layers(model)):
        try:
            if aset is not None:
                aset.enabled = False
            yield
        finally:
            if aset is not None:
                aset.enabled = was
