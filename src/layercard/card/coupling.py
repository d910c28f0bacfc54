"""Coupling between layers: cosines of their updates' effects on the final hidden state (docs/design.md §4).

For each layer ℓ the update direction Δ_ℓ adds, at every unit of the chosen roles in ℓ, the unit's
first Adam step (or its capacity direction). Its effect e_ℓ = d h_final / dε is taken by a one-sided
finite difference over target positions of a small coupling probe; C is the cosine matrix of the e_ℓ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from layercard.card.probe import eval_mode
from layercard.inference import as_float64
from layercard.models import get_module, lm_head
from layercard.tasks.loss import target_mask


@contextlib.contextmanager
def perturb(model: nn.Module, deltas: Mapping[str, torch.Tensor], eps: float) -> Iterator[None]:
    """Add ε·x ΔWᵀ to the outputs of the named modules (ΔW in logical d_out × d_in orientation)."""
    handles = []

    def make(dw: torch.Tensor):
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            return out + eps * (x @ dw.to(x.dtype).T)

        return hook

    try:
        for name, dw in deltas.items():
            handles.append(get_module(model, name).register_forward_hook(make(dw)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Raised from the LM head's pre-hook: the logits are not needed, only the head's input."""


@contextlib.contextmanager
def capture_final_hidden(model: nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    """Record the final hidden state (the LM head's input) and skip the LM head itself."""

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        store.append(inputs[0].detach())
        raise _Stop

    h = lm_head(model).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _final_hidden(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    device = next(model.parameters()).device
    parts: list[torch.Tensor] = []
    for batch in batches:
        store: list[torch.Tensor] = []
        with capture_final_hidden(model, store):
            try:
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
            except _Stop:
                pass
        h = store[0]
        labels = batch["labels"].to(device)
        # Positions that predict a target token: label at t+1 is not masked.
        pos = torch.zeros_like(labels, dtype=torch.bool)
        pos[:, :-1] = target_mask(labels)
        parts.append(as_float64(h[pos]).reshape(-1))
    return torch.cat(parts)


@torch.no_grad()
def layer_effects(
    model: nn.Module,
    directions: Mapping[int, Mapping[str, torch.Tensor]],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    rel_step: float = 1e-3,
    progress=None,
) -> tuple[list[int], np.ndarray]:
    """Effects e_ℓ (rows) of each layer's update direction on the final hidden state."""
    layers = sorted(directions)
    rows = []
    # Eval mode as the probe pass runs: with dropout on, each forward would draw its own mask and the
    # differences below would measure the masks, not the directions.
    with eval_mode(model):
        # One shared unperturbed pass: a one-sided difference halves the forwards of a central one, and
        # with ‖εΔ‖ = 0.1% of ‖W‖ its O(ε) error is far below what changes a cosine.
        h0 = _final_hidden(model, batches)
        it = progress(layers) if progress is not None else layers
        for layer in it:
            deltas = directions[layer]
            wnorm = 0.0
            dnorm = 0.0
            for name, dw in deltas.items():
                wnorm += float(as_float64(get_module(model, name).weight.detach()).norm() ** 2)
                dnorm += float(as_float64(dw).norm() ** 2)
            if dnorm == 0.0:
                rows.append(None)
                continue
            eps = rel_step * (wnorm**0.5) / (dnorm**0.5)
            with perturb(model, deltas, eps):
                hp = _final_hidden(model, batches)
            rows.append(((hp - h0) / eps).cpu().numpy())
    width = next((r.shape[0] for r in rows if r is not None), 0)
    mat = np.stack([r if r is not None else np.zeros(width) for r in rows]) if rows else np.zeros((0, 0))
    return layers, mat
