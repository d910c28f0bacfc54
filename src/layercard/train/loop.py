"""The training loop: a plan's adapters trained under Accelerate, checkpointed and measured.

See docs/design.md §7.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.adapters import ADAPTER_ATTR
from layercard.artifacts import (
    Fields,
    Provenance,
    artifact_hash,
    check_out_folder,
    machine_info,
    non_finite,
    remove_stale_temps,
    sha256_json,
    writer_lock,
)
from layercard.card.distributed import launched_world
from layercard.cost import (
    all_finite,
    forward_seconds,
    grad_norm,
    peak_memory,
    peak_memory_kind,
    prices_by_first_step,
    reset_peak_memory,
    touch_weights,
)
from layercard.errors import LayercardError, card_setting_text, expect, setting_name, stop_as_interrupted
from layercard.inference import synchronize
from layercard.models import BUILTIN_MODELS, LoadedModel, activation_checkpointing, running_on, weights_dtype
from layercard.plan import Plan, check_model_matches
from layercard.progress import enabled_default, say, stop_bars, track
from layercard.tasks import (
    ENCODE_AHEAD,
    Encoded,
    EncodedTask,
    Task,
    cut_note,
    encode_task,
    encoded_so_far,
    prompt_changes,
)
from layercard.tasks.loss import forward_loss, target_count
from layercard.train.checkpoints import (
    CHECKPOINT_DIR,
    RESUME_FIELDS,
    check_resumable,
    kept_random_state,
    latest_checkpoint,
    load_best,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from layercard.train.config import _MIXED_PRECISION, VALID_KINDS, TrainConfig
from layercard.train.data import Stream, launch_positions, lr_lambda, run_positions
from layercard.train.eva import eva_summary, init_eva
from layercard.train.metrics import (
    METRICS_FILE,
    TrainMetrics,
    checkpointing_mismatch,
    data_time,
    eval_loss,
    machine_mismatch,
    median_time,
    over_budget,
    predictions,
    priced_at,
    step_time_spread,
)
from layercard.train.model import ADAPTER_DIR, Adapted, check_4bit, load_4bit, write_adapter
from layercard.train.readme import adapter_readme

StepCallback = Callable[[int, float, nn.Module], None]
_DEFAULT_BOTTLENECK = 16


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training subset and the validation subset, encoded once (:func:`prepare_data`).

    Every run of the same tasks, tokenizer and data settings trains on the same encoded examples, so
    one preparation serves them all (``layercard run``: the plan's positions and every placement)."""

    task: Task
    val: Task | None
    # a list, or for a task of more than ENCODE_AHEAD examples an EncodedTask: encoded as runs read them
    encoded: Sequence[Encoded]
    val_encoded: list[Encoded]
    pad_id: int
    # what the encoding follows: the tokenizer and the settings that pick and cut the examples
    tokenizer: Any = dataclasses.field(repr=False, compare=False)
    key: tuple[Any, ...] = ()


@dataclasses.dataclass
class _State:
    """A run's progress: what a checkpoint's state.json holds besides the settings fingerprint."""

    step: int = 0
    consumed: int = 0  # micro-batches this process has taken from the stream
    loss_curve: list[list[float]] = dataclasses.field(default_factory=list)
    val_curve: list[list[float]] = dataclasses.field(default_factory=list)
    # [step, seconds, tokens, first-of-session, seconds of those spent on the step's data]; checkpoints
    # written before the last column have four
    step_times: list[list[Any]] = dataclasses.field(default_factory=list)
    tokens_seen: int = 0
    target_seen: int = 0
    positions_seen: int = 0  # padded positions (batch × length): what a step computes
    max_positions: int = 0  # the largest micro-batch's padded positions: what peak memory grows with
    skipped: int = 0  # optimizer steps float16's loss scaler skipped (overflowing gradients): no update
    clipped: int = 0  # optimizer steps whose gradient norm max_grad_norm clipped
    prior_wall: float = 0.0  # wall time of the sessions before a resume
    resumed_from: int | None = None
    init_s: float | None = None  # seconds of a data-driven init (EVA), counted once across sessions
    # The memory figures of the session that trained the steps so far, as measured at its last checkpoint
    # ({peak_mib, kind, start_mib, steps: [first, last]}): what a session that trains no step records.
    memory: dict[str, Any] | None = None
    # This session's own, never saved: the step it started from and the memory in use when its window began.
    session_from: int = 0
    memory_start: float | None = None
    # A run that keeps its best weights (``keep_best``, early stopping): [step, loss] of the lowest
    # validation loss so far, and those weights (CPU copies; a checkpoint keeps them as its best file).
    best: list[Any] | None = None
    best_weights: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)
    # early stopping ended the run at ``step``: a resumed session has nothing left to train
    stopped_early: bool = False

    @classmethod
    def from_checkpoint(cls, st: dict[str, Any]) -> _State:
        step = int(st["step"])
        return cls(
            step=step,
            consumed=int(st["micro_batches"]),
            loss_curve=st["loss_curve"],
            val_curve=st["val_curve"],
            step_times=st["step_times"],
            tokens_seen=int(st["tokens_seen"]),
            target_seen=int(st["target_tokens_seen"]),
            # checkpoints written before positions were counted: their real tokens stand in
            positions_seen=int(st.get("positions_seen", st["tokens_seen"])),
            max_positions=int(st.get("max_positions", 0)),
            skipped=int(st.get("skipped_steps") or 0),  # none before they were counted: loss scalers are rare
            clipped=int(st.get("clipped_steps") or 0),  # none before clipping existed
            prior_wall=float(st.get("wall_time_s", 0.0)),
            resumed_from=step,
            init_s=st.get("init_s"),
            memory=st.get("memory"),
            session_from=step,
            best=st.get("best"),
            stopped_early=bool(st.get("stopped_early")),
        )


@dataclasses.dataclass(frozen=True)
class _Run:
    """The fixed inputs of one training session."""

    loaded: LoadedModel
    plan: Plan
    cfg: TrainConfig
    kind: str
    layers: list[int]
    bottleneck: int
    out_dir: Path
    data: TrainData
    accelerator: Any
    stream: Stream
    total_steps: int
    fingerprint: dict[str, Any]
    t_start: float
    # the plan's budgets this run's own batches put over (:func:`_budget_notes`), said before its first step
    budget_notes: tuple[str, ...] = ()
    # where the plan's costs were calibrated otherwise than this run trains (:func:`_price_notes`)
    price_notes: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def wall(self, state: _State) -> float:
        return state.prior_wall + time.perf_counter() - self.t_start

    def checkpoint_state(self, state: _State) -> dict[str, Any]:
        return {
            "step": state.step,
            "micro_batches": state.consumed,
            "epoch": state.consumed * self.world / self.stream.per_epoch,
            "loss_curve": state.loss_curve,
            "val_curve": state.val_curve,
            "step_times": state.step_times,
            "tokens_seen": state.tokens_seen,
            "target_tokens_seen": state.target_seen,
            "positions_seen": state.positions_seen,
            "max_positions": state.max_positions,
            "skipped_steps": state.skipped,
            "clipped_steps": state.clipped,
            "wall_time_s": self.wall(state),
            "init_s": state.init_s,
            "fingerprint": self.fingerprint,
            "memory": self.session_memory(state),
            "best": state.best,
            "stopped_early": state.stopped_early,
        }

    def session_memory(self, state: _State) -> dict[str, Any]:
        """This session's peak memory so far and the steps it trained (see :attr:`_State.memory`)."""
        peak, kind = peak_memory(self.device)
        steps = [state.session_from + 1, state.step]
        return {"peak_mib": round(peak, 1), "kind": kind, "start_mib": state.memory_start, "steps": steps}


