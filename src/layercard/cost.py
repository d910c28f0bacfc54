"""Non-additive cost model (docs/design.md §5), calibrated from short measured runs.

With a frozen base, backward only has to reach the lowest adapted layer, so a LoRA training step
costs t(S) ≈ a + b·(L − min S) + c·modules(S) + e·params(S): a forward plus head, a per-layer backward,
a per-adapted-module overhead and the adapters' own compute and optimizer work, which grows with
rank × (d_in + d_out). The non-negative coefficients are fitted from timed steps of real PEFT LoRA
placements on the user's machine (one of them at a higher rank, so the rank term is identified); train
reports the measured step time next to this prediction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from layercard.errors import LayercardError
from layercard.progress import track


@dataclasses.dataclass(frozen=True)
class CostModel:
    intercept_s: float
    per_layer_backward_s: float
    per_module_s: float
    n_layers: int
    batch_size: int
    batch_tokens: int
    measured: list[dict[str, Any]]
    device: str
    per_mparam_s: float = 0.0  # per million adapter parameters (cards made before the rank term: 0)

    def step_time(self, layers: Sequence[int], modules: int, params: int = 0) -> float:
        """Predicted seconds per step: ``modules`` adapters with ``params`` parameters on ``layers``."""
        if not layers:
            return 0.0
        depth = self.n_layers - min(layers)
        return (
            self.intercept_s
            + self.per_layer_backward_s * depth
            + self.per_module_s * modules
            + self.per_mparam_s * params / 1e6
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["formula"] = (
            "t = intercept_s + per_layer_backward_s·(L − min S) + per_module_s·modules"
            " + per_mparam_s·params/1e6"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        fields = [f for f in dataclasses.fields(cls)]
        return cls(**{f.name: d[f.name] for f in fields if f.name in d or f.default is dataclasses.MISSING})


def _time_steps(
    model, targets: list[str], batch: dict[str, torch.Tensor], steps: int, rank: int = 8
) -> float:
    from peft import LoraConfig, get_peft_model

    from layercard.tasks.loss import loss_sum

    device = next(model.parameters()).device
    requires = [p.requires_grad for p in model.parameters()]
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    )
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        times = []
        for i in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = peft_model(input_ids=ids, attention_mask=mask, use_cache=False)
            loss, n = loss_sum(out.logits, labels)
            (loss / max(n, 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first step pays one-off allocation costs
                times.append(time.perf_counter() - t)
        # Interference from other work only ever adds time, so the fastest step is the best estimate.
        return float(np.min(times))
    finally:
        peft_model.unload()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


def calibrate(
    model, tokenizer, batch: dict[str, torch.Tensor], roles: Sequence[str], *, steps: int = 2, progress=None
) -> CostModel:
    """Time LoRA steps (top layer alone, bottom layer alone, middle layer, all layers at rank 8, all layers at
    rank 32) and fit the cost model's coefficients."""
    from layercard import models

    n_layers = models.num_layers(model)
    everything = list(range(n_layers))
    configs: list[tuple[list[int], int]] = [([n_layers - 1], 8), ([0], 8), (everything, 8), (everything, 32)]
    if n_layers > 2:
        configs.insert(2, ([n_layers // 2], 8))
    rows = []
    was_training = model.training
    model.train()
    try:
        for layers, rank in track(configs, "cost calibration", total=len(configs), enabled=progress):
            specs = models.units(model, roles, layers=layers)
            if not specs:
                raise LayercardError(f"cost calibration: no units for roles {list(roles)} in layers {layers}")
            t = _time_steps(model, [s.name for s in specs], batch, steps, rank)
            params = sum(rank * (s.d_in + s.d_out) for s in specs)
            rows.append(
                {
                    "layers": layers,
                    "modules": len(specs),
                    "rank": rank,
                    "params": params,
                    "s_per_step": round(t, 4),
                }
            )
    finally:
        model.train(was_training)
    x = np.array([[1.0, n_layers - min(r["layers"]), r["modules"], r["params"] / 1e6] for r in rows])
    y = np.array([r["s_per_step"] for r in rows])
    # Non-negative least squares: each term is a time, and timing noise must not make one negative.
    from scipy.optimize import nnls

    coef, _ = nnls(x, y)
    device = str(next(model.parameters()).device)
    return CostModel(
        intercept_s=float(coef[0]),
        per_layer_backward_s=float(coef[1]),
        per_module_s=float(coef[2]),
        per_mparam_s=float(coef[3]),
        n_layers=n_layers,
        batch_size=int(batch["input_ids"].shape[0]),
        batch_tokens=int(batch["attention_mask"].sum()),
        measured=rows,
        device=device,
    )
