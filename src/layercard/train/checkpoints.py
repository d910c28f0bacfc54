"""Checkpoints of a training run: trainable weights, optimizer and scheduler state, RNG states.

``out_dir/checkpoints/step-N/`` holds ``trainable.safetensors``, ``trainer_state.pt`` and ``state.json``
(the run state and the settings fingerprint); the last two are kept. With the seeded data stream this
is all a resumed run needs to reproduce the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layercard.artifacts import atomic_path
from layercard.errors import LayercardError

CHECKPOINT_DIR = "checkpoints"
_KEEP_CHECKPOINTS = 2
# Changing these between a run and its resumption would silently train something else.
RESUME_FIELDS = (
    "model_hash", "kind", "targets", "lora_config", "data_hash", "seed", "batch_size", "grad_accum", "lr",
    "weight_decay", "warmup_steps", "scheduler", "max_length", "bottleneck", "dtype", "world_size",
    "schedule_steps", "init", "eva_rho",
)  # fmt: skip
# What a fingerprint written before a field existed meant by its absence.
_ABSENT_MEANS = {"init": "default"}


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if (
            p.is_dir()
            and p.name.startswith("step-")
            and p.name[5:].isdigit()
            and (p / "state.json").is_file()
        ):
            found.append((int(p.name[5:]), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = _checkpoints(Path(out_dir))
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], numpy_state: list[Any] | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if numpy_state is not None:
        name, keys, pos, has_gauss, cached = numpy_state
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def save_checkpoint(
    out_dir: Path,
    step: int,
    trainable: dict[str, nn.Parameter],
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write ``step-N`` atomically, then drop all but the newest checkpoints."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINT_DIR / f"step-{step}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(
            {k: p.detach().cpu().contiguous() for k, p in trainable.items()},
            str(tmp / "trainable.safetensors"),
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps({**state, "numpy_rng": _numpy_state()}) + "\n")
    for _, old in _checkpoints(out_dir)[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every trainable tensor checkpoint ``path`` holds, read without loading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_resumable(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The saved run state of checkpoint ``path``, or an error naming the first setting that changed."""
    state = json.loads((path / "state.json").read_text())
    saved = state.get("fingerprint", {})
    was = {k: saved.get(k, _ABSENT_MEANS.get(k)) for k in RESUME_FIELDS}
    changed = [k for k in RESUME_FIELDS if was[k] != fingerprint.get(k)]
    if changed:
        k = changed[0]
        raise LayercardError(
            f"{path}: cannot resume: {k} was {was[k]!r}, now {fingerprint.get(k)!r}"
            + (f" (also differ: {', '.join(changed[1:])})" if changed[1:] else "")
            + "; use the run's settings or a new --out"
        )
    return state


def load_checkpoint(
    path: Path,
    trainable: dict[str, nn.Parameter],
    optimizer: Any,
    scheduler: Any,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states in place; return the saved run state.

    Refuses a checkpoint whose settings fingerprint differs in any of :data:`RESUME_FIELDS`.
    """
    from safetensors.torch import load_file

    state = check_resumable(path, fingerprint)
    tensors = load_file(str(path / "trainable.safetensors"))
    if set(tensors) != set(trainable):
        missing = sorted(set(trainable) - set(tensors))[:3]
        raise LayercardError(f"{path}: checkpoint weights do not match the model (missing e.g. {missing})")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(tensors[k].to(p.device, p.dtype))
    extra = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"], state.get("numpy_rng"))
    return state
