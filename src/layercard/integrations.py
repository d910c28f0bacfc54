"""layercard beside a training stack of one's own: a ``transformers`` Trainer callback.

:class:`LayercardCallback` measures a run of any ``transformers.Trainer`` (or a subclass such as TRL's
``SFTTrainer``) the way ``layercard train`` measures its own, and writes the same
``train_metrics.json`` (:class:`layercard.train.TrainMetrics`) next to the plan's predictions::

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[LayercardCallback("plan.json", "run/train/mine")])

What it records:

- step time: wall time from ``on_step_begin`` to ``on_step_end`` (CUDA synchronised), the median
  over steps that are not the session's first, as ``s_per_step``; the prediction is the plan's
  ``step_time_s``, also rescaled to the run's tokens per step;
- tokens: counted by a forward pre-hook on the model during training steps (``attention_mask`` and
  ``labels``; the first position of a row predicts nothing, as in layercard's loss);
- peak memory: CUDA's peak allocation since the run began, else the process's peak RSS;
- loss: the Trainer's logged ``loss`` (per step with ``logging_steps=1``) and ``eval_loss``.

The model hash and the data hash are the plan's (the callback does not read the weights); pass
``task=`` (a layercard Task) to record the training data instead. With ``out_dir`` at
``RUN/train/NAME`` and the plan at ``RUN/plan/NAME/plan.json``, ``layercard report RUN`` shows the
run beside the plan's predictions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from layercard.artifacts import Provenance
from layercard.cost import peak_memory, prices_by_first_step, reset_peak_memory, touch_weights
from layercard.errors import LayercardError
from layercard.plan import Plan
from layercard.tasks import IGNORE_INDEX, Task
from layercard.train import METRICS_FILE, TrainMetrics
from layercard.train.metrics import median_time, predictions

__all__ = ["LayercardCallback"]


class LayercardCallback(TrainerCallback):
    """Records step time, peak memory and loss of a Trainer run against ``plan``'s predictions and
    writes ``out_dir/train_metrics.json`` when training ends (see the module docstring)."""

    def __init__(self, plan: Plan | str | Path, out_dir: str | Path, *, task: Task | None = None) -> None:
        self.plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LayercardError(f"out_dir {self.out_dir}: exists and is a file, not a folder")
        self.task = task
        self.step_times: list[list[Any]] = []
        self.loss_curve: list[list[float]] = []
        self.val_curve: list[list[float]] = []
        self.tokens = 0
        self.positions = 0
        self.max_positions = 0  # the largest micro-batch's padded positions (peak memory grows with it)
        self.targets = 0
        self._step_tokens = 0
        self._step_positions = 0
        self._t_step = 0.0
        self._t0 = 0.0
        self._first = True
        self._start_step = 0
        self._hook: Any = None
        self._device = torch.device("cpu")
        self._memory_start: float | None = None

    # ---- events ---------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()
        self._start_step = int(state.global_step)
        self._first = True
        # The Trainer's device, not the model's: under FSDP or DeepSpeed the model is still on the CPU
        # here (it is placed when the Trainer prepares it, after this event), and its memory and step
        # times would be read from the host.
        device = getattr(args, "device", None)
        if device is not None:
            self._device = torch.device(device)
        elif model is not None:
            self._device = next(model.parameters()).device
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
            touch_weights(model)  # as layercard train does before its memory window
        self._memory_start = reset_peak_memory(self._device)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not module.training:  # evaluation passes are not training tokens
            return
        mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self._step_tokens += int(mask.sum())
        elif ids is not None:
            self._step_tokens += int(ids.numel())
        if ids is not None:
            self._step_positions += int(ids.numel())
            self.max_positions = max(self.max_positions, int(ids.numel()))
        if labels is not None:
            self.targets += int((labels[:, 1:] != IGNORE_INDEX).sum())

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._t_step = time.perf_counter()
        self._step_tokens = 0
        self._step_positions = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        seconds = time.perf_counter() - self._t_step
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        self.step_times.append([int(state.global_step), seconds, self._step_tokens * world, self._first])
        self.tokens += self._step_tokens * world
        self.positions += self._step_positions * world
        self._first = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.loss_curve.append([int(state.global_step), float(logs["loss"])])
        if "eval_loss" in logs:
            self.val_curve.append([int(state.global_step), float(logs["eval_loss"])])

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(state, "is_world_process_zero", True):
            self.metrics(args, state, model).save(self.out_dir / METRICS_FILE)

    # ---- the artifact ---------------------------------------------------------------------------------
    def metrics(self, args: Any, state: Any, model: Any) -> TrainMetrics:
        """The run so far as :class:`TrainMetrics`, with exactly layercard's own fields."""
        peak, peak_kind = peak_memory(self._device)
        return TrainMetrics.from_dict(self._fields(args, state, model, peak, peak_kind))

    # One entry per TrainMetrics field, in the artifact's order: longer than most functions for that.
    def _fields(self, args: Any, state: Any, model: Any, peak: float, peak_kind: str) -> dict[str, Any]:
        plan, card = self.plan, self.plan.card
        steps = int(state.global_step)
        s_per_step, tokens_per_s = median_time(self.step_times)
        done = steps - self._start_step
        tokens_per_step = self.tokens / done if done else None
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        batch = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world
        wall = time.perf_counter() - self._t0
        config = _trainer_config(args)
        task = self.task.describe() if self.task is not None else _card_task(card)
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        return {
            "provenance": Provenance.make(
                stage="train",
                model_id=str(card.get("model_id")),
                model_hash=str(card.get("model_hash")),
                task=str(task.get("name")),
                data_hash=str(task.get("data_hash")),
                config={**config, "kind": plan.kind, "trainer": "transformers.Trainer + LayercardCallback"},
                seed=int(args.seed),
                wall_time_s=wall,
            ).to_dict(),
            "adapter_kind": plan.kind,
            "adapter_dir": str(args.output_dir),
            "model": {
                "id": card.get("model_id"),
                "hash": card.get("model_hash"),
                "weights_dtype": _dtype(model),
                "load_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
            },
            "task": task,
            "val_task": None,
            "config": config,
            "plan": {
                "kind": plan.kind,
                "layers": list(plan.layers),
                "modules": len({u.name for u in plan.units}),
                "units": [u.key for u in plan.units],
                "bottleneck": None,
                "policy": plan.config.get("policy"),
            },
            "trainable_params": int(sum(p.numel() for p in trainable)),
            "total_params": int(sum(p.numel() for p in model.parameters())) if model is not None else 0,
            "steps": steps,
            "epochs": float(state.epoch or 0.0),
            "tokens_seen": self.tokens,
            "target_tokens_seen": self.targets * world,
            "s_per_step": s_per_step,
            "tokens_per_s": tokens_per_s,
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": peak_kind,
            "device": str(self._device),
            "world_size": world,
            "loss_curve": self.loss_curve,
            "val_curve": self.val_curve,
            "first_train_loss": self.loss_curve[0][1] if self.loss_curve else None,
            "final_train_loss": self.loss_curve[-1][1] if self.loss_curve else None,
            "final_val_loss": self.val_curve[-1][1] if self.val_curve else None,
            "batch_size": batch,
            "batch_tokens_per_step": tokens_per_step,
            "resumed_from": self._start_step or None,
            "wall_time_s": round(wall, 3),
            **predictions(
                plan.predicted,
                s_per_step,
                # priced per process, as layercard's own loop prices it: each computes its own micro-batches
                tokens_per_step / world if tokens_per_step else None,
                peak,
                self._memory_start,
                self.positions / (done * world) if done else None,
                self.max_positions or None,
                first_step=prices_by_first_step(peak_kind),
                micro_batches=int(args.gradient_accumulation_steps),
            ),
        }


def _card_task(card: dict[str, Any]) -> dict[str, Any]:
    """The task the plan's card was measured on: what a run records when it is not told its own."""
    return {"name": card.get("task"), "data_hash": card.get("data_hash"), "source": "the plan's card"}


def _dtype(model: Any) -> str | None:
    from layercard.models import weights_dtype

    return None if model is None else weights_dtype(model)


def _trainer_config(args: Any) -> dict[str, Any]:
    """The Trainer settings that shape a run's cost and loss, under layercard's TrainConfig names."""
    return {
        "steps": int(args.max_steps) if args.max_steps and args.max_steps > 0 else None,
        "epochs": None if args.max_steps and args.max_steps > 0 else float(args.num_train_epochs),
        "batch_size": int(args.per_device_train_batch_size),
        "grad_accum": int(args.gradient_accumulation_steps),
        "lr": float(args.learning_rate),
        "weight_decay": float(args.weight_decay),
        "warmup_steps": int(args.warmup_steps or 0),
        "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": int(args.seed),
        "dtype": "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
    }
