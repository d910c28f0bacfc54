"""The training loss in one place: next-token cross-entropy summed over target tokens only.

Prompt and padding positions carry :data:`IGNORE_INDEX` in the labels. The card, the cost calibration,
training, evaluation and trimming all measure this same quantity.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens (labels ≠ IGNORE_INDEX) and their count."""
    shift_logits = _float32(logits[:, :-1, :])
    shift_labels = labels[:, 1:]
    n_tok = target_count(labels)
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, n_tok


def _float32(logits: torch.Tensor) -> torch.Tensor:
    # Half-precision logits lose the small probabilities the cross-entropy sums over.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def logits_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the positions whose logits :func:`loss_sum` reads (next token a target)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target_mask(labels)
    return keep


def _unwrap(model: nn.Module) -> nn.Module:
    # Wrappers (PEFT, distributed data parallel) hold the causal LM whose forward takes the keyword.
    for _ in range(8):
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    return model


def keeps_target_logits(model: nn.Module) -> bool:
    """Whether ``model``'s forward can compute the LM head at a mask of positions (transformers'
    ``logits_to_keep``, read through its shared slicing helper, which takes a boolean mask)."""
    forward = inspect.unwrap(type(_unwrap(model)).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "slice_logits_to_keep" in code.co_names


def _target_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits (float32, one row per target token, in row-major order), their targets and the
    (batch, length − 1) mask of the positions they were read at."""
    kwargs.setdefault("use_cache", False)
    mask = target_mask(labels)
    if keeps_target_logits(model):
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_mask(labels), **kwargs
        )
        logits = _float32(out.logits).reshape(-1, out.logits.shape[-1])
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = _float32(out.logits)[:, :-1][mask]
    return logits, labels[:, 1:][mask], mask


def forward_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """``model``'s summed target cross-entropy on one batch and the target count, as :func:`loss_sum`.

    Where the model supports it (:func:`keeps_target_logits`), the LM head runs only at the positions the
    loss reads: with the prompt masked, most positions predict nothing the loss counts, and a head over a
    large vocabulary is a sizeable part of a small model's step and memory (docs/design.md §5). The sum is
    the same either way; other models compute every position's logits.
    """
    logits, targets, _ = _target_logits(model, input_ids, attention_mask, labels, **kwargs)
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, int(targets.numel())


def forward_row_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed target cross-entropy (float32, shape (batch,)) and its target count, the same
    quantity as :func:`forward_loss` split by example; for measurements, not for gradients."""
    logits, targets, mask = _target_logits(model, input_ids, attention_mask, labels, **kwargs)
    per_token = nn.functional.cross_entropy(logits, targets, reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device)
    rows = mask.nonzero(as_tuple=True)[0]  # row of each target, in the logits' order
    return sums.index_add_(0, rows, per_token), mask.sum(dim=1)


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` (of ``0..T-2``) whose next token is a target: the shift :func:`loss_sum` uses."""
    return labels[:, 1:] != IGNORE_INDEX


def target_count(labels: torch.Tensor) -> int:
    """Number of target tokens the loss covers (the first position predicts nothing)."""
    return int(target_mask(labels).sum())
