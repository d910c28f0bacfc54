"""Checkpoints of a training run: trainable weights, optimizer and scheduler state, RNG states.

``out_dir/checkpoints/step-N/`` holds ``trainable.safetensors``, ``trainer_state.pt`` and ``state.json``
(the run state, the settings fingerprint and the memory figures of the session that wrote it). A run
that trains keeps its last two checkpoints, a finished run its newest alone (:func:`prune_checkpoints`):
an older one could resume nothing, since a finished run is extended only from its last step. With the
seeded data stream this is all a resumed run needs to reproduce the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layercard.artifacts import Fields, atomic_path
from layercard.errors import LayercardError, first_line

CHECKPOINT_DIR = "checkpoints"
_KEEP_CHECKPOINTS = 2
# Changing these between a run and its resumption would silently train something else.
RESUME_FIELDS = (
    "model_hash", "kind", "targets", "lora_config", "data_hash", "seed", "batch_size", "grad_accum", "lr",
    "weight_decay", "warmup_steps", "scheduler", "max_length", "bottleneck", "dtype", "world_size",
    "schedule_steps", "init", "eva_rho", "load_in_4bit", "weights_dtype", "val_data",
    "gradient_checkpointing", "keep_best", "early_stopping", "max_grad_norm", "early_stopping_min_delta",
    "group_by_length",
)  # fmt: skip
# What a fingerprint written before a field existed meant by its absence.
_ABSENT_MEANS = {
    "init": "default", "keep_best": False, "early_stopping": 0, "max_grad_norm": None,
    "early_stopping_min_delta": 0.0, "group_by_length": False,
}  # fmt: skip
# Fields fingerprinted only later, whose absence says nothing of the run's value: compared where recorded.
_RECORDED_LATER = ("load_in_4bit", "weights_dtype", "val_data", "gradient_checkpointing")
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
TRAINER_FILE = "trainer_state.pt"
# The weights of the run's lowest validation loss so far, in a run that keeps them (``keep_best``).
BEST_FILE = "best.safetensors"


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file():
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


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Give the caller back its random states (Python's, NumPy's, torch's and CUDA's) after the block: a
    run seeds them for itself, and a script that trains in a loop must not draw the same numbers each
    time round."""
    rng, numpy_state = _rng_state(), _numpy_state()
    try:
        yield
    finally:
        _set_rng_state(rng, numpy_state)


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
    scaler: Any = None,
    best: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``step-N`` atomically, then drop all but the newest checkpoints. ``scaler``: float16's loss
    scaler, whose scale a resumed run must start from (at the first scale it would skip the updates the
    uninterrupted run made). ``best``: the weights of the lowest validation loss so far, for a run that
    keeps them."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINT_DIR / f"step-{step}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(
            {k: p.detach().cpu().contiguous() for k, p in trainable.items()},
            str(tmp / WEIGHTS_FILE),
        )
        if best is not None:
            save_file({k: t.contiguous() for k, t in best.items()}, str(tmp / BEST_FILE))
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        extra["rng"] = _rng_state()
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        torch.save(extra, tmp / TRAINER_FILE)
        (tmp / STATE_FILE).write_text(
            json.dumps({**state, "numpy_rng": _numpy_state()}) + "\n", encoding="utf-8"
        )
    prune_checkpoints(out_dir, _KEEP_CHECKPOINTS)
    return final


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints of a run."""
    for _, old in _checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _damaged(file: Path, why: BaseException | str) -> LayercardError:
    """The one-line error of a checkpoint file that cannot be read as one."""
    if isinstance(why, BaseException):
        why = first_line(why)
    return LayercardError(
        f"{file}: damaged checkpoint ({why}); remove {file.parent} to resume from an earlier checkpoint "
        "(or from the start), or use a new --out"
    )


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every trainable tensor checkpoint ``path`` holds, read without loading the tensors."""
    from safetensors import safe_open

    file = path / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type, and OSError for a missing file
        raise _damaged(file, e) from None


