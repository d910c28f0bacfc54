"""What training needs beside its settings (``layercard.config.TrainConfig``, docs/design.md §7)."""

from __future__ import annotations

from layercard.config import ADAPTER_KINDS, SCHEDULERS, TrainConfig

VALID_KINDS = ADAPTER_KINDS
# Accelerate's name for each compute precision of TrainConfig.dtype.
_MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}

__all__ = ["SCHEDULERS", "VALID_KINDS", "TrainConfig"]
