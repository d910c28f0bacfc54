"""EVA initialisation of a plan's LoRA modules (``init: eva``, docs/design.md §7).

Each LoRA A starts as the top right-singular vectors of its module's inputs on the first training
micro-batches (B stays zero, so the model starts as its base), and rank moves between modules by
explained variance: the planned total is kept, and no module grows past ``eva_rho`` times the largest
planned rank among the modules that read its input (PEFT decomposes q, k and v, or gate and up, once, and
bounds them together: a rank-1 q beside a rank-16 v may reach 2 × 16). A module can end at rank 0 and is
then not adapted. PEFT does the computation (``get_eva_state_dict``, ``initialize_lora_eva_weights``);
this module chooses the batches, bounds the work, gives every process the same answer and keeps the saved
adapter's targets exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.config.schema import ConfigError
from layercard.errors import LayercardError, first_line
from layercard.train.checkpoints import saved_shapes
from layercard.train.data import Stream

__all__ = ["EVA_BATCHES", "MAX_FORWARDS", "apply_eva", "eva_lora_config", "eva_summary", "init_eva"]

EVA_BATCHES = 8  # the first micro-batches of the training stream; the SVD cycles over them
MAX_FORWARDS = 128  # forward passes allowed for the SVD to settle (its first pass only compares inputs)
_ADAPTER = "default"
_A_WEIGHT = f".lora_A.{_ADAPTER}.weight"
_PREFIX = "base_model.model."  # PeftModel module names over the names of the base model


class _Unsettled(Exception):
    """The forward-pass budget ran out before PEFT's SVD settled."""


def eva_lora_config(config: Any, rho: float) -> Any:
    """``config`` (a PEFT ``LoraConfig``) set for EVA with growth cap ``rho``."""
    from peft import EvaConfig

    # Every real token feeds the SVD, not only the answer's: short answers would leave a micro-batch with
    # fewer rows than the components it must find.
    eva = EvaConfig(rho=rho, use_label_mask=False)
    return dataclasses.replace(config, init_lora_weights="eva", eva_config=eva)


def init_eva(
    peft_model: nn.Module,
    planned: Mapping[str, int],
    stream: Stream,
    rho: float,
    accelerator: Any,
    *,
    checkpoint: Path | None = None,
) -> dict[str, int]:
    """Initialise ``peft_model``'s LoRA modules by EVA; return every planned module's rank (0: dropped).

    ``peft_model`` must come from :func:`eva_lora_config` and sit on its device. With ``checkpoint`` (a
    resumed run) the ranks are those the checkpoint holds, with no SVD: its weights replace A and B next.
    """
    if checkpoint is not None:
        components = _from_checkpoint(peft_model, checkpoint)
    else:
        components = _on_every_process(accelerator, lambda: _compute(peft_model, stream, rho))
    apply_eva(peft_model, components)
    inner = peft_model.base_model.model
    return {name: _rank(inner.get_submodule(name)) for name in planned}


def apply_eva(peft_model: nn.Module, components: Mapping[str, torch.Tensor]) -> None:
    """Give each LoRA module its EVA components (one row per rank; no rows drops the module)."""
    from peft import initialize_lora_eva_weights

    try:
        initialize_lora_eva_weights(peft_model, eva_state_dict=dict(components), show_progress_bar=False)
    except ValueError as e:
        raise LayercardError(f"train.init: eva cannot set the LoRA weights ({first_line(e)})") from e
    # PEFT shortens a long target list to name suffixes, which also match a module EVA dropped: loading
    # the adapter would put an untrained LoRA back on it. Full paths, as plans write them, match only
    # the modules that have one (in model order, so the saved config is the same on every run).
    config = peft_model.peft_config[_ADAPTER]
    config.target_modules = [n.removeprefix(_PREFIX) for n in _lora_modules(peft_model)]