def read_state(path: Path) -> dict[str, Any]:
    """The run state checkpoint ``path`` saved, checked for every field a resumed run reads."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(file, e) from None
    f = Fields(f"{file}: damaged checkpoint")
    f.mapping(state, "state")
    step = f.integer(f.get(state, "step"), "step", minimum=1)
    if path.name != f"step-{step}":
        f.fail("step", f"must be the step its folder {path.name} names", step)
    for key in ("micro_batches", "tokens_seen", "target_tokens_seen"):
        f.integer(f.get(state, key), key, minimum=0)
    # absent: written before they were counted
    for key in ("positions_seen", "max_positions", "skipped_steps", "clipped_steps"):
        f.optional(state.get(key), key, lambda v, w: f.integer(v, w, minimum=0))
    for key in ("loss_curve", "val_curve"):
        for i, row in enumerate(f.items(f.get(state, key), key)):
            _step_loss(f, row, f"{key}[{i}]")
    for i, row in enumerate(f.items(f.get(state, "step_times"), "step_times")):
        if not (isinstance(row, list) and len(row) >= 4):
            f.fail(f"step_times[{i}]", "must be a [step, seconds, tokens, first, ...] row", row)
    for key in ("wall_time_s", "init_s"):
        f.optional(state.get(key), key, lambda v, w: f.number(v, w, minimum=0))
    f.optional(state.get("best"), "best", lambda v, w: _step_loss(f, v, w))
    f.optional(state.get("stopped_early"), "stopped_early", f.flag)
    f.mapping(f.get(state, "fingerprint"), "fingerprint")
    if state.get("memory") is not None:
        _check_memory(f, state["memory"])
    f.finite_everywhere(state, "")
    return state


def _step_loss(f: Fields, row: Any, where: str) -> None:
    """A ``[step, loss]`` pair: a point of a loss curve, or the best validation."""
    if not (isinstance(row, list) and len(row) == 2):
        f.fail(where, "must be a [step, loss] pair", row)
    f.integer(row[0], f"{where}[0]", minimum=1)
    f.number(row[1], f"{where}[1]")


def _check_memory(f: Fields, memory: Any) -> None:
    """The memory figures of the session that wrote the checkpoint (see ``_State.memory`` in the loop)."""
    f.mapping(memory, "memory")
    f.number(f.get(memory, "peak_mib", "memory"), "memory.peak_mib", minimum=0)
    f.text(f.get(memory, "kind", "memory"), "memory.kind")
    f.optional(memory.get("start_mib"), "memory.start_mib", lambda v, w: f.number(v, w, minimum=0))
    steps = f.items(f.get(memory, "steps", "memory"), "memory.steps")
    if len(steps) != 2:
        f.fail("memory.steps", "must be [first, last]", steps)
    for i, x in enumerate(steps):
        f.integer(x, f"memory.steps[{i}]", minimum=1)


def check_resumable(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The saved run state of checkpoint ``path``, or an error naming the first setting that changed."""
    state = read_state(path)
    saved = state["fingerprint"]
    was = {k: saved.get(k, _ABSENT_MEANS.get(k)) for k in RESUME_FIELDS}
    changed = [
        k for k in RESUME_FIELDS if was[k] != fingerprint.get(k) and (k in saved or k not in _RECORDED_LATER)
    ]
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
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, RNG and (``scaler``) loss-scaler states in place; return the
    saved run state.

    Refuses a checkpoint whose settings fingerprint differs in any of :data:`RESUME_FIELDS`, and names the
    file of one that cannot be read.
    """
    state = check_resumable(path, fingerprint)
    tensors = _read_weights(path / WEIGHTS_FILE, trainable)
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(tensors[k].to(p.device, p.dtype))
    extra_file = path / TRAINER_FILE
    try:
        extra = torch.load(extra_file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        _set_rng_state(extra["rng"], state.get("numpy_rng"))
    except Exception as e:  # pickle, torch and the states' own checks each raise their own types
        raise _damaged(extra_file, e) from None
    return state


def load_best(path: Path, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The weights of the lowest validation loss that checkpoint ``path`` kept (``keep_best``), on the CPU."""
    return _read_weights(path / BEST_FILE, trainable)


def _read_weights(file: Path, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's weights ``file``, checked to be ``trainable``'s names and shapes."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type, and OSError for a missing file
        raise _damaged(file, e) from None
    if set(tensors) != set(trainable):
        missing = sorted(set(trainable) - set(tensors))[:3]
        raise LayercardError(
            f"{file.parent}: checkpoint weights do not match the model (missing e.g. {missing})"
        )
    wrong = next((k for k, p in trainable.items() if tuple(tensors[k].shape) != tuple(p.shape)), None)
    if wrong is not None:
        raise LayercardError(
            f"{file}: checkpoint weights do not match the model ({wrong}: shape "
            f"{tuple(tensors[wrong].shape)}, the model's {tuple(trainable[wrong].shape)})"
        )
    return tensors
