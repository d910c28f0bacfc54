"""The training loss in one place: next-token cross-entropy summed over target tokens only.

Prompt and padding positions carry :data:`IGNORE_INDEX` in the labels. The card, the cost calibration,
training, evaluation and trimming all measure this same quantity.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens (labels ≠ IGNORE_INDEX) and their count."""
    shift_logits = logits[:, :-1, :]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    n_tok = target_count(labels)
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, n_tok


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` (of ``0..T-2``) whose next token is a target: the shift :func:`loss_sum` uses."""
    return labels[:, 1:] != IGNORE_INDEX


def target_count(labels: torch.Tensor) -> int:
    """Number of target tokens the loss covers (the first position predicts nothing)."""
    return int(target_mask(labels).sum())
