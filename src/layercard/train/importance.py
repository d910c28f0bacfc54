"""LoRA-drop importance: how much each decoder layer's trained LoRA moves what flows through it (§7).

For a model carrying a trained PEFT LoRA adapter, a few no-grad batches of task examples measure, per
decoder layer, the mean over token positions (padding excluded) of ‖Δh‖², where Δh = B·A·x·scaling is the
output of one adapted module's LoRA branch, summed over the layer's adapted modules. The layers' values are
normalised to sum to 1 (which also cancels the position count). A layer whose adapter barely changes its
outputs matters little: :func:`select_layers` keeps the k most important layers and
:func:`layers_by_coverage` the fewest layers that hold a given share of the total.

The branch outputs are read by forward hooks on each LoRA B module; the hooks exist only inside
:func:`_branch_hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layercard.errors import LayercardError
from layercard.inference import as_float64, device_of, eval_mode, pad_id
from layercard.progress import track
from layercard.tasks import Example, Task, batches, encode_task

__all__ = ["layer_importance", "layers_by_coverage", "select_layers"]


@dataclass
class _State:
    """The current batch's padding mask and the running sums of squared branch outputs per layer."""

    mask: torch.Tensor | None = None
    sums: dict[int, torch.Tensor] = field(default_factory=dict)


def _lora_branches(model: nn.Module) -> list[tuple[int, str, nn.Module, str]]:
    """(layer, path within the layer, LoRA module, adapter name) of every active plain LoRA branch."""
    from peft.tuners.lora import LoraLayer, layer

    from layercard.models import decoder_layers

    # LoRA on raw parameters adds its delta to the weight, never calling lora_B: no branch output to hook
    raw = getattr(layer, "ParamWrapper", ())

    out: list[tuple[int, str, nn.Module, str]] = []
    for i, block in enumerate(decoder_layers(model)):
        for name, mod in block.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            if raw and isinstance(mod, raw):
                raise LayercardError(
                    f"layer {i} {name}: LoRA on raw parameters (target_parameters); importance is defined "
                    "for LoRA on linear modules"
                )
            if getattr(mod, "disable_adapters", False):  # PEFT's disable_adapter(), or a trim mask
                raise LayercardError(
                    f"layer {i} {name}: the adapter is disabled; importance needs the adapters on"
                )
            if getattr(mod, "merged", False):
                raise LayercardError(
                    f"layer {i} {name}: the adapter is merged into the weights; importance needs an "
                    "unmerged adapter"
                )
            for adapter in mod.active_adapters:
                if adapter not in mod.lora_B:
                    continue
                if adapter in getattr(mod, "lora_variant", {}):
                    # DoRA and the other variants do not add B(A(x))·scaling, so B's output is not Δh.
                    raise LayercardError(
                        f"layer {i} {name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); "
                        "importance is defined for plain LoRA"
                    )
                out.append((i, name, mod, adapter))
    return out


@contextlib.contextmanager
def _branch_hooks(model: nn.Module, state: _State) -> Iterator[list[int]]:
    """Hooks adding each LoRA branch's ‖B·A·x·scaling‖² at unpadded positions to its layer's sum.

    Yields the adapted layers; the hooks are removed on exit, whatever happens inside.
    """
    branches = _lora_branches(model)
    if not branches:
        raise LayercardError("layer importance: the model carries no LoRA adapter in its decoder layers")
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make(layer: int, mod: nn.Module, adapter: str):
        def hook(_b: nn.Module, _args: Any, out: torch.Tensor) -> None:
            scale = float(mod.scaling[adapter])
            sq = as_float64(out.detach()).pow(2).sum(-1) * (scale * scale)
            mask = state.mask
            if mask is not None and sq.shape == mask.shape:
                sq = sq * mask
            state.sums[layer] = state.sums.get(layer, 0.0) + sq.sum()

        return hook

    try:
        for layer, _name, mod, adapter in branches:
            state.sums.setdefault(layer, torch.zeros((), dtype=torch.float64))
            handles.append(mod.lora_B[adapter].register_forward_hook(make(layer, mod, adapter)))
        yield sorted(state.sums)
    finally:
        for h in handles:
            h.remove()


def layer_importance(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool | None = None,
) -> dict[int, float]:
    """Per adapted decoder layer, its share of the LoRA branches' squared output norm (sums to 1).

    ``model`` carries a trained, unmerged PEFT LoRA adapter; ``examples`` (of ``task``) are encoded as
    training encodes them and run in no-grad batches of ``batch_size`` in eval mode (no dropout).
    """
    if not examples:
        raise LayercardError(f"task {task.name!r}: no examples to measure layer importance on")
    sub = dataclasses.replace(task, examples=tuple(examples))
    encoded = encode_task(tokenizer, sub, max_length=max_length)
    groups = list(batches(encoded, batch_size, pad_id(tokenizer), sort_by_length=True))
    device = device_of(model)
    state = _State()
    with eval_mode(model), _branch_hooks(model, state) as layers:
        for batch in track(groups, "lora-drop importance", total=len(groups), enabled=progress):
            mask = batch["attention_mask"].to(device)
            state.mask = as_float64(mask)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
        state.mask = None
    sums = {layer: float(state.sums[layer]) for layer in layers}
    total = sum(sums.values())
    if not math.isfinite(total):
        raise LayercardError("layer importance: a LoRA branch output is NaN or infinite")
    if total <= 0:
        raise LayercardError(
            "layer importance: every LoRA branch output is zero (an untrained adapter, with B still 0?)"
        )
    return {layer: v / total for layer, v in sums.items()}


def _checked(importance: Mapping[int, float]) -> dict[int, float]:
    if not importance:
        raise LayercardError("importance: no layers given")
    bad = next((k for k, v in importance.items() if not (math.isfinite(v) and v >= 0)), None)
    if bad is not None:
        raise LayercardError(
            f"importance of layer {bad}: must be a finite number >= 0, got {importance[bad]}"
        )
    return {int(k): float(v) for k, v in importance.items()}


def _by_importance(importance: Mapping[int, float]) -> list[int]:
    """Layers from the most important down (ties: the lower layer first, so results are deterministic)."""
    return sorted(importance, key=lambda layer: (-importance[layer], layer))


def select_layers(importance: Mapping[int, float], k: int) -> list[int]:
    """The ``k`` most important layers, ascending."""
    imp = _checked(importance)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(imp):
        raise LayercardError(f"select_layers: k must be an integer in 1..{len(imp)}, got {k!r}")
    return sorted(_by_importance(imp)[:k])


def layers_by_coverage(importance: Mapping[int, float], share: float) -> list[int]:
    """The fewest layers whose importance reaches ``share`` (0 < share ≤ 1) of the total, ascending.

    This is LoRA-drop's rule: keep the most important layers until they hold that share.
    """
    imp = _checked(importance)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise LayercardError(f"layers_by_coverage: share must be in (0, 1], got {share!r}")
    total = sum(imp.values())
    if total <= 0:
        raise LayercardError("layers_by_coverage: every layer's importance is zero")
    chosen: list[int] = []
    held = 0.0
    for layer in _by_importance(imp):
        chosen.append(layer)
        held += imp[layer]
        # A relative tolerance so that share=1 is reached despite rounding in the sum.
        if held >= share * total * (1 - 1e-12):
            break
    return sorted(chosen)
