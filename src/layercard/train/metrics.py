"""What a training run measured: the :class:`TrainMetrics` artifact (train_metrics.json) and measurements."""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.artifacts import SCHEMA_VERSION, load_artifact, write_json
from layercard.tasks import Encoded, batches
from layercard.tasks.loss import loss_sum

KIND = "train_metrics"
METRICS_FILE = "train_metrics.json"


@dataclasses.dataclass(frozen=True)
class TrainMetrics:
    """train_metrics.json: the run's settings, cost measurements and loss curves.

    Curves are ``[step, loss]`` pairs. ``s_per_step`` is the median over steps that are not a session's
    first; ``predicted_*`` come from the plan (the card's cost model and the batch it was timed at).
    """

    provenance: dict[str, Any]
    adapter_kind: str
    adapter_dir: str
    model: dict[str, Any]
    task: dict[str, Any]
    val_task: dict[str, Any] | None
    config: dict[str, Any]
    plan: dict[str, Any]
    trainable_params: int
    total_params: int
    steps: int
    epochs: float
    tokens_seen: int
    target_tokens_seen: int
    s_per_step: float | None
    tokens_per_s: float | None
    peak_memory_mib: float
    peak_memory_kind: str
    device: str
    world_size: int
    loss_curve: list[list[float]]
    val_curve: list[list[float]]
    first_train_loss: float | None
    final_train_loss: float | None
    final_val_loss: float | None
    predicted_step_time_s: float | None
    predicted_batch_size: int | None
    predicted_batch_tokens: int | None
    batch_size: int
    batch_tokens_per_step: float | None
    step_time_ratio: float | None
    predicted_step_time_scaled_s: float | None
    resumed_from: int | None
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        """The train_metrics.json form (key order as written)."""
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainMetrics:
        """Metrics from their JSON form (raises KeyError when a field is missing)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def save(self, path: str | Path) -> Path:
        """Write the metrics file (train_metrics.json) atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TrainMetrics:
        """Read a train_metrics.json (or a run folder holding one), checking kind and schema version."""
        return load_artifact(
            path, kind=KIND, what="train metrics", file_name=METRICS_FILE, build=lambda d, _: cls.from_dict(d)
        )


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA's max allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes. This is the whole process's peak, not this run's alone.
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"


def median_time(step_times: list[list[Any]]) -> tuple[float | None, float | None]:
    """(median s/step, tokens/s) over steps that are not a session's first (which pays warm-up)."""
    rows = [r for r in step_times if not r[3]] or step_times
    if not rows:
        return None, None
    secs = sum(r[1] for r in rows)
    return float(statistics.median(r[1] for r in rows)), (
        sum(r[2] for r in rows) / secs if secs > 0 else None
    )


def eval_loss(
    model: nn.Module, encoded: Sequence[Encoded], batch_size: int, pad_id: int, accelerator: Any
) -> float:
    """Mean CE over the target tokens of ``encoded``, no grad, eval mode (dropout off)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches(encoded, batch_size, pad_id):
                b = {k: v.to(accelerator.device) for k, v in b.items()}
                with accelerator.autocast():
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                ls, n = loss_sum(out.logits, b["labels"])
                total += float(ls)
                count += n
    finally:
        model.train(was)
    return total / max(count, 1)