def train(
    loaded: LoadedModel,
    plan: Plan,
    train_task: Task,
    val_task: Task | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    kind: str | None = None,
    callback: StepCallback | None = None,
    data: TrainData | None = None,
    say_cut: bool = True,
) -> dict[str, Any]:
    """Train the adapters ``plan`` places; write ``adapter/`` and ``train_metrics.json``; return the metrics
    (the :class:`TrainMetrics` dict).

    ``resume`` continues from the latest checkpoint in ``out_dir``; one at the run's last step is finished
    without training, with the figures the session that trained it measured. (The command line also
    refuses a folder that holds a finished run.)
    ``kind`` overrides the plan's adapter kind (houlsby/parallel use ``plan.layers``). ``callback(step,
    loss, model)`` runs after every optimizer step (and its checkpoint) with the adapted model; an
    exception it raises stops the run like a crash would (checkpoints stay, nothing else is written).
    ``loaded.model`` is restored afterwards (LoRA unloaded, adapters removed, grad flags reset).
    ``data``: these tasks already encoded by :func:`prepare_data` for ``loaded`` and ``cfg`` (else they
    are encoded here). ``say_cut=False`` leaves out the note of examples cut to ``max_length``: a caller
    that trains several plans on one ``data`` says it once.
    """
    t_start = time.perf_counter()
    kind, layers, bottleneck = _check_inputs(loaded, plan, train_task, val_task, cfg, kind)
    if data is not None and (
        data.tokenizer is not loaded.tokenizer or data.key != _data_key(train_task, val_task, cfg)
    ):
        raise LayercardError(
            "data: prepared for other tasks, tokenizer or data settings than this run's; "
            "prepare it with the same model, tasks and train config"
        )
    out_dir = check_out_folder(out_dir)
    main = is_launch_main()
    # the run seeds the random generators for itself; the caller's draws go on as they would have
    with (
        kept_random_state(),
        writer_lock(out_dir, what="training folder") if main else contextlib.nullcontext(),
    ):
        if main:  # what a killed earlier run of this folder left half-written (its owner process is gone)
            remove_stale_temps(out_dir)
            remove_stale_temps(out_dir / CHECKPOINT_DIR)
        existing = latest_checkpoint(out_dir)
        if (out_dir / METRICS_FILE).is_file() and (existing is None or not resume):
            # under the lock: a check before it could pass for two processes, the later training over the
            # earlier's finished run (a finished run's last checkpoint is resumed to its figures instead)
            raise LayercardError(
                f"{out_dir}: holds a finished run ({METRICS_FILE}); use a new folder, or remove it to train "
                "again"
            )
        if existing is not None and not resume:
            raise LayercardError(
                f"{out_dir}: holds checkpoints of an earlier run ({existing.name}); "
                "pass --resume to continue it, or use a new --out"
            )
        # Notes are said whether or not progress is shown (--json, LAYERCARD_PROGRESS=0), as the card's
        # are: training on other sequences than the task's, or from the start, is no progress to hide.
        # With progress, before the run they concern; without, once it is done, so that a failing run
        # prints its error alone.
        notes = []
        if existing is None and resume and main:
            notes.append(f"note: --resume: no checkpoint in {out_dir}; training from the start")
        if main and (other := other_card_task(plan, train_task)):
            notes.append(f"note: {other}")
        if data is None:
            data = prepare_data(loaded, train_task, val_task, cfg)
        read_run(loaded, data, cfg, launched_world())
        cut = cut_note(encoded_so_far(data.encoded), cfg.max_length, "training", data.task.format)
        if cut and main and say_cut:
            notes.append(cut)
        shown = progress if progress is not None else enabled_default()
        for text in notes if shown else ():
            say(text, enabled=True)
        args = (loaded, plan, data, cfg, out_dir, kind, layers, bottleneck, t_start)
        # at the run's own precision; the caller's Accelerate state goes on as it was after it
        with _kept_accelerate_state():
            metrics = _train(*args, resume=resume, progress=progress, callback=callback)
        for text in notes if not shown else ():
            say(text, enabled=True)
        return metrics


# The session itself, under the folder's lock: data, model, optimizer, loop, artifacts.
def _train(
    loaded: LoadedModel,
    plan: Plan,
    data: TrainData,
    cfg: TrainConfig,
    out_dir: Path,
    kind: str,
    layers: list[int],
    bottleneck: int,
    t_start: float,
    *,
    resume: bool,
    progress: bool | None,
    callback: StepCallback | None,
) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _free_mixed_precision(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_MIXED_PRECISION[cfg.dtype])
    _check_float16(cfg, accelerator.device.type)
    world = accelerator.num_processes
    cfg = _sharded_config(accelerator, cfg, kind, resume)  # its checkpoints alone: the stream is the same
    stream, total_steps = _stream(data, cfg, world)
    fingerprint = _fingerprint(loaded, plan, cfg, kind, layers, bottleneck, data, world, total_steps)
    run = _Run(
        loaded, plan, cfg, kind, layers, bottleneck, out_dir, data, accelerator, stream, total_steps,
        fingerprint, t_start,
    )  # fmt: skip

    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        saved = check_resumable(ckpt, fingerprint)  # before any work, and before EVA trusts its ranks
        _check_resume_step(run, ckpt, saved, progress)
    run = dataclasses.replace(
        run, budget_notes=tuple(_budget_notes(run)), price_notes=tuple(_price_notes(run))
    )
    notes = [*run.budget_notes, *run.price_notes]
    # Said whether or not progress is shown (--json, LAYERCARD_PROGRESS=0), as the notes are: a warning
    # is no progress to hide. One process says them for all.
    for line in notes:
        say(f"warning: {line}", enabled=accelerator.is_main_process)
    if cfg.warmup_steps >= total_steps:  # allowed (a probe of the warm-up itself), but seldom meant
        say(
            f"warning: {setting_name('warmup_steps')} {cfg.warmup_steps} is not below the run's "
            f"{total_steps} steps: the learning rate never reaches its {cfg.lr:g}",
            enabled=accelerator.is_main_process,
        )

    # Model: the caller's base, adapted in place and restored in `finally`.
    set_seed(cfg.seed)  # LoRA A / adapter init and dropout draw from here
    base = load_4bit(loaded, accelerator.local_process_index) if cfg.load_in_4bit else loaded.model
    adapted = Adapted(base, owned=base is not loaded.model)
    try:
        eva = cfg.init == "eva"
        model = adapted.adapt(plan, kind, layers, bottleneck, cfg.seed, eva_rho=cfg.eva_rho if eva else None)
        if not cfg.load_in_4bit:
            # Before the optimizer exists, so its state lands on the params' device.
            model.to(accelerator.device)
        eva_ranks, init_s = _init_eva(run, model, ckpt, progress) if eva else (None, None)
        model.train()
        # After EVA: it changes the ranks, so the parameters the optimizer gets and the count recorded.
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise LayercardError("plan: no trainable parameters after adapting the model")
        base_weights = [n for n in trainable if ".lora_" not in n and ADAPTER_ATTR not in n.split(".")]
        if base_weights:
            # a base that came in wrapped or unfrozen would be trained itself, in place, with no error
            raise LayercardError(
                f"train: {len(base_weights)} base weights would train beside the adapters (e.g. "
                f"{base_weights[0]}); load the model afresh, with no adapter attached"
            )
        optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        state = _State()
        if ckpt is not None:
            saved = load_checkpoint(ckpt, trainable, optimizer, scheduler, fingerprint, accelerator.scaler)
            state = _State.from_checkpoint(saved)
            if state.best is not None:
                state.best_weights = load_best(ckpt, trainable)
        if init_s is not None:
            state.init_s = (state.init_s or 0.0) + init_s
        # The scheduler is stepped by hand: Accelerate's wrapper would step it once per process.
        adapted.prepared, optimizer = accelerator.prepare(model, optimizer)
        touch_weights(model)  # resident before the window opens, as when the card measured it
        state.memory_start = reset_peak_memory(accelerator.device)
        with activation_checkpointing(model, cfg.gradient_checkpointing):
            _loop(run, state, adapted.prepared, optimizer, scheduler, trainable, progress, callback)
        _check_skipped(state)
        _take_best(run, state, trainable)
        metrics = _finish(run, state, adapted, trainable, eva_ranks)
        if state.skipped and accelerator.is_main_process:
            say(
                f"note: float16's loss scaler skipped {state.skipped} of the {state.step} optimizer steps "
                f"(their gradients overflowed); the weights moved on {state.step - state.skipped}",
                enabled=True,
            )
        return metrics.to_dict()
    finally:
        adapted.restore(accelerator)


