"""layercard beside a training stack of one's own: a ``transformers`` Trainer callback.

:class:`LayercardCallback` measures a run of any ``transformers.Trainer`` (or a subclass such as TRL's
``SFTTrainer``) against a plan's predictions and writes the ``train_metrics.json``
(:class:`layercard.train.TrainMetrics`) that ``layercard train`` writes::

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[LayercardCallback("plan.json", "run/train/mine")])

What it records, and where it differs from ``layercard train``:

- step time: wall time from ``on_step_begin`` to ``on_step_end`` (CUDA synchronised), the median over
  steps that are not the session's first, as ``s_per_step``. It covers the step's forwards, backwards
  and optimizer update but not the loading of its batches, which the Trainer does before
  ``on_step_begin``; ``layercard train`` times that too (and records it apart as ``s_per_step_data``,
  None here). The prediction is the plan's ``step_time_s``, also rescaled to the run's padded
  positions (batch × length) per step;
- tokens: the Trainer's own count of non-padding tokens where it keeps one
  (``include_num_input_tokens_seen="non_padding"``; a checkpoint carries it over a resume), else a
  forward pre-hook on the model (``attention_mask``), which sees only this session's steps. Target
  tokens (``labels``; the first position of a row predicts nothing, as in layercard's loss) are always
  the hook's;
- peak memory: CUDA's peak allocation since the session began, else the process's peak RSS;
- loss: ``loss_curve`` and ``val_curve`` are the Trainer's ``log_history`` (``loss``, ``eval_loss``),
  the whole run's on a resume. Each ``loss`` entry is the Trainer's mean over the steps since the one
  before, so only ``logging_steps=1`` gives every step's own loss. As in ``layercard train``,
  ``first_train_loss`` is recorded only where step 1 was logged (``logging_steps=1`` or
  ``logging_first_step``) and ``final_train_loss`` only where the last step was;
- ``batch_size``: the per-device batch × ``gradient_accumulation_steps``, per process as in
  ``layercard train``;
- activation (gradient) checkpointing is recorded in the config as ``gradient_checkpointing``; where it
  is not as the plan's cost calibration trained (``card.calibrate_checkpointing``), the callback warns
  that the run's time and peak are not priced like with like.

The model must carry the plan's LoRA modules at the plan's ranks (``get_peft_model(model,
plan.peft_config())``); ``on_train_begin`` refuses any other (PEFT's EVA init may move ranks and drop
modules). A diverging run is stopped as ``layercard train`` stops one: after every step the trainable
parameters and the model's training loss are checked, and every logged ``loss`` and ``eval_loss``; at
the first that is NaN or infinite the Trainer stops without saving or evaluating that step, and
``trainer.train()`` raises a :class:`~layercard.errors.LayercardError` at its end, with no
``train_metrics.json`` written. The raise comes from ``on_train_end``, the callback's last event: the
callbacks after it (the Trainer's progress bar among them) miss that event, and the Trainer is left as an
exception inside ``train()`` leaves it; make a new one to train again.

The model hash and the data hash are the plan's (the callback does not read the weights); pass
``task=`` (a layercard Task) to record the training data instead. With ``out_dir`` at
``RUN/train/NAME`` and the plan at ``RUN/plan/NAME/plan.json``, ``layercard report RUN`` shows the
run beside the plan's predictions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from layercard.artifacts import Provenance, machine_info
from layercard.cost import peak_memory, prices_by_first_step, reset_peak_memory, touch_weights
from layercard.errors import LayercardError
from layercard.inference import synchronize
from layercard.plan import Plan
from layercard.progress import count, say
from layercard.tasks import IGNORE_INDEX, Task
from layercard.train import METRICS_FILE, TrainMetrics
from layercard.train.metrics import checkpointing_mismatch, machine_mismatch, median_time, predictions

__all__ = ["LayercardCallback"]

_PEFT_PREFIX = "base_model.model."  # PeftModel's path to the model the plan names modules in
# Segments that wrappers put into module names without changing the model: FSDP's, activation
# checkpointing's, torch.compile's.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class LayercardCallback(TrainerCallback):
    """Records step time, peak memory and loss of a Trainer run against ``plan``'s predictions and
    writes ``out_dir/train_metrics.json`` when training ends (see the module docstring)."""

    def __init__(self, plan: Plan | str | Path, out_dir: str | Path, *, task: Task | None = None) -> None:
        self.plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        self._where = "plan" if isinstance(plan, Plan) else str(plan)
        if self.plan.kind != "lora":
            raise LayercardError(
                f"{self._where}: adapter kind {self.plan.kind!r}: LayercardCallback measures a PEFT LoRA "
                "run; plan with --kind lora"
            )
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LayercardError(f"out_dir {self.out_dir}: exists and is a file, not a folder")
        self.task = task
        self._hooks: list[Any] = []
        self._device = torch.device("cpu")
        self._price_notes: list[str] = []
        self._reset()

    def _reset(self) -> None:
        """Forget any earlier ``train()``: each call is a run of its own."""
        self.step_times: list[list[Any]] = []
        self.tokens = 0
        self.positions = 0
        self.max_positions = 0  # the largest micro-batch's padded positions (peak memory grows with it)
        self.targets = 0
        # (step, what was not finite) once the run diverged
        self.diverged: tuple[int, str] | None = None
        self._step_tokens = 0
        self._step_positions = 0
        self._loss_bad: torch.Tensor | None = None
        self._t_step = 0.0
        self._t0 = time.perf_counter()
        self._first = True
        self._start_step = 0
        self._trainer_counts = False
        self._memory_start: float | None = None

    # ---- events ---------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # A run that raised never reached on_train_end: its hooks would count this run's tokens twice.
        self._remove_hooks()
        self._reset()
        self._start_step = int(state.global_step)
        # The Trainer's count covers a resumed run's earlier sessions only if they kept it too.
        self._trainer_counts = getattr(args, "include_num_input_tokens_seen", "no") == "non_padding" and (
            not self._start_step or int(getattr(state, "num_input_tokens_seen", 0) or 0) > 0
        )
        if model is not None:
            _check_adapted(self.plan, model, self._where)
        # The Trainer's device, not the model's: under FSDP or DeepSpeed the model may still be on the CPU
        # here, and its memory and step times would be read from the host.
        device = getattr(args, "device", None)
        if device is not None:
            self._device = torch.device(device)
        elif model is not None:
            self._device = next(model.parameters()).device
        if model is not None:
            self._hooks = [
                model.register_forward_pre_hook(self._count, with_kwargs=True),
                model.register_forward_hook(self._watch_loss),
            ]
            touch_weights(model)  # as layercard train does before its memory window
        self._memory_start = reset_peak_memory(self._device)
        on, priced = _checkpointing(args), bool(self.plan.predicted.get("calibration_checkpointing", False))
        if on and priced and model is not None and getattr(state, "is_world_process_zero", True):
            from layercard.models import input_gradients_on

            if input_gradients_on(model):
                # transformers' checkpointing turns them on; layercard's calibration turned them off again
                say(
                    f"warning: {self.out_dir / METRICS_FILE}: the model keeps gradients at its embeddings' "
                    "output (the Trainer's checkpointing turns them on), so every backward runs down to the "
                    "embeddings where the plan priced one that stops at the lowest adapted layer: a "
                    "placement that leaves the lower layers out steps slower than predicted"
                )
        mismatch = checkpointing_mismatch(self.plan.predicted, on)
        # recomputing activations trades time for memory: priced only where the calibration did it too;
        # and a step's time is the machine's it was measured on
        self._price_notes = [
            *([f"this run {mismatch}"] if mismatch is not None else []),
            *filter(None, [machine_mismatch(self.plan.predicted, self._device.type, machine_info())]),
        ]
        if getattr(state, "is_world_process_zero", True):
            for line in self._price_notes:
                say(f"warning: {self.out_dir / METRICS_FILE}: {line}")
        if self._start_step and getattr(state, "is_world_process_zero", True):
            which = (
                "target_tokens_seen counts"
                if self._trainer_counts
                else "tokens_seen and target_tokens_seen count"
            )
            hint = "" if self._trainer_counts else "; include_num_input_tokens_seen='non_padding' counts all"
            say(
                f"warning: {self.out_dir / METRICS_FILE}: resumed at step {self._start_step}: {which} "
                f"only this session's steps{hint}"
            )

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

    def _watch_loss(self, module: Any, args: tuple, output: Any) -> None:
        # The Trainer's logging_nan_inf_filter hides a non-finite loss from the logs; the model's own is
        # seen here. Kept on the device and read once a step, in on_step_end, which synchronises anyway.
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _sync(self) -> None:
        synchronize(self._device)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._t_step = time.perf_counter()
        self._step_tokens = 0
        self._step_positions = 0
        self._loss_bad = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._sync()
        seconds = time.perf_counter() - self._t_step
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        self.step_times.append([int(state.global_step), seconds, self._step_tokens * world, self._first])
        self.tokens += self._step_tokens * world
        self.positions += self._step_positions * world
        self._first = False
        if self.diverged is None:  # checked after the step's timing, which it would otherwise lengthen
            bad_loss = self._loss_bad is not None and bool(self._loss_bad)
            bad_params = model is not None and not _finite([p for p in model.parameters() if p.requires_grad])
            bad_loss, bad_params = _any_process([bad_loss, bad_params], self._device)
            if bad_loss or bad_params:
                what = "training loss" if bad_loss else "update of the trainable parameters"
                self._stop(int(state.global_step), f"{what} is NaN or infinite", control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        for key, what in (("loss", "logged training loss"), ("eval_loss", "validation loss (eval_loss)")):
            value = logs.get(key)
            if self.diverged is None and isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(int(state.global_step), f"{what} is {value}", control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.diverged is not None:  # the epoch's end may ask for a checkpoint of the diverged weights
            control.should_save = False
            control.should_evaluate = False

    def _stop(self, step: int, what_is: str, control: Any) -> None:
        """Stop the Trainer at ``step``: the first non-finite value (``what_is``) ends the run, and neither
        a checkpoint nor an evaluation of that step is made."""
        self.diverged = (step, what_is)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._remove_hooks()
        self._raise_if_diverged(args, state)  # in every process, so that each one's train() raises
        if not getattr(state, "is_world_process_zero", True):
            return
        self.metrics(args, state, model).save(self.out_dir / METRICS_FILE)
        if int(state.global_step) > self._start_step and not _curve(state, "loss"):
            say(
                f"warning: {self.out_dir / METRICS_FILE}: the Trainer logged no training loss in "
                f"{count(int(state.global_step), 'step')} (logging_steps {args.logging_steps}), so "
                "loss_curve is empty; logging_steps=1 records every step's loss"
            )

    def _raise_if_diverged(self, args: Any, state: Any) -> None:
        """Raise where the run diverged: nothing diverged becomes a result (as in ``layercard train``)."""
        if self.diverged is None:
            return
        step, what_is = self.diverged
        raise LayercardError(
            f"{self.out_dir / METRICS_FILE}: step {step} of {state.max_steps}: the {what_is}; training "
            f"diverged (learning_rate {args.learning_rate:g}; try a lower one). The Trainer was stopped "
            "there, with no checkpoint of that step, and no train_metrics.json was written"
        )

    # ---- the artifact ---------------------------------------------------------------------------------
    def metrics(self, args: Any, state: Any, model: Any) -> TrainMetrics:
        """The run so far as :class:`TrainMetrics`, with exactly layercard's own fields; a diverged run
        raises :class:`LayercardError`."""
        self._raise_if_diverged(args, state)
        peak, peak_kind = peak_memory(self._device)
        return TrainMetrics.from_dict(self._fields(args, state, model, peak, peak_kind))

    # One entry per TrainMetrics field, in the artifact's order: longer than most functions for that.
    def _fields(self, args: Any, state: Any, model: Any, peak: float, peak_kind: str) -> dict[str, Any]:
        plan, card = self.plan, self.plan.card
        steps = int(state.global_step)
        s_per_step, tokens_per_s = median_time(self.step_times)
        done = steps - self._start_step
        if self._trainer_counts:  # the whole run's, over every process
            tokens = int(state.num_input_tokens_seen)
            tokens_per_step = tokens / steps if steps else None
        else:
            tokens = self.tokens
            tokens_per_step = self.tokens / done if done else None
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        wall = time.perf_counter() - self._t0
        config = _trainer_config(args, state)
        task = self.task.describe() if self.task is not None else _card_task(card)
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        losses, vals = _curve(state, "loss"), _curve(state, "eval_loss")
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
            "tokens_seen": tokens,
            "target_tokens_seen": self.targets * world,
            "s_per_step": s_per_step,
            "tokens_per_s": tokens_per_s,
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": peak_kind,
            "device": str(self._device),
            "world_size": world,
            "loss_curve": losses,
            "val_curve": vals,
            # as layercard train records them: one step's loss, or none (see the module docstring)
            "first_train_loss": losses[0][1] if losses and losses[0][0] == 1 else None,
            "final_train_loss": losses[-1][1] if losses and losses[-1][0] == steps else None,
            "final_val_loss": vals[-1][1] if vals else None,
            # per process, as layercard train's: the micro-batch times the micro-batches of a step
            "batch_size": int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps),
            "batch_tokens_per_step": tokens_per_step,
            "resumed_from": self._start_step or None,
            "wall_time_s": round(wall, 3),
            "price_notes": list(self._price_notes),
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


def _curve(state: Any, key: str) -> list[list[float]]:
    """``[step, value]`` of every ``key`` in the Trainer's log history, which a resume restores."""
    history = getattr(state, "log_history", None) or []
    return [[int(h["step"]), float(h[key])] for h in history if key in h and "step" in h]