def eva_summary(ranks: Mapping[str, int], planned: Mapping[str, int], seconds: float) -> str:
    """One line on what EVA did to the planned ranks."""
    kept = [r for r in ranks.values() if r]
    moved = sum(1 for n, r in ranks.items() if r != planned[n])
    dropped = len(ranks) - len(kept)
    spread = f"{min(kept)}–{max(kept)}" if kept else "none"
    return (
        f"eva init: {moved} of {len(ranks)} modules changed rank, ranks {spread}"
        + (f", {dropped} dropped" if dropped else "")
        + f"; total {sum(ranks.values())} (planned {sum(planned.values())}); {seconds:.1f}s"
    )


def _lora_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by their name in the PeftModel (EVA's keys)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _rank(module: nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return int(module.lora_A[_ADAPTER].out_features) if isinstance(module, LoraLayer) else 0


def _compute(peft_model: nn.Module, stream: Stream, rho: float) -> dict[str, torch.Tensor]:
    """PEFT's EVA components of every LoRA module, from the first micro-batches of ``stream`` (on CPU)."""
    from peft import get_eva_state_dict

    need = 0
    for name, m in _lora_modules(peft_model).items():
        rank = _rank(m)
        wanted = round(rank * rho)  # the components PEFT computes for the module
        if wanted > m.in_features:
            raise ConfigError(
                "train.eva_rho",
                f"{rho:g} asks {name.removeprefix(_PREFIX)} (rank {rank}) for {wanted} components of an "
                f"input with {m.in_features} features; use at most {m.in_features / rank:g}",
            )
        need = max(need, wanted)
    first = [stream.batch(k) for k in range(min(EVA_BATCHES, stream.per_epoch))]
    # A micro-batch with fewer real tokens than components would be skipped by the SVD, so not used.
    batches = [
        {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        for b in first
        if int(b["attention_mask"].sum()) >= need
    ]
    if not batches:
        most = max(int(b["attention_mask"].sum()) for b in first)
        raise ConfigError(
            "train.init",
            f"eva needs micro-batches of at least {need} tokens (planned rank × eva_rho); the first "
            f"{len(first)} hold at most {most}; raise batch_size or lower eva_rho",
        )
    passes = 0

    def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        nonlocal passes
        passes += 1
        if passes > MAX_FORWARDS:
            raise _Unsettled
        return model(**inputs, use_cache=False)

    try:
        state = get_eva_state_dict(
            peft_model,
            batches,
            forward_fn=forward,
            # Every process computes from the same batches or not at all (see _on_every_process).
            gather_distributed_inputs=False,
            show_progress_bar=False,
        )
    except _Unsettled:
        raise ConfigError(
            "train.init",
            f"eva: the SVD of the module inputs did not settle within {MAX_FORWARDS} forward passes "
            f"over {len(batches)} micro-batches",
        ) from None
    except ValueError as e:
        raise LayercardError(f"train.init: eva failed ({first_line(e)})") from e
    return {k: v.detach().float().cpu() for k, v in state.items()}


def _from_checkpoint(peft_model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """Zero components at the ranks ``checkpoint`` holds: they shape the layers its weights then fill."""
    shapes = saved_shapes(checkpoint)
    out = {}
    for name, m in _lora_modules(peft_model).items():
        shape = shapes.get(name + _A_WEIGHT)
        out[name] = torch.zeros(shape[0] if shape else 0, m.in_features)
    return out


def _on_every_process(
    accelerator: Any, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``compute()`` on the first process, its answer on all: their ranks must agree to the last one."""
    if accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [None]
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            payload = [("ok", compute())]
        except Exception as e:  # the others wait on the broadcast: they must hear of it
            error = e
            payload = [
                (
                    "error",
                    str(e) if isinstance(e, LayercardError) else f"train.init: eva failed ({first_line(e)})",
                )
            ]
    broadcast_object_list(payload, from_process=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "error":
        raise LayercardError(value)
    return value