def _check_skipped(state: _State) -> None:
    """Refuse a run whose every optimizer step float16's loss scaler skipped: its adapter never moved
    from its initial weights, and would be saved and evaluated as trained."""
    if state.step and state.skipped >= state.step:
        flag = setting_name("dtype", flag="--precision")
        raise LayercardError(
            f"train: float16's loss scaler skipped all {state.step} optimizer steps (the gradients "
            f"overflowed at every scale it tried), so the adapter is untrained; train with {flag} bfloat16 "
            f"or float32. No adapter or {METRICS_FILE} was written"
        )


def sharded(accelerator: Any) -> bool:
    """Whether the launch shards the weights over its processes (FSDP, DeepSpeed): each process then
    holds a part of every parameter, and whole tensors exist only when gathered."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _sharded_config(accelerator: Any, cfg: TrainConfig, kind: str, resume: bool) -> TrainConfig:
    """``cfg`` as a sharded launch runs it: with no checkpoints (their optimizer state is sharded too, so
    none is written, and a warning says so), refusing ``--resume`` and bottleneck adapters (written from
    their own modules' weights); the LoRA adapter is gathered (:func:`_finish`)."""
    if not sharded(accelerator):
        return cfg
    how = f"under {accelerator.distributed_type.value}"
    if kind != "lora":
        raise LayercardError(
            f"--kind {kind}: {how}, only LoRA adapters are saved; train {kind} without sharding"
        )
    if resume:
        raise LayercardError(f"--resume: {how}, no checkpoints are written, so there is none to resume from")
    if cfg.keeps_best:
        raise LayercardError(
            f"{setting_name(cfg.best_setting)}: {how}, each process holds a part of every weight, and the "
            "best ones are not kept; leave it off, or train without sharding"
        )
    if cfg.checkpoint_every:
        say(
            f"warning: train.checkpoint_every {cfg.checkpoint_every}: {how}, checkpoints are not written; "
            "an interrupted run starts again",
            enabled=accelerator.is_main_process,
        )
        cfg = dataclasses.replace(cfg, checkpoint_every=0)
    return cfg


def other_card_task(plan: Plan, train_task: Task) -> str | None:
    """A line where ``train_task`` is another task than the one the plan's card measured, or the same
    under other prompt settings: the plan's predictions are for the card's. None where they agree."""
    measured_on = plan.card.get("task")
    if isinstance(measured_on, str) and measured_on != train_task.name:
        return (
            f"the plan's card was measured on task {measured_on!r}, and this run trains on "
            f"{train_task.name!r}: the plan's predictions are for the card's task"
        )
    changed = prompt_changes(plan.card.get("prompt"), train_task.format.prompt())
    if changed:
        return (
            f"the plan's card was measured with other prompt settings than this run trains with "
            f"({'; '.join(changed)}): the plan's predictions are for the card's settings"
        )
    return None


def _budget_notes(run: _Run) -> list[str]:
    """The plan's budgets that this run's batches put it over (:func:`over_budget`), before any step."""
    budget = run.plan.config.get("budget")
    if not budget:
        return []
    per_step, largest = run_positions(
        run.stream, run.total_steps, run.cfg.grad_accum, run.world, run.accelerator.process_index
    )
    first = prices_by_first_step(peak_memory_kind(run.device))
    at = priced_at(run.plan.predicted, per_step, largest, first_step=first, micro_batches=run.cfg.grad_accum)
    return over_budget(budget, run.plan.predicted, at)


def _price_notes(run: _Run) -> list[str]:
    """Where the plan's costs were calibrated otherwise than this run trains: with activation checkpointing
    set otherwise, in another dtype, or on another device or machine. Its steps and peak are then not
    priced like with like."""
    predicted = run.plan.predicted
    return [
        *_checkpointing_notes(predicted, run.cfg.gradient_checkpointing),
        *_dtype_notes(predicted, weights_dtype(run.loaded.model), run.cfg.dtype),
        *filter(None, [machine_mismatch(predicted, run.device.type, machine_info())]),
    ]


def _dtype_notes(predicted: dict[str, Any], weights: str, precision: str) -> list[str]:
    """A line where the plan's costs were calibrated in another dtype than this run computes in (its
    precision where that is not float32, else its weights'): steps and peaks differ with it."""
    calibrated = predicted.get("calibration_dtype")
    computes = precision if precision != "float32" else weights
    if calibrated is None or predicted.get("calibration_batch_size") is None or calibrated == computes:
        return []
    return [
        f"this run computes in {computes} and the plan's costs were calibrated in {calibrated}: its steps "
        f"and peak are not priced like with like (measure the card with `layercard card --dtype {computes}` "
        "to price it)"
    ]


def _checkpointing_notes(predicted: dict[str, Any], on: bool) -> list[str]:
    """A line where the plan's costs were calibrated with activation checkpointing set otherwise than this
    run trains: its steps and peak are then not priced like with like."""
    said = checkpointing_mismatch(predicted, on)
    if said is None:
        return []
    card = card_setting_text("calibrate_checkpointing")
    fix = f"measure the card with {card}" if on else "measure the card without it"
    return [f"{setting_name('gradient_checkpointing')}: this run {said} ({fix} to price it)"]


def _check_float16(cfg: TrainConfig, device_type: str) -> None:
    """Refuse float16 compute on a CPU: Accelerate turns neither float16 autocast nor its loss scaler on
    there, so the run would train in float32 and record float16."""
    if cfg.dtype == "float16" and device_type == "cpu":
        where = setting_name("dtype", flag="--precision")
        raise LayercardError(f"{where}: float16 trains on a GPU only; on a CPU use bfloat16 or float32")


@contextlib.contextmanager
def _kept_accelerate_state() -> Iterator[None]:
    """Give the process back Accelerate's shared state as it was before the run (none, or the caller's own
    Accelerator's): a run sets its precision there, which a later Accelerator of the caller's would find
    fixed, or which would switch one the caller holds. A launched process's state is the launch's."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if launch_world() > 1:
        yield
        return
    shared = [cls._shared_state for cls in (PartialState, AcceleratorState, GradientState)]
    saved = [dict(d) for d in shared]
    try:
        yield
    finally:
        for d, was in zip(shared, saved, strict=True):
            d.clear()
            d.update(was)


def _free_mixed_precision(cfg: TrainConfig) -> None:
    """Let this run set Accelerate's mixed precision where an earlier run in this process set another.

    Accelerate fixes a process's precision at its first ``Accelerator``; an earlier run's is done with, so
    in a single process its state is dropped. A launched process's precision is the launch's to set.
    """
    from accelerate.state import AcceleratorState

    wanted = _MIXED_PRECISION[cfg.dtype]
    shared = AcceleratorState._shared_state
    if not shared or shared.get("_mixed_precision", wanted) == wanted:
        return
    if launch_world() > 1 or not hasattr(AcceleratorState, "_reset_state"):
        raise cfg.fail(
            "dtype",
            f"{cfg.dtype} cannot follow the {shared.get('_mixed_precision')} mixed precision this process "
            "already trained in; train it in a new process",
        )
    AcceleratorState._reset_state()


def _finished_steps(out_dir: Path) -> int | None:
    """The steps of the finished run ``out_dir`` holds (its train_metrics.json), or None."""
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        steps = json.loads(path.read_text(encoding="utf-8")).get("steps")
    except (ValueError, AttributeError, OSError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _check_resume_step(run: _Run, ckpt: Path, saved: dict[str, Any], progress: bool | None) -> None:
    """Refuse a checkpoint past the run's last step, and one at it that cannot say what its session
    measured; say when the session will train no step."""
    step = int(saved["step"])
    if step > run.total_steps:
        raise LayercardError(
            f"{ckpt}: cannot resume: the checkpoint is at step {step}, past this run's {run.total_steps} "
            f"steps; give {step} steps or more, or use a new --out"
        )
    stopped = bool(saved.get("stopped_early"))
    if step < run.total_steps and not stopped:
        done = _finished_steps(run.out_dir)
        if done is not None and step < done:
            # a finished run whose last step was not checkpointed, resumed (by a second process): it would
            # train steps again over the finished adapter and figures. From its last step, it is extended.
            raise LayercardError(
                f"{run.out_dir}: holds a finished run of {done} steps ({METRICS_FILE}); its checkpoint "
                f"{ckpt.name} is short of them, so there is nothing to resume; use a new folder, or remove "
                "it to train again"
            )
        return
    if saved.get("memory") is None:
        raise LayercardError(
            f"{ckpt}: the run's last step is checkpointed, but the checkpoint keeps no peak memory of the "
            "session that trained it (it was written before checkpoints kept one), and this session would "
            "train no step to measure one; train the run again in a new --out"
        )
    if run.accelerator.is_main_process:
        say(
            f"note: {ckpt.name} is the run's last step{' (early stopping ended it)' if stopped else ''}: "
            f"writing its adapter and {METRICS_FILE} without training, with the peak memory the session that "
            "trained it measured",
            enabled=progress,
        )


def _init_eva(
    run: _Run, model: nn.Module, ckpt: Path | None, progress: bool | None
) -> tuple[dict[str, int], float]:
    """EVA on the adapted model (or, resuming, the checkpoint's ranks): (rank of each planned module, s)."""
    t0 = time.perf_counter()
    planned = {u.name: u.rank for u in run.plan.units}
    ranks = init_eva(model, planned, run.stream, run.cfg.eva_rho, run.accelerator, checkpoint=ckpt)
    seconds = time.perf_counter() - t0
    if ckpt is None:
        say(
            eva_summary(ranks, planned, seconds),
            enabled=progress if run.accelerator.is_main_process else False,
        )
    return ranks, seconds


def launch_world() -> int:
    """The number of processes of the distributed launch this process belongs to (1 outside one)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def is_launch_main() -> bool:
    """Whether this is the first process of a distributed launch (or no launch at all).

    The processes ``accelerate launch`` starts share one training folder: its first process alone holds
    the folder's lock and clears what a killed run left.
    """
    return int(os.environ.get("RANK", "0") or 0) == 0


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(
    loaded: LoadedModel,
    plan: Plan,
    train_task: Task,
    val_task: Task | None,
    cfg: TrainConfig,
    kind: str | None,
    where: str = "train",
) -> tuple[str, list[int], int]:
    """(adapter kind, layers, bottleneck width); refuses what would fail later, before any work. ``where``:
    the function the user called, as errors name it."""
    expect(where, "loaded", loaded, LoadedModel, "load it with layercard.load_model")
    expect(where, "plan", plan, Plan, "read plan.json with Plan.load")
    expect(where, "train_task", train_task, Task, "read it with layercard.load_task")
    expect(where, "val_task", val_task, (Task, type(None)), "read it with layercard.load_task")
    expect(where, "cfg", cfg, TrainConfig, "such as TrainConfig(steps=100)")
    kind = kind or plan.kind
    if kind not in VALID_KINDS:
        raise LayercardError(f"kind {kind!r}: unknown adapter kind; valid: {', '.join(VALID_KINDS)}")
    check_model_matches(plan, loaded)
    if cfg.load_in_4bit:
        check_4bit()
    bottleneck = check_plan_settings(plan, cfg, kind)
    if kind == "lora":
        plan.peft_config()  # fail before any work when a non-LoRA plan has no LoraConfig
    elif cfg.init != "default":
        raise cfg.fail("init", f"{cfg.init} initialises LoRA; {kind} adapters train from init: default")
    if cfg.keeps_best and val_task is None:
        raise cfg.fail(
            cfg.best_setting,
            "chooses among validations, and this run has no validation task; give it one (a held-out "
            "split, or --val-task)",
        )
    layers = list(plan.layers)
    if not layers:
        raise LayercardError("plan: no layers to adapt")
    from layercard.models import num_layers

    n = num_layers(loaded.model)
    outside = [x for x in layers if not 0 <= x < n]
    if outside:
        raise LayercardError(f"plan: layers {outside} do not exist; the model has layers 0..{n - 1}")
    return kind, layers, bottleneck


def check_plan_settings(plan: Plan, cfg: TrainConfig, kind: str | None = None, where: str = "plan") -> int:
    """The bottleneck width a run of ``kind`` (default: the plan's) trains at; refuses the plan's training
    settings that training would fail on or misread (errors start with ``where``, the plan's file)."""
    f = Fields(where)
    kind = kind or plan.kind
    width = (plan.adapter_config or {}).get("bottleneck")
    if width is not None:
        f.integer(width, "adapter_config.bottleneck", minimum=1)
    if kind == "lora" and plan.lora_config and "lora_dropout" in plan.lora_config:
        p = f.number(plan.lora_config["lora_dropout"], "lora_config.lora_dropout", minimum=0)
        if p >= 1:  # a dropout of every input would leave the LoRA nothing to learn from
            f.fail(
                "lora_config.lora_dropout", "must be a probability below 1", plan.lora_config["lora_dropout"]
            )
    return cfg.bottleneck or int(width or _DEFAULT_BOTTLENECK)


def planned_steps(cfg: TrainConfig, n_examples: int, world: int = 1) -> int:
    """The optimizer steps a run of ``cfg`` takes over ``n_examples`` training examples (after
    ``train_examples`` picked them) in ``world`` processes: ``steps``, or ``epochs`` passes."""
    if cfg.steps:
        return cfg.steps
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / (cfg.grad_accum * world)))


def _stream(data: TrainData, cfg: TrainConfig, world: int = 1) -> tuple[Stream, int]:
    """The stream and step count of the run ``cfg`` would train on ``data`` in ``world`` processes."""
    stream = Stream(data.encoded, cfg.batch_size, data.pad_id, cfg.seed, group_by_length=cfg.group_by_length)
    return stream, planned_steps(cfg, len(stream.encoded), world)


def planned_positions(data: TrainData, cfg: TrainConfig, world: int = 1) -> tuple[float, int]:
    """(mean padded positions per step, the largest micro-batch's) of the run ``cfg`` would train on
    ``data`` (:func:`prepare_data`) in ``world`` processes, from its data order alone: what a plan for it
    is priced at (with several processes, the busiest one's: :func:`launch_positions`)."""
    _fill_run(data, cfg, world)
    stream, steps = _stream(data, cfg, world)
    return launch_positions(stream, steps, cfg.grad_accum, world)


def estimate(
    loaded: LoadedModel,
    plan: Plan,
    train_task: Task,
    val_task: Task | None,
    cfg: TrainConfig,
    *,
    kind: str | None = None,
    data: TrainData | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """What :func:`train` would do with these arguments in ``processes`` processes (one per device, as
    ``accelerate launch`` starts them), without training or writing anything: its steps and epochs, the
    padded positions its micro-batches compute (from the data order alone; with several processes, those
    of the busiest one per step and the largest micro-batch of any), the plan's step time and peak memory
    priced there as training prices them, the predicted time of its optimizer steps, the plan's
    budgets that those positions put over, and the line training says where its card measured another
    task or other prompt settings (:func:`other_card_task`). A step's price leaves out the processes'
    exchange of gradients."""
    kind, _, _ = _check_inputs(loaded, plan, train_task, val_task, cfg, kind, where="estimate_training")
    # the device the training's Accelerator takes (:func:`train`): a CUDA GPU, else the CPU
    _check_float16(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    if processes < 1:
        raise LayercardError(f"processes: {processes} is not a number of processes (1 or more)")
    if data is None:
        data = prepare_data(loaded, train_task, val_task, cfg)
    read_run(loaded, data, cfg, processes)
    stream, steps = _stream(data, cfg, processes)
    per_step, largest = launch_positions(stream, steps, cfg.grad_accum, processes)
    memory_kind = peak_memory_kind(next(loaded.model.parameters()).device)
    predicted = plan.predicted or {}
    at = priced_at(
        predicted, per_step, largest, first_step=prices_by_first_step(memory_kind),
        micro_batches=cfg.grad_accum,
    )  # fmt: skip
    step_s = at["step_time_scaled_s"] or at["step_time_s"]
    cut = _cut_counts(encoded_so_far(data.encoded))
    return {
        "kind": kind,
        "steps": steps,
        "processes": processes,
        "epochs": steps * cfg.grad_accum * processes / stream.per_epoch,
        "train_examples": len(data.encoded),
        "train_examples_cut": cut["to_max_length"],
        "train_examples_clipped": cut["to_format_limits"],
        "format_limits": [data.task.format.max_input_tokens, data.task.format.max_target_tokens],
        "max_length": cfg.max_length,
        "val_examples": len(data.val_encoded),
        "positions_per_step": per_step,
        "max_positions": largest,
        "plan_positions_per_step": predicted.get("calibration_batch_positions"),
        "plan_peak_positions": predicted.get("calibration_memory_positions")
        or predicted.get("calibration_batch_positions"),
        "step_time_s": at["step_time_s"],
        "step_time_at_run_s": at["step_time_scaled_s"],
        "steps_s": steps * step_s if step_s else None,
        "peak_memory_kind": memory_kind,
        "memory_figure": at["figure"],
        "peak_memory_mib": at["peak_mib"],
        "peak_memory_at_run_mib": at["peak_scaled_mib"],
        "budget_notes": over_budget(plan.config.get("budget"), predicted, at),
        "card_note": other_card_task(plan, train_task),
    }


def _plan_section(plan: Plan) -> dict[str, Any]:
    """The plan's placement as planned, whatever ``--kind`` or EVA made of it (see ``adapted``)."""
    lora = plan.kind == "lora"
    return {
        "kind": plan.kind,
        "layers": list(plan.layers),
        "modules": len({u.name for u in plan.units}) if lora else 2 * len(plan.layers),
        "units": [u.key for u in plan.units],
        "bottleneck": None if lora else (plan.adapter_config or {}).get("bottleneck"),
        "policy": plan.config.get("policy"),
    }


def _adapted_section(run: _Run, inner: nn.Module) -> dict[str, Any]:
    """What was trained, read from the adapted model: a LoRA's modules with their rank and lora_alpha
    (EVA moves ranks and drops modules), or the bottleneck adapters' layers and width."""
    if run.kind != "lora":
        return {
            "kind": run.kind,
            "layers": sorted(run.layers),
            "modules": 2 * len(run.layers),  # one after (houlsby) or beside (parallel) each of two sublayers
            "ranks": None,
            "lora_alpha": None,
            "bottleneck": run.bottleneck,
        }
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    lora = {
        n.removeprefix(prefix): m
        for n, m in inner.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }
    layer_of = {u.name: u.layer for u in run.plan.units}
    return {
        "kind": "lora",
        "layers": sorted({layer_of[n] for n in lora if n in layer_of}),
        "modules": len(lora),
        "ranks": {n: int(m.lora_A["default"].out_features) for n, m in lora.items()},
        "lora_alpha": {n: m.lora_alpha["default"] for n, m in lora.items()},
        "bottleneck": None,
    }


def _data_key(train_task: Task, val_task: Task | None, cfg: TrainConfig) -> tuple[Any, ...]:
    val = None if val_task is None or not cfg.eval_examples else val_task.data_hash
    return (train_task.data_hash, val, cfg.train_examples, cfg.eval_examples, cfg.max_length, cfg.seed)


def _check_context(model: nn.Module, encoded: Sequence[Any], max_length: int) -> None:
    """Refuse examples longer than the model reads: past a learned position table a forward fails, and
    past any other the model reads positions it never saw."""
    from layercard.models import past_context

    longest = max((len(e.input_ids) for e in encoded), default=0)
    if (over := past_context(model, longest)) is not None:
        raise LayercardError(
            f"{setting_name('max_length')} {max_length}: {over} and an example is {longest} tokens long; "
            "give a length it reads"
        )


def read_run(loaded: LoadedModel, data: TrainData, cfg: TrainConfig, world: int = 1) -> None:
    """Encode the training examples the run ``cfg`` reads in ``world`` processes, where ``data`` holds a
    task too large to encode ahead (:class:`~layercard.tasks.EncodedTask`), and refuse one longer than
    the model reads, before any step. A task encoded ahead is left as it is."""
    if _fill_run(data, cfg, world):
        _check_context(loaded.model, encoded_so_far(data.encoded), cfg.max_length)


def _fill_run(data: TrainData, cfg: TrainConfig, world: int) -> bool:
    """Encode the examples of :func:`read_run`; whether ``data`` encodes as runs read (else it did all)."""
    if not isinstance(data.encoded, EncodedTask):
        return False
    stream, steps = _stream(data, cfg, world)
    data.encoded.fill(stream.run_indices(steps * cfg.grad_accum * world))
    return True


def prepare_data(loaded: LoadedModel, train_task: Task, val_task: Task | None, cfg: TrainConfig) -> TrainData:
    """A seeded subset of ``train_task``, encoded once; the validation subset likewise. Pass it to
    :func:`train` (``data=``) and :func:`planned_positions` to encode the examples once for many runs."""
    task = train_task.subset(cfg.train_examples, seed=cfg.seed) if cfg.train_examples else train_task
    tok = loaded.tokenizer
    pad_id = next((int(t) for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    if len(task) > ENCODE_AHEAD:  # a run may read a small part: read_run encodes that part
        encoded: Sequence[Encoded] = EncodedTask(tok, task, max_length=cfg.max_length)
    else:
        encoded = encode_task(tok, task, max_length=cfg.max_length)
        _check_context(loaded.model, encoded, cfg.max_length)
    if not len(encoded):
        raise LayercardError(f"task {task.name!r}: no training examples")
    val = (
        val_task.subset(cfg.eval_examples, seed=cfg.seed)
        if val_task is not None and cfg.eval_examples
        else None
    )
    val_encoded = encode_task(tok, val, max_length=cfg.max_length) if val is not None and len(val) else []
    _check_context(loaded.model, val_encoded, cfg.max_length)
    return TrainData(task, val, encoded, val_encoded, pad_id, tok, _data_key(train_task, val_task, cfg))


def _fingerprint(
    loaded: LoadedModel,
    plan: Plan,
    cfg: TrainConfig,
    kind: str,
    layers: list[int],
    bottleneck: int,
    data: TrainData,
    world: int,
    total_steps: int,
) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint it continues."""
    planned = {u.name: u.rank for u in plan.units} if kind == "lora" else {}
    # Validated against another set, the curve would join two kinds of figure; the hash alone would not
    # tell the user which setting moved, the count often does.
    val = data.val
    val_data = f"{len(data.val_encoded)} examples, sha256 {val.data_hash[:16]}" if val is not None else "none"
    return {
        "model_hash": loaded.model_hash,
        "weights_dtype": weights_dtype(loaded.model),
        "val_data": val_data,
        "kind": kind,
        "targets": [[n, r] for n, r in sorted(planned.items())] if kind == "lora" else layers,
        "lora_config": sha256_json(plan.lora_config) if kind == "lora" else None,
        "data_hash": data.task.data_hash,
        "world_size": world,
        "bottleneck": bottleneck if kind != "lora" else None,
        # the step budget shapes a decaying schedule, so it may change on resume only when constant
        "schedule_steps": total_steps if cfg.scheduler != "constant" else None,
        "eva_rho": cfg.eva_rho if cfg.init == "eva" else None,
        **{
            k: getattr(cfg, k)
            for k in RESUME_FIELDS
            if hasattr(cfg, k) and k not in ("bottleneck", "eva_rho")
        },
    }


def _loop(
    run: _Run,
    state: _State,
    prepared: nn.Module,
    optimizer: Any,
    scheduler: Any,
    trainable: dict[str, nn.Parameter],
    progress: bool | None,
    callback: StepCallback | None,
) -> None:
    """Optimizer steps from ``state.step`` to the end: log, validate, checkpoint, call back; after a step
    an interrupt was held in (:func:`_interrupt_after_step`), its checkpoint, then KeyboardInterrupt."""

    def checkpoint(step: int) -> None:
        state_now = run.checkpoint_state(state)
        save_checkpoint(
            run.out_dir, step, trainable, optimizer, scheduler, state_now, run.accelerator.scaler,
            best=state.best_weights,
        )  # fmt: skip

    if state.stopped_early:  # resumed at the validation that stopped it: nothing is left to train
        return

    with _interrupt_after_step(run.world == 1 and bool(run.cfg.checkpoint_every)) as interrupted:
        cfg, acc = run.cfg, run.accelerator
        first = True
        steps = range(state.step, run.total_steps)
        # one bar for the launch: every process would draw its own over the others'
        for _ in track(
            steps,
            f"train {run.kind}",
            total=run.total_steps,
            start=state.step,  # a resumed run counts on from its checkpoint's step
            enabled=progress if acc.is_main_process else False,
        ):
            loss_value = _step(run, state, prepared, optimizer, scheduler, first)
            first = False
            step = state.step
            # The first and the last step are kept whatever log_every: the run's first and final losses.
            if step == 1 or step % cfg.log_every == 0 or step == run.total_steps:
                state.loss_curve.append([step, loss_value])
            if run.data.val_encoded and cfg.eval_every and step % cfg.eval_every == 0:
                _validate(run, state, prepared, trainable, step)
            # checkpointed where it stops too, so that --resume finds the run finished
            state.stopped_early = early_stop_due(
                state.val_curve, cfg.early_stopping, cfg.early_stopping_min_delta
            )
            saved = bool(cfg.checkpoint_every) and (step % cfg.checkpoint_every == 0 or state.stopped_early)
            if saved:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    checkpoint(step)
            if callback is not None:
                callback(step, loss_value, acc.unwrap_model(prepared))
            if interrupted:
                if not saved:
                    checkpoint(step)
                stop_bars()
                say(
                    f"interrupted after step {step} of {run.total_steps}: checkpoint "
                    f"{CHECKPOINT_DIR}/step-{step} kept; --resume continues from it",
                    enabled=True,
                )
                raise KeyboardInterrupt
            if state.stopped_early:
                stop_bars()
                say(
                    f"note: early stopping: {stop_reason(state.val_curve, cfg)}; stopped after step {step} "
                    f"of {run.total_steps}",
                    enabled=acc.is_main_process,
                )
                if (fall := swing_text(state.val_curve, cfg.early_stopping_min_delta)) is not None:
                    say(
                        f"note: early stopping: the validation loss fell again after rising ({fall}), so it "
                        f"may swing rather than turn; a larger {setting_name('early_stopping')} waits out a "
                        "swing",
                        enabled=acc.is_main_process,
                    )
                break
    if run.data.val_encoded and (not state.val_curve or state.val_curve[-1][0] != state.step):
        _validate(run, state, prepared, trainable, state.step)


def patience_anchor(val_curve: Sequence[Sequence[float]], min_delta: float = 0.0) -> tuple[int, list[float]]:
    """How many validations came after the anchor early stopping counts from, and the anchor ([step, loss]):
    the first validation, or the last whose loss was more than ``min_delta`` below the anchor before it.
    At ``min_delta`` 0 the anchor is the lowest loss so far (a tie keeps the earlier), the weights a run
    that keeps its best holds."""
    anchor: list[float] = []
    since = 0
    for point in val_curve:
        if not anchor or point[1] < anchor[1] - min_delta:
            anchor, since = list(point), 0
        else:
            since += 1
    return since, anchor


def early_stop_due(val_curve: Sequence[Sequence[float]], patience: int, min_delta: float = 0.0) -> bool:
    """Whether early stopping ends a run now: ``patience`` (> 0) validations of ``val_curve`` in a row
    found no loss more than ``min_delta`` below the anchor (:func:`patience_anchor`)."""
    return patience > 0 and patience_anchor(val_curve, min_delta)[0] >= patience


def stop_reason(val_curve: Sequence[Sequence[float]], cfg: TrainConfig) -> str:
    """Why early stopping ended a run, in words: "3 validations in a row found no loss below step 20's
    1.7233"."""
    _, (step, loss) = patience_anchor(val_curve, cfg.early_stopping_min_delta)
    below = f"more than {cfg.early_stopping_min_delta:g} below" if cfg.early_stopping_min_delta else "below"
    return f"{cfg.early_stopping} validations in a row found no loss {below} step {int(step)}'s {loss:.4f}"


def swing_text(val_curve: Sequence[Sequence[float]], min_delta: float = 0.0) -> str | None:
    """Where a validation the early-stopping count ran over was lower than the one before it, the first
    such fall in words ("step 20's 0.5293 → step 25's 0.2941"): a curve that falls again after rising may
    be swinging rather than turning. None where the count ran over a steady rise."""
    since, _ = patience_anchor(val_curve, min_delta)
    counted = list(val_curve[len(val_curve) - since :]) if since else []
    for (s0, a), (s1, b) in itertools.pairwise(counted):
        if b < a:
            return f"step {int(s0)}'s {a:.4f} → step {int(s1)}'s {b:.4f}"
    return None


def _validate(
    run: _Run, state: _State, prepared: nn.Module, trainable: dict[str, nn.Parameter], step: int
) -> None:
    """The validation loss at ``step``, on the curve; in a run that keeps its best weights, a copy of them
    where it is the lowest yet (a tie keeps the earlier step's)."""
    loss = _val_loss(run, prepared, step)
    state.val_curve.append([step, loss])
    if run.cfg.keeps_best and (state.best is None or loss < state.best[1]):
        state.best = [step, loss]
        state.best_weights = {k: p.detach().to("cpu", copy=True) for k, p in trainable.items()}


def _take_best(run: _Run, state: _State, trainable: dict[str, nn.Parameter]) -> None:
    """In a run that keeps its best weights, put them back in the model for the adapter, and say so where
    they are not the last step's."""
    if state.best is None or state.best_weights is None or state.best[0] == state.step:
        return
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(state.best_weights[k].to(p.device, p.dtype))
    last = state.val_curve[-1][1]
    say(
        f"note: the adapter holds step {state.best[0]}'s weights, the lowest validation loss "
        f"({state.best[1]:.4f}; step {state.step}'s {last:.4f})",
        enabled=run.accelerator.is_main_process,
    )


@contextlib.contextmanager
def _interrupt_after_step(enabled: bool) -> Iterator[list[bool]]:
    """While ``enabled`` (one process, checkpoints on): a first Ctrl-C, or the command line's SIGTERM (a
    job scheduler's stop), is held until the step it lands in is done, so that the step can be
    checkpointed (an interrupt inside an optimizer step would leave the weights half updated); a second
    one interrupts at once. Yields a list that is non-empty once asked. A signal the process ignores or
    handles its own way is left alone, as is everything off the main thread."""
    import signal
    import threading

    asked: list[bool] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield asked
        return
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: stop_as_interrupted}
    before = {sig: signal.getsignal(sig) for sig in ours}
    held = [sig for sig, handler in ours.items() if before[sig] is handler]

    def give_back() -> None:
        for sig in held:
            signal.signal(sig, before[sig])

    def hold(_signum: int, _frame: Any) -> None:
        asked.append(True)
        give_back()

    for sig in held:
        signal.signal(sig, hold)
    try:
        yield asked
    finally:
        give_back()


def _step(
    run: _Run, state: _State, prepared: nn.Module, optimizer: Any, scheduler: Any, first: bool
) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns its loss (mean over processes)."""
    cfg, acc, device, world = run.cfg, run.accelerator, run.device, run.world
    synchronize(device)
    t0 = time.perf_counter()
    rank = acc.process_index
    micro = [run.stream.batch((state.consumed + j) * world + rank) for j in range(cfg.grad_accum)]
    n_target = sum(target_count(b["labels"]) for b in micro)
    # Built and on the device before any compute, so that their seconds can be told from the step's:
    # the calibration times steps on one batch already there.
    micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
    synchronize(device)
    data_s = time.perf_counter() - t0
    # The step's loss is the mean over the target tokens of every process's micro-batches (§7): each process
    # divides by the count over all of them, and scales by `world` because gradients are averaged over
    # processes, not added. With one process both are what they were.
    n_step = (
        int(acc.reduce(torch.tensor(n_target, device=device), reduction="sum")) if world > 1 else n_target
    )
    step_loss = torch.zeros((), device=device)
    n_tokens = n_positions = 0
    for j, b in enumerate(micro):
        n_tokens += int(b["attention_mask"].sum())
        n_positions += int(b["input_ids"].numel())
        state.max_positions = max(state.max_positions, int(b["input_ids"].numel()))
        # Gradients sync across processes only on the step's last micro-batch.
        sync = acc.no_sync(prepared) if j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with acc.autocast():  # the forward only: autocast is not for backward
                ls, _ = forward_loss(prepared, b["input_ids"], b["attention_mask"], b["labels"])
            loss = ls / max(n_step, 1)
            acc.backward(loss * world)
        step_loss += loss.detach()
    loss_value = float(acc.reduce(step_loss, reduction="sum"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Checked before the update is applied: a non-finite step must not reach the weights or a checkpoint.
    _check_finite(run, state.step + 1, "training loss", loss_value)
    if acc.scaler is None:  # under fp16 loss scaling, overflowing gradients are the scaler's to skip
        norm = grad_norm(params)
        _check_finite(run, state.step + 1, "gradient norm of the trainable parameters", norm)
        # Exactly no gradient, with targets to fit. After an update: the weights grew so large that the
        # model's output no longer depends on them (a norm overflowed inside a layer and zeroed the
        # hidden state). Before any: it never did (an alpha that scales the adapters to nothing, a model
        # whose output ignores its hidden states), and no learning rate helps. Asked of every element, not
        # of the norm, which squares a tiny gradient to 0. A shard of a sharded model may hold only
        # parameters whose gradient is still zero: not asked.
        if n_step > 0 and not sharded(acc) and not _any_gradient(params):
            if state.step == 0:
                raise LayercardError(
                    f"train: step 1 of {run.total_steps}: the gradient of the trainable parameters is "
                    "exactly zero before any update: the loss does not depend on the adapted weights (is the "
                    f"plan's alpha, {run.plan.config.get('alpha')}, too small, or does the model's output "
                    f"ignore its layers?). No adapter or {METRICS_FILE} was written"
                )
            _diverged(run, state.step + 1, "gradient of the trainable parameters is exactly zero")
    if cfg.max_grad_norm is not None:
        # Accelerate's clipping: it unscales float16's gradients first, and under a launch clips the
        # gradient every process holds after their exchange
        total = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        state.clipped += int(total > cfg.max_grad_norm)
    try:
        optimizer.step()
    except RuntimeError as e:
        # An update too large for the parameters' dtype (a huge lr) fails in the optimizer itself.
        if "overflow" not in str(e):
            raise
        _check_finite(run, state.step + 1, "update of the trainable parameters", math.inf)
    # An update float16's loss scaler skipped (overflowing gradients) does not advance the schedule.
    if acc.optimizer_step_was_skipped:
        state.skipped += 1
    else:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not all_finite(params):
        _check_finite(run, state.step + 1, "update of the trainable parameters", math.inf)
    synchronize(device)
    state.step += 1
    state.consumed += cfg.grad_accum
    state.step_times.append([state.step, time.perf_counter() - t0, n_tokens * world, first, data_s])
    state.tokens_seen += n_tokens * world
    state.positions_seen += n_positions * world
    state.target_seen += n_target * world
    return loss_value


def _val_loss(run: _Run, prepared: nn.Module, step: int) -> float:
    loss = eval_loss(prepared, run.data.val_encoded, run.cfg.batch_size, run.data.pad_id, run.accelerator)
    _check_finite(run, step, "validation loss", loss)
    return loss


def _any_gradient(params: list[nn.Parameter]) -> bool:
    """Whether any element of any parameter's gradient is non-zero."""
    return any(p.grad is not None and bool(p.grad.any()) for p in params)


def _check_finite(run: _Run, step: int, what: str, value: float) -> None:
    """Stop the run at ``step`` when ``value`` is NaN or infinite: nothing diverged may be saved."""
    if not math.isfinite(value):
        _diverged(run, step, f"{what} is {'NaN' if math.isnan(value) else 'infinite'}")


def _diverged(run: _Run, step: int, what_is: str) -> None:
    """Stop the run at ``step``, saying what diverged (``what_is``) and what was kept."""
    kept = latest_checkpoint(run.out_dir)
    left = (
        f"; the checkpoints of earlier, finite steps stay in {kept.parent} (latest {kept.name})"
        if kept is not None
        else ""
    )
    raise LayercardError(
        f"train: step {step} of {run.total_steps}: the {what_is}; training diverged "
        f"(lr={run.cfg.lr:g}; try a lower learning rate). No adapter or {METRICS_FILE} was written{left}"
    )


def _finish(
    run: _Run,
    state: _State,
    adapted: Adapted,
    trainable: dict[str, nn.Parameter],
    eva_ranks: dict[str, int] | None,
) -> TrainMetrics:
    """Measure, then (main process) write ``adapter/`` and ``train_metrics.json``."""
    acc = run.accelerator
    # Training's peak, before the forward below. A resumed run's peak is its last training session's: one
    # that trained no step measured no training, so the figures stay those its checkpoint kept.
    memory = run.session_memory(state) if state.step > state.session_from else state.memory
    assert memory is not None  # _check_resume_step refuses a checkpoint at the last step without one
    # Unmerged inference: a no-grad forward over every position, as the card's calibration times one (it
    # keeps the fastest of two passes, this the fastest of three). Every process times its own first
    # micro-batch, so that a sharded model's forward has all of them.
    first = run.stream.batch(acc.process_index)
    forward = (
        round(forward_seconds(adapted.prepared, first, warm=False, repeats=3), 4),
        first["input_ids"].numel(),
    )
    acc.wait_for_everyone()
    inner = acc.unwrap_model(adapted.prepared)
    metrics = _metrics(run, state, adapted.base, inner, trainable, memory, eva_ranks, forward)
    if (found := non_finite(metrics.to_dict())) is not None:  # before the adapter: nothing is written
        raise LayercardError(
            f"{run.out_dir / METRICS_FILE}: {found[0]} is not finite ({found[1]}); no "
            f"adapter or {METRICS_FILE} was written"
        )
    # Sharded, each process holds a part of every weight: gathered whole (every process takes part), the
    # first one writes them.
    whole = acc.get_state_dict(adapted.prepared) if sharded(acc) else None
    if acc.is_main_process:
        loaded = run.loaded
        builtin = BUILTIN_MODELS.get(loaded.model_id, {})
        readme = adapter_readme(metrics, run.plan, loaded.source, builtin.get("description"))
        write_adapter(
            run.out_dir / ADAPTER_DIR,
            run.kind,
            inner,
            adapted.aset,
            loaded.model_id,
            loaded.model_hash,
            readme,
            state_dict=whole,
            base_files=loaded.base_files,
        )
        metrics.save(run.out_dir / METRICS_FILE)
        prune_checkpoints(run.out_dir, 1)
    acc.wait_for_everyone()
    return metrics


# Longer than most functions: one keyword per TrainMetrics field, in the artifact's order.
def _metrics(
    run: _Run,
    state: _State,
    base: nn.Module,
    inner: nn.Module,
    trainable: dict[str, nn.Parameter],
    memory: dict[str, Any],
    eva_ranks: dict[str, int] | None,
    forward: tuple[float, int],
) -> TrainMetrics:
    """The run's :class:`TrainMetrics`, with the cost measurements next to the plan's predictions;
    ``memory``: the peak's figures (:attr:`_State.memory`); ``forward``: seconds of one unmerged forward
    and the padded positions it computed."""
    cfg, kind, plan, loaded, step = run.cfg, run.kind, run.plan, run.loaded, state.step
    peak, peak_kind, memory_start = float(memory["peak_mib"]), str(memory["kind"]), memory.get("start_mib")
    losses = state.loss_curve
    s_per_step, tokens_per_s = median_time(state.step_times)
    tokens_per_step = state.tokens_seen / step if step else None
    wall = run.wall(state)
    prov = Provenance.make(
        stage="train",
        model_id=loaded.model_id,
        model_hash=loaded.model_hash,
        tokenizer_hash=loaded.tokenizer_hash,
        task=run.data.task.name,
        data_hash=run.data.task.data_hash,
        config={
            **cfg.to_dict(),
            "kind": kind,
            "bottleneck": run.bottleneck,
            "device": running_on(loaded.model)["device"],  # where the step time and peak were measured
            "plan": artifact_hash(plan.to_dict()),  # as content_hash reads its plan.json
            # the settings a resumption must share (train/checkpoints.py RESUME_FIELDS), hashed
            "resume_fingerprint": sha256_json(run.fingerprint),
        },
        seed=cfg.seed,
        wall_time_s=wall,
    )
    return TrainMetrics(
        provenance=prov.to_dict(),
        adapter_kind=kind,
        adapter_dir=str(run.out_dir / ADAPTER_DIR),
        model={
            "id": loaded.model_id,
            "hash": loaded.model_hash,
            "weights_dtype": weights_dtype(base),
            "load_in_4bit": cfg.load_in_4bit,
        },
        task={**run.data.task.describe(), "cut": _cut_counts(encoded_so_far(run.data.encoded))},
        val_task=run.data.val.describe() if run.data.val is not None else None,
        config=cfg.to_dict(),
        plan=_plan_section(plan),
        trainable_params=int(sum(p.numel() for p in trainable.values())),
        total_params=int(sum(p.numel() for p in inner.parameters())),
        steps=step,
        epochs=state.consumed * run.world / run.stream.per_epoch,
        tokens_seen=state.tokens_seen,
        target_tokens_seen=state.target_seen,
        s_per_step=s_per_step,
        s_per_step_spread=step_time_spread(state.step_times),
        s_per_step_data=data_time(state.step_times),
        tokens_per_s=tokens_per_s,
        peak_memory_mib=round(peak, 1),
        peak_memory_kind=peak_kind,
        device=str(run.device),
        world_size=run.world,
        loss_curve=state.loss_curve,
        val_curve=state.val_curve,
        # a curve resumed from a checkpoint that kept only every log_every-th step may lack either
        first_train_loss=losses[0][1] if losses and losses[0][0] == 1 else None,
        final_train_loss=losses[-1][1] if losses and losses[-1][0] == step else None,
        final_val_loss=state.val_curve[-1][1] if state.val_curve else None,
        batch_size=cfg.batch_size * cfg.grad_accum,
        batch_tokens_per_step=tokens_per_step,
        resumed_from=state.resumed_from,
        wall_time_s=round(wall, 3),
        init=cfg.init,
        init_s=round(state.init_s, 3) if state.init_s is not None else None,
        eva_ranks=eva_ranks,
        budget_notes=list(run.budget_notes),
        price_notes=list(run.price_notes),
        adapted=_adapted_section(run, inner),
        peak_memory_steps=list(memory["steps"]),
        skipped_steps=state.skipped,
        clipped_steps=state.clipped if cfg.max_grad_norm is not None else None,
        planned_steps=run.total_steps,
        best_step=state.best[0] if state.best is not None else None,
        best_val_loss=state.best[1] if state.best is not None else None,
        stopped_early=state.stopped_early,
        **predictions(
            plan.predicted,
            s_per_step,
            # priced per process: each computes its own micro-batches (the counts are all processes')
            tokens_per_step / run.world if tokens_per_step else None,
            peak,
            memory_start,
            state.positions_seen / (step * run.world) if step else None,
            state.max_positions or None,
            *forward,
            first_step=prices_by_first_step(peak_kind),
            micro_batches=run.cfg.grad_accum,
        ),
    )


def _cut_counts(encoded: Sequence[Encoded]) -> dict[str, int]:
    """``TrainMetrics.task["cut"]``: the training examples cut to ``max_length`` and to the task format's
    prompt and target limits (the counts the note on them says)."""
    return {"to_max_length": sum(e.cut for e in encoded), "to_format_limits": sum(e.clipped for e in encoded)}