def _finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every value of ``params`` is finite: one read per device, not one per tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.numel() and p.device.type != "meta":
            flags.setdefault(p.device, []).append(torch.isfinite(p.detach()).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """``flags`` or-ed over the launch's processes: a sharded model's non-finite values may sit in one
    process's shard, and every process must stop at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _lora_ranks(model: Any) -> dict[str, int]:
    """Each LoRA module of ``model`` and its active adapter's rank, by the name the plan gives it."""
    ranks = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not len(lora_a):
            continue
        adapter = next((a for a in getattr(module, "active_adapters", ()) if a in lora_a), next(iter(lora_a)))
        rank = (getattr(module, "r", None) or {}).get(adapter)
        for segment in _WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        rank = rank if rank is not None else lora_a[adapter].out_features
        ranks[name.removeprefix(_PEFT_PREFIX)] = int(rank)
    return ranks


def _check_adapted(plan: Plan, model: Any, where: str) -> None:
    """Refuse a model whose LoRA modules or ranks are not ``plan``'s, or that trains anything else: its
    figures would be recorded against another placement's predictions. PEFT's EVA init may move ranks and
    drop modules."""
    got = _lora_ranks(model)
    want = {u.name: int(u.rank) for u in plan.units}
    fix = "build it with get_peft_model(model, plan.peft_config())"
    if not got:
        raise LayercardError(
            f"{where}: the model has no LoRA modules (a full fine-tune, or another adapter?), the plan "
            f"places {count(len(want), 'module')}; {fix}"
        )
    configs = getattr(model, "peft_config", None)
    eva = isinstance(configs, Mapping) and any(
        getattr(c, "init_lora_weights", None) == "eva" for c in configs.values()
    )
    extra = sorted(got.keys() - want.keys())
    missing = [] if eva else sorted(want.keys() - got.keys())
    parts = [
        f"{names[0]} (rank {ranks[names[0]]}) is {how}"
        + (f", and {len(names) - 1} more" if len(names) > 1 else "")
        for names, ranks, how in (
            (extra, got, "adapted but not planned"),
            (missing, want, "planned but not adapted"),
        )
        if names
    ]
    if not parts and not eva:
        ranked = [n for n in sorted(want) if got[n] != want[n]]
        parts = [f"{n} has LoRA rank {got[n]}, the plan says {want[n]}" for n in ranked[:1]]
    if parts:
        raise LayercardError(
            f"{where}: the model's LoRA modules are not the plan's ({len(got)} adapted, {len(want)} "
            f"planned): {'; '.join(parts)}; {fix}"
        )
    # modules_to_save or a trained bias: parameters the plan neither counts nor prices
    others = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if others:
        raise LayercardError(
            f"{where}: the model trains {sum(k for _, k in others):,} parameters outside its LoRA modules "
            f"({others[0][0]}"
            + (f", and {len(others) - 1} more" if len(others) > 1 else "")
            + f"), which the plan does not price (modules_to_save, a trained bias?); {fix}"
        )


def _card_task(card: dict[str, Any]) -> dict[str, Any]:
    """The task the plan's card was measured on: what a run records when it is not told its own."""
    return {"name": card.get("task"), "data_hash": card.get("data_hash"), "source": "the plan's card"}


def _dtype(model: Any) -> str | None:
    from layercard.models import weights_dtype

    return None if model is None else weights_dtype(model)


def _trainer_config(args: Any, state: Any) -> dict[str, Any]:
    """The Trainer settings that shape a run's cost and loss, under layercard's TrainConfig names (and
    ``gradient_checkpointing``, which TrainConfig lacks and which changes step time and memory)."""
    return {
        "steps": int(args.max_steps) if args.max_steps and args.max_steps > 0 else None,
        "epochs": None if args.max_steps and args.max_steps > 0 else float(args.num_train_epochs),
        "batch_size": int(args.per_device_train_batch_size),
        "grad_accum": int(args.gradient_accumulation_steps),
        "lr": float(args.learning_rate),
        "weight_decay": float(args.weight_decay),
        # the steps the Trainer warms up over: warmup_steps below 1 is a share of the run's steps
        "warmup_steps": int(args.get_warmup_steps(int(state.max_steps))),
        "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": int(args.seed),
        "dtype": "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
        "gradient_checkpointing": _checkpointing(args),
    }


def _checkpointing(args: Any) -> bool:
    """Whether the Trainer recomputes activations in backward (``activation_checkpointing``, which newer
    ``transformers`` also answers to under its former name ``gradient_checkpointing``)."""
    on = getattr(args, "activation_checkpointing", None)
    return bool(on if on is not None else getattr(args, "gradient_checkpointing", False))
