"""Training a planned placement: LoRA through PEFT, or bottleneck adapters (houlsby/parallel), DESIGN §7.

A plain PyTorch loop under :class:`accelerate.Accelerator` (device placement, multi-GPU, optional mixed
precision). The loss of an optimizer step is the mean cross-entropy over the target tokens of all its
micro-batches (prompt tokens carry -100), exactly what the card measured.

Data order is a function of the seed alone: epoch ``e`` is a permutation drawn from ``seed + e`` and
a step consumes the next ``grad_accum`` micro-batches of the cycled stream. A checkpoint therefore
needs only the number of micro-batches consumed, the trainable weights, the optimizer and scheduler
state and the RNG states (dropout) for a resumed run to reproduce the uninterrupted loss curve.

Run folder::

    out_dir/checkpoints/step-N/   trainable.safetensors, trainer_state.pt, state.json (last 2 kept)
    out_dir/adapter/              PEFT folder (lora) or layercard folder (houlsby/parallel)
    out_dir/train_metrics.json

``adapter/`` and ``train_metrics.json`` are written atomically at the end; an interrupted run leaves
only checkpoints, which ``resume=True`` continues from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import random
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layercard.artifacts import SCHEMA_VERSION, Provenance, atomic_path, sha256_json, write_json
from layercard.card.probe import loss_sum
from layercard.errors import LayercardError
from layercard.models import LoadedModel
from layercard.progress import track
from layercard.tasks import Encoded, Task, batches, collate, encode_task

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "SCHEDULERS",
    "VALID_KINDS",
    "PlanSpec",
    "TrainConfig",
    "latest_checkpoint",
    "train",
]

KIND = "train_metrics"
VALID_KINDS = ("lora", "houlsby", "parallel")
SCHEDULERS = ("constant", "linear", "cosine")
_MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "train_metrics.json"
_KEEP_CHECKPOINTS = 2
_DEFAULT_BOTTLENECK = 16
# Changing these between a run and its resumption would silently train something else.
_RESUME_FIELDS = (
    "model_hash", "kind", "targets", "lora_config", "data_hash", "seed", "batch_size", "grad_accum", "lr",
    "weight_decay", "warmup_steps", "scheduler", "max_length", "bottleneck", "dtype", "world_size",
    "schedule_steps",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. Exactly one of ``steps`` / ``epochs`` (pass ``steps=None`` with epochs).

    ``eval_every=0`` evaluates only at the end, ``checkpoint_every=0`` writes no checkpoints,
    ``eval_examples=0`` skips validation. ``bottleneck=None`` takes the plan's (else 16).
    ``dtype`` is the compute precision (Accelerate mixed precision for bfloat16/float16); the
    weights keep the dtype they were loaded in.
    """

    steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "constant"
    max_length: int = 128
    train_examples: int | None = None
    eval_examples: int = 64
    eval_every: int = 25
    checkpoint_every: int = 50
    log_every: int = 1  # loss_curve keeps every log_every-th step (and the last)
    seed: int = 0
    bottleneck: int | None = None
    load_in_4bit: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise LayercardError(
                f"steps/epochs: give exactly one (got steps={self.steps!r}, epochs={self.epochs!r}); "
                "pass steps=None to train by epochs"
            )
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise LayercardError(f"steps: must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and (
            isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not self.epochs > 0
        ):
            raise LayercardError(f"epochs: must be a number > 0, got {self.epochs!r}")
        minimum = {"batch_size": 1, "grad_accum": 1, "max_length": 2, "log_every": 1, "warmup_steps": 0}
        minimum |= {"eval_examples": 0, "eval_every": 0, "checkpoint_every": 0, "seed": 0}
        for name, lo in minimum.items():
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise LayercardError(f"{name}: must be an integer >= {lo}, got {v!r}")
        for name in ("train_examples", "bottleneck"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise LayercardError(f"{name}: must be an integer >= 1 or None, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise LayercardError(f"lr: must be a number > 0, got {self.lr!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not wd >= 0:
            raise LayercardError(f"weight_decay: must be a number >= 0, got {wd!r}")
        if self.scheduler not in SCHEDULERS:
            raise LayercardError(f"scheduler: {self.scheduler!r} unknown; use one of {', '.join(SCHEDULERS)}")
        if self.dtype not in _MIXED_PRECISION:
            raise LayercardError(f"dtype: {self.dtype!r} unknown; use one of {', '.join(_MIXED_PRECISION)}")
        if not isinstance(self.load_in_4bit, bool):
            raise LayercardError(f"load_in_4bit: must be true or false, got {self.load_in_4bit!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# The plan, normalised
# ---------------------------------------------------------------------------------------------------------


def _unit_dict(u: Any) -> dict[str, Any]:
    if isinstance(u, dict):
        return dict(u)
    if dataclasses.is_dataclass(u) and not isinstance(u, type):
        return dataclasses.asdict(u)
    return {k: getattr(u, k) for k in ("key", "layer", "role", "name", "rank") if hasattr(u, k)}


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """What training needs from a plan (a :class:`layercard.plan.Plan` or its JSON dict)."""

    kind: str
    units: tuple[dict[str, Any], ...]
    layers: tuple[int, ...]
    lora_config: dict[str, Any] | None
    adapter_config: dict[str, Any] | None
    predicted: dict[str, Any]
    card: dict[str, Any]
    config: dict[str, Any]

    @classmethod
    def from_any(cls, plan: Any) -> PlanSpec:
        if isinstance(plan, PlanSpec):
            return plan
        get = plan.get if isinstance(plan, dict) else (lambda k, default=None: getattr(plan, k, default))
        kind = get("adapter_kind") or get("kind")
        if kind == "plan":  # the artifact kind of a dict without adapter_kind
            kind = None
        lora = get("lora_config")
        kind = kind or ("lora" if lora else None)
        if kind is None:
            raise LayercardError("plan: no adapter kind (field 'adapter_kind')")
        units = tuple(_unit_dict(u) for u in (get("units") or ()))
        layers = get("layers") or sorted({int(u["layer"]) for u in units if "layer" in u})
        return cls(
            kind=str(kind),
            units=units,
            layers=tuple(int(i) for i in layers),
            lora_config=dict(lora) if lora else None,
            adapter_config=dict(get("adapter_config") or {}) or None,
            predicted=dict(get("predicted") or {}),
            card=dict(get("card") or {}),
            config=dict(get("config") or {}),
        )

    @property
    def model_hash(self) -> str | None:
        return self.card.get("model_hash") or self.card.get("hash")

    @property
    def model_id(self) -> str | None:
        return self.card.get("model_id") or self.card.get("id")

    def peft_config(self) -> Any:
        """A PEFT ``LoraConfig`` from ``lora_config``."""
        if not self.lora_config:
            raise LayercardError(
                f"plan: kind {self.kind!r} has no lora_config; re-plan with --kind lora to train LoRA"
            )
        from peft import LoraConfig

        cfg = dict(self.lora_config)
        try:
            return LoraConfig(**cfg)
        except (TypeError, ValueError) as e:
            raise LayercardError(f"plan: lora_config is not a valid LoraConfig ({e})") from None

    def planned_modules(self) -> dict[str, int | None]:
        """Full module path → planned rank (None when the plan does not say)."""
        if self.units:
            return {
                str(u["name"]): (int(u["rank"]) if u.get("rank") is not None else None) for u in self.units
            }
        targets = (self.lora_config or {}).get("target_modules") or []
        if isinstance(targets, str):
            raise LayercardError("plan: lora_config.target_modules must list full module paths, not a string")
        return dict.fromkeys(map(str, targets))

    def calibration(self) -> tuple[int | None, int | None]:
        """(batch size, tokens per batch) the card's cost model was timed at, if the plan or its card says."""
        sources: list[dict[str, Any]] = [self.predicted, self.card, self.card.get("cost") or {}]
        path = self.card.get("path")
        if path and not any(src.get("calibration_batch_size") for src in sources):
            with contextlib.suppress(Exception):  # an unreadable or moved card only loses this detail
                sources.append(json.loads(Path(path).read_text()).get("cost") or {})
        size = tokens = None
        for src in sources:
            size = size or src.get("calibration_batch_size") or src.get("batch_size")
            tokens = tokens or src.get("calibration_batch_tokens") or src.get("batch_tokens")
        return (int(size) if size else None), (int(tokens) if tokens else None)


# ---------------------------------------------------------------------------------------------------------
# Data stream and schedule
# ---------------------------------------------------------------------------------------------------------


class _Stream:
    """Micro-batch ``k`` of the cycled, per-epoch-shuffled stream; a pure function of the seed."""

    def __init__(self, encoded: Sequence[Encoded], batch_size: int, pad_id: int, seed: int) -> None:
        self.encoded = encoded
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.per_epoch = math.ceil(len(encoded) / batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.encoded), generator=g).tolist())
        return self._perm[1]

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(k, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return collate([self.encoded[j] for j in idx], self.pad_id)


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at (0-based) step ``s``: linear warm-up, then constant/linear/cosine to 0."""
    warm = cfg.warmup_steps

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)  # never 0: a warm-up step with lr 0 would be a wasted step
        if cfg.scheduler == "constant":
            return 1.0
        span = max(1, total - warm)
        progress = min(1.0, (s - warm) / span)
        if cfg.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _target_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())  # loss_sum's shift: the first position predicts nothing


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


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


def _save_checkpoint(
    out_dir: Path,
    step: int,
    trainable: dict[str, nn.Parameter],
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
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


def _load_checkpoint(
    path: Path,
    trainable: dict[str, nn.Parameter],
    optimizer: Any,
    scheduler: Any,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    saved = state.get("fingerprint", {})
    changed = [k for k in _RESUME_FIELDS if saved.get(k) != fingerprint.get(k)]
    if changed:
        k = changed[0]
        raise LayercardError(
            f"{path}: cannot resume: {k} was {saved.get(k)!r}, now {fingerprint.get(k)!r}"
            + (f" (also differ: {', '.join(changed[1:])})" if changed[1:] else "")
            + "; use the run's settings or a new --out"
        )
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


# ---------------------------------------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------------------------------------


def _check_4bit() -> None:
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise LayercardError("--load-in-4bit needs a CUDA GPU and bitsandbytes; none found")


def _load_4bit(loaded: LoadedModel, device_index: int) -> nn.Module:
    """A fresh NF4 copy of the base (QLoRA); the caller's full-precision model is left alone."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            loaded.source, quantization_config=bnb, device_map={"": device_index}, local_files_only=True
        )
    except Exception as e:
        raise LayercardError(f"{loaded.source}: cannot load in 4 bit ({type(e).__name__}: {e})") from e
    # No gradient checkpointing: step times stay comparable with the cost model, which assumed none.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _check_lora_targets(peft_model: Any, spec: PlanSpec) -> None:
    """PEFT must have adapted exactly the planned modules, at the planned ranks."""
    from peft.tuners.lora import LoraLayer

    got = {
        name: layer.r.get("default")
        for name, layer in peft_model.base_model.model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    want = spec.planned_modules()
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        parts = ([f"not adapted: {', '.join(missing[:4])}"] if missing else []) + (
            [f"adapted but not planned: {', '.join(extra[:4])}"] if extra else []
        )
        raise LayercardError(f"plan: PEFT's target modules differ from the plan's units ({'; '.join(parts)})")
    wrong = [n for n, r in want.items() if r is not None and got[n] != r]
    if wrong:
        raise LayercardError(f"plan: {wrong[0]} got rank {got[wrong[0]]}, the plan says {want[wrong[0]]}")


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes. This is the whole process's peak, not this run's alone.
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"


def _evaluate(
    model: nn.Module, encoded: Sequence[Encoded], cfg: TrainConfig, pad_id: int, accelerator: Any
) -> float:
    """Mean CE over the target tokens of ``encoded``, no grad, eval mode (dropout off)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches(encoded, cfg.batch_size, pad_id):
                b = {k: v.to(accelerator.device) for k, v in b.items()}
                with accelerator.autocast():
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                ls, n = loss_sum(out.logits, b["labels"])
                total += float(ls)
                count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def _median_time(step_times: list[list[Any]]) -> tuple[float | None, float | None]:
    """(median s/step, tokens/s) over steps that are not a session's first (which pays warm-up)."""
    rows = [r for r in step_times if not r[3]] or step_times
    if not rows:
        return None, None
    secs = sum(r[1] for r in rows)
    return float(statistics.median(r[1] for r in rows)), (
        sum(r[2] for r in rows) / secs if secs > 0 else None
    )


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

StepCallback = Callable[[int, float, nn.Module], None]


def train(
    loaded: LoadedModel,
    plan: Any,
    train_task: Task,
    val_task: Task | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    kind: str | None = None,
    callback: StepCallback | None = None,
) -> dict[str, Any]:
    """Train the adapters ``plan`` places; write ``adapter/`` and ``train_metrics.json``; return the metrics.

    ``kind`` overrides the plan's adapter kind (houlsby/parallel use ``plan.layers``). ``callback(step,
    loss, model)`` runs after every optimizer step (and its checkpoint) with the adapted model; an
    exception it raises stops the run like a crash would (checkpoints stay, nothing else is written).
    ``loaded.model`` is restored afterwards (LoRA unloaded, adapters removed, grad flags reset).
    """
    t_start = time.perf_counter()
    spec = PlanSpec.from_any(plan)
    kind = kind or spec.kind
    if kind not in VALID_KINDS:
        raise LayercardError(f"kind {kind!r}: unknown adapter kind; valid: {', '.join(VALID_KINDS)}")
    if spec.model_hash and spec.model_hash != loaded.model_hash:
        raise LayercardError(
            f"plan is for model {spec.model_id} ({spec.model_hash[:12]}), but the loaded model is "
            f"{loaded.model_id} ({loaded.model_hash[:12]}); run card and plan for this model"
        )
    if cfg.load_in_4bit:
        _check_4bit()
    if kind == "lora":
        spec.peft_config()  # fail before any work when a non-LoRA plan has no LoraConfig
    layers = list(spec.layers)
    if not layers:
        raise LayercardError("plan: no layers to adapt")
    bottleneck = cfg.bottleneck or int((spec.adapter_config or {}).get("bottleneck") or _DEFAULT_BOTTLENECK)
    out_dir = Path(out_dir)
    existing = latest_checkpoint(out_dir)
    if existing is not None and not resume:
        raise LayercardError(
            f"{out_dir}: holds checkpoints of an earlier run ({existing.name}); "
            "pass --resume to continue it, or use a new --out"
        )

    # Data: a seeded subset, encoded once; the validation subset likewise.
    task = train_task.subset(cfg.train_examples, seed=cfg.seed) if cfg.train_examples else train_task
    tok = loaded.tokenizer
    pad_id = next((int(t) for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    encoded = encode_task(tok, task, max_length=cfg.max_length)
    if not encoded:
        raise LayercardError(f"task {task.name!r}: no training examples")
    val = (
        val_task.subset(cfg.eval_examples, seed=cfg.seed)
        if val_task is not None and cfg.eval_examples
        else None
    )
    val_encoded = encode_task(tok, val, max_length=cfg.max_length) if val is not None and len(val) else []

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_MIXED_PRECISION[cfg.dtype])
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = _Stream(encoded, cfg.batch_size, pad_id, cfg.seed)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * stream.per_epoch / (cfg.grad_accum * world)))
    planned = spec.planned_modules() if kind == "lora" else {}
    fingerprint = {
        "model_hash": loaded.model_hash,
        "kind": kind,
        "targets": [[n, r] for n, r in sorted(planned.items())] if kind == "lora" else layers,
        "lora_config": sha256_json(spec.lora_config) if kind == "lora" else None,
        "data_hash": task.data_hash,
        "world_size": world,
        "bottleneck": bottleneck if kind != "lora" else None,
        # the step budget shapes a decaying schedule, so it may change on resume only when constant
        "schedule_steps": total_steps if cfg.scheduler != "constant" else None,
        **{k: getattr(cfg, k) for k in _RESUME_FIELDS if hasattr(cfg, k) and k != "bottleneck"},
    }

    # Model: the caller's base, adapted in place and restored in `finally`.
    set_seed(cfg.seed)  # LoRA A / adapter init and dropout draw from here
    base = _load_4bit(loaded, accelerator.local_process_index) if cfg.load_in_4bit else loaded.model
    owned = base is not loaded.model
    flags = [(p, p.requires_grad) for p in base.parameters()]
    was_training = base.training
    home = next(base.parameters()).device
    peft_model: Any = None
    aset: Any = None
    prepared: Any = None
    try:
        if kind == "lora":
            from peft import get_peft_model

            peft_model = get_peft_model(base, spec.peft_config())
            _check_lora_targets(peft_model, spec)
            model: nn.Module = peft_model
        else:
            from layercard.adapters import add_adapters

            for p in base.parameters():
                p.requires_grad_(False)
            aset = add_adapters(base, kind, layers, bottleneck, seed=cfg.seed)
            model = base
        if not cfg.load_in_4bit:
            model.to(device)  # before the optimizer exists, so its state lands on the params' device
        model.train()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise LayercardError("plan: no trainable parameters after adapting the model")
        optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))

        step, consumed = 0, 0
        loss_curve: list[list[float]] = []
        val_curve: list[list[float]] = []
        step_times: list[list[Any]] = []  # [step, seconds, tokens, first-of-session]
        tokens_seen = target_seen = 0
        resumed_from: int | None = None
        prior_wall = 0.0
        ckpt = latest_checkpoint(out_dir) if resume else None
        if ckpt is not None:
            st = _load_checkpoint(ckpt, trainable, optimizer, scheduler, fingerprint)
            step, consumed = int(st["step"]), int(st["micro_batches"])
            loss_curve, val_curve, step_times = st["loss_curve"], st["val_curve"], st["step_times"]
            tokens_seen, target_seen = int(st["tokens_seen"]), int(st["target_tokens_seen"])
            prior_wall = float(st.get("wall_time_s", 0.0))
            resumed_from = step
        # The scheduler is stepped by hand: Accelerate's wrapper would step it once per process.
        prepared, optimizer = accelerator.prepare(model, optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def state_now() -> dict[str, Any]:
            return {
                "step": step,
                "micro_batches": consumed,
                "epoch": consumed * world / stream.per_epoch,
                "loss_curve": loss_curve,
                "val_curve": val_curve,
                "step_times": step_times,
                "tokens_seen": tokens_seen,
                "target_tokens_seen": target_seen,
                "wall_time_s": prior_wall + time.perf_counter() - t_start,
                "fingerprint": fingerprint,
            }

        first = True
        for _ in track(range(step, total_steps), f"train {kind}", total=total_steps - step, enabled=progress):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            micro = [stream.batch((consumed + j) * world + rank) for j in range(cfg.grad_accum)]
            n_target = sum(_target_count(b["labels"]) for b in micro)
            step_loss = torch.zeros((), device=device)
            n_tokens = 0
            for j, b in enumerate(micro):
                b = {k: v.to(device) for k, v in b.items()}
                n_tokens += int(b["attention_mask"].sum())
                # Gradients sync across processes only on the step's last micro-batch.
                sync = accelerator.no_sync(prepared) if j < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with accelerator.autocast():  # the forward only: autocast is not for backward
                        out = prepared(
                            input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False
                        )
                        ls, _ = loss_sum(out.logits, b["labels"])
                    loss = ls / max(n_target, 1)
                    accelerator.backward(loss)
                step_loss += loss.detach()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(accelerator.reduce(step_loss, reduction="mean"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step += 1
            consumed += cfg.grad_accum
            step_times.append([step, time.perf_counter() - t0, n_tokens * world, first])
            first = False
            tokens_seen += n_tokens * world
            target_seen += n_target * world
            if step % cfg.log_every == 0 or step == total_steps:
                loss_curve.append([step, loss_value])
            if val_encoded and cfg.eval_every and step % cfg.eval_every == 0:
                val_curve.append([step, _evaluate(prepared, val_encoded, cfg, pad_id, accelerator)])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    _save_checkpoint(out_dir, step, trainable, optimizer, scheduler, state_now())
            if callback is not None:
                callback(step, loss_value, accelerator.unwrap_model(prepared))
        if val_encoded and (not val_curve or val_curve[-1][0] != step):
            val_curve.append([step, _evaluate(prepared, val_encoded, cfg, pad_id, accelerator)])

        peak, peak_kind = _peak_memory(device)
        accelerator.wait_for_everyone()
        s_per_step, tokens_per_s = _median_time(step_times)
        inner = accelerator.unwrap_model(prepared)
        predicted = spec.predicted.get("step_time_s")
        calib_size, calib_tokens = spec.calibration()
        trainable_params = sum(p.numel() for p in trainable.values())
        metrics: dict[str, Any] = {
            "adapter_kind": kind,
            "adapter_dir": str(out_dir / ADAPTER_DIR),
            "model": {
                "id": loaded.model_id,
                "hash": loaded.model_hash,
                "weights_dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
                "load_in_4bit": cfg.load_in_4bit,
            },
            "task": task.describe(),
            "val_task": val.describe() if val is not None else None,
            "config": cfg.to_dict(),
            "plan": {
                "layers": layers,
                "modules": len(planned) if kind == "lora" else 2 * len(layers),
                "units": [u.get("key", u.get("name")) for u in spec.units],
                "bottleneck": bottleneck if kind != "lora" else None,
                "policy": spec.config.get("policy"),
            },
            "trainable_params": int(trainable_params),
            "total_params": int(sum(p.numel() for p in inner.parameters())),
            "steps": step,
            "epochs": consumed * world / stream.per_epoch,
            "tokens_seen": tokens_seen,
            "target_tokens_seen": target_seen,
            "s_per_step": s_per_step,
            "tokens_per_s": tokens_per_s,
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": peak_kind,
            "device": str(device),
            "world_size": world,
            "loss_curve": loss_curve,
            "val_curve": val_curve,
            "first_train_loss": loss_curve[0][1] if loss_curve else None,
            "final_train_loss": loss_curve[-1][1] if loss_curve else None,
            "final_val_loss": val_curve[-1][1] if val_curve else None,
            "predicted_step_time_s": predicted,
            "predicted_batch_size": calib_size,
            "predicted_batch_tokens": calib_tokens,
            "batch_size": cfg.batch_size * cfg.grad_accum,
            "batch_tokens_per_step": tokens_seen / step if step else None,
            "step_time_ratio": (s_per_step / predicted) if predicted and s_per_step else None,
            # The cost model was calibrated on the card's batch; CPU step time grows about linearly with
            # tokens, so the prediction is also given rescaled to this run's tokens per step.
            "predicted_step_time_scaled_s": (
                predicted * (tokens_seen / step) / calib_tokens
                if predicted and calib_tokens and step
                else None
            ),
            "resumed_from": resumed_from,
        }
        wall = prior_wall + time.perf_counter() - t_start
        metrics["wall_time_s"] = round(wall, 3)
        if accelerator.is_main_process:
            _write_adapter(out_dir / ADAPTER_DIR, kind, inner, aset, loaded.model_hash)
            prov = Provenance.make(
                stage="train",
                model_id=loaded.model_id,
                model_hash=loaded.model_hash,
                task=task.name,
                data_hash=task.data_hash,
                config={
                    **cfg.to_dict(),
                    "kind": kind,
                    "bottleneck": bottleneck,
                    "plan": sha256_json(fingerprint),
                },
                seed=cfg.seed,
                wall_time_s=wall,
            )
            metrics = {
                "kind": KIND,
                "schema_version": SCHEMA_VERSION,
                "provenance": prov.to_dict(),
                **metrics,
            }
            write_json(out_dir / METRICS_FILE, metrics)
        accelerator.wait_for_everyone()
        return metrics
    finally:
        if prepared is not None:
            # Drops Accelerate's mixed-precision forward wrapper from the caller's model.
            accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        if peft_model is not None and not owned:
            peft_model.unload()
        if aset is not None:
            aset.remove()
        if not owned:
            for p, r in flags:
                p.requires_grad_(r)
            base.train(was_training)
            if next(base.parameters()).device != home:
                base.to(home)
        accelerator.free_memory()


def _write_adapter(path: Path, kind: str, model: nn.Module, aset: Any, model_hash: str) -> None:
    """The adapter folder, atomically: vanilla PEFT for LoRA, layercard's format for bottlenecks."""
    with atomic_path(path) as tmp:
        if kind == "lora":
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            from layercard.adapters import save_adapters

            save_adapters(aset, tmp, base_model_hash=model_hash)
