"""What a training run measured: the :class:`TrainMetrics` artifact (train_metrics.json) and measurements."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from layercard.artifacts import SCHEMA_VERSION, Fields, load_artifact, machine_text, other_machine, write_json
from layercard.inference import eval_mode
from layercard.tasks import Encoded, batches
from layercard.tasks.loss import forward_loss

KIND = "train_metrics"
METRICS_FILE = "train_metrics.json"


@dataclasses.dataclass(frozen=True)
class TrainMetrics:
    """train_metrics.json: the run's settings, cost measurements and loss curves.

    Curves are ``[step, loss]`` pairs. ``s_per_step`` is the median over steps that are not a session's
    first; ``predicted_*`` come from the plan (the card's cost model and the batch it was timed at).
    ``trainable_params`` counts the adapters as trained, after any rank redistribution by EVA.
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
    # Added with the memory model; files written before it lack them and read as None.
    predicted_peak_memory_mib: float | None = None
    predicted_peak_memory_scaled_mib: float | None = None
    peak_memory_ratio: float | None = None
    peak_memory_start_mib: float | None = None
    predicted_training_memory_mib: float | None = None
    training_memory_ratio: float | None = None
    predicted_quality: float | None = None
    batch_positions_per_step: float | None = None  # padded positions (batch × length) per step
    max_batch_positions: int | None = None  # the largest micro-batch's padded positions
    # Added with init: eva; older files lack them and read as None. ``init_s`` is the seconds EVA took
    # (None for the default init); ``eva_ranks`` the rank EVA gave each planned module (0: dropped).
    init: str | None = None
    init_s: float | None = None
    eva_ranks: dict[str, int] | None = None
    # Unmerged inference; older files lack them and read as None. ``forward_s`` is the fastest of three
    # no-grad forwards of the trained model, adapters unmerged, over the run's first micro-batch
    # (``forward_positions`` padded positions); ``forward_ratio`` is it over the plan's prediction at those
    # positions (``predicted_forward_scaled_s``) where the card recorded its batch's positions.
    forward_s: float | None = None
    forward_positions: int | None = None
    predicted_forward_s: float | None = None
    predicted_forward_scaled_s: float | None = None
    forward_ratio: float | None = None
    # The peak restated from the memory in use when this run began: that plus the memory the plan
    # predicted training adds (``predicted_training_memory_mib``). Older files lack them and read as None.
    predicted_peak_memory_at_start_mib: float | None = None
    peak_memory_at_start_ratio: float | None = None
    # The steps ``s_per_step`` is the median of, spread out: the fastest, 10th and 90th percentile and
    # slowest seconds, and how many. A median alone cannot tell a steady run from one whose steps moved with
    # their batch or with other load on the machine. Older files lack it and read as None.
    s_per_step_spread: dict[str, float] | None = None
    # The median over the same steps of the seconds each spent building its micro-batches and copying them
    # to the device, a part of ``s_per_step`` that the calibration's steps, on one batch already there, do
    # not time. Older files, and runs resumed from checkpoints that did not keep it, read None.
    s_per_step_data: float | None = None
    # Which of the plan's memory figures the predictions above are: "window" (the calibration placements'
    # peaks over their steps, for a run in a process that ran a calibration) or "first_step" (their first
    # steps', for one that ran none; design §5, "Where a run trains"). Older files read None.
    predicted_memory_figure: str | None = None
    # The plan's memory and step-time budgets that this run's own batches put it over, one line each
    # (:func:`over_budget`), said before its first step: a plan checks them at the positions it was priced
    # at, the card's calibration batch unless it was given a run's. Empty where they fit or the plan had
    # none; older files read None.
    budget_notes: list[str] | None = None
    # Where the plan's costs were calibrated otherwise than this run trained (activation checkpointing,
    # dtype, device or machine), one line each, said before its first step: its step time and peak were
    # then not priced like with like. Older files read None.
    price_notes: list[str] | None = None
    # What was trained, read from the adapted model, where ``plan`` is the placement as planned: ``kind``,
    # ``layers``, ``modules``, for LoRA each module's ``ranks`` and ``lora_alpha`` (EVA moves ranks and drops
    # modules), for bottleneck adapters (``--kind``) their ``bottleneck`` width. Older files read None.
    adapted: dict[str, Any] | None = None
    # The optimizer steps [first, last] of the session whose peak ``peak_memory_mib`` is, with the memory
    # at its start: a resumed run's peak is its last training session's. Older files read None.
    peak_memory_steps: list[int] | None = None
    # The optimizer steps float16's loss scaler skipped (their gradients overflowed; the weights did not
    # move on them), out of ``steps``: 0 for a run without one. Older files read None.
    skipped_steps: int | None = None
    # The steps the run was set to train (``steps`` is those it trained), whether early stopping ended it
    # before them, and, in a run that keeps its best weights (``keep_best``, early stopping), the step whose
    # weights the adapter holds and its validation loss, the lowest. Older files read None; so do
    # ``best_*`` of a run whose adapter is its last step's.
    planned_steps: int | None = None
    # The optimizer steps whose gradient norm was above ``max_grad_norm`` and clipped to it: None for a run
    # that clips none (and for older files).
    clipped_steps: int | None = None
    stopped_early: bool | None = None
    best_step: int | None = None
    best_val_loss: float | None = None

    def kept_text(self) -> str | None:
        """Which step's weights the adapter holds, where the run kept its best (``keep_best``, early
        stopping), and where early stopping ended it; None for a run that kept its last step's."""
        if self.best_step is None or self.best_val_loss is None:
            return None
        text = f"step {self.best_step}'s, the lowest validation loss ({self.best_val_loss:.4f})"
        if self.stopped_early:
            text += f"; early stopping ended the run after step {self.steps} of {self.planned_steps}"
        return text

    def clipped_text(self) -> str | None:
        """How many steps ``max_grad_norm`` clipped, for a run that clips; else None."""
        if self.clipped_steps is None:
            return None
        return (
            f"{self.clipped_steps} of {self.steps} steps (max_grad_norm {self.config.get('max_grad_norm'):g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The train_metrics.json form (key order as written)."""
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainMetrics:
        """Metrics from their JSON form (raises KeyError when a required field is missing; those added
        later, :data:`_ADDED_LATER`, read None)."""
        return cls(
            **{
                f.name: d.get(f.name) if f.name in _ADDED_LATER else d[f.name]
                for f in dataclasses.fields(cls)
                if f.name in d or f.default is dataclasses.MISSING
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write the metrics file (train_metrics.json) atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TrainMetrics:
        """Read a train_metrics.json (or a run folder holding one), checking kind, schema version and every
        field (:func:`check_train_metrics`)."""

        def build(d: dict[str, Any], file: Path) -> TrainMetrics:
            check_train_metrics(d, str(file))
            return cls.from_dict(d)

        return load_artifact(path, kind=KIND, what="train metrics", file_name=METRICS_FILE, build=build)


# Fields written after the first train_metrics.json files were, placed among the fields without a default:
# files written before them lack them, and read None.
_ADDED_LATER = ("predicted_step_time_scaled_s",)
# Fields every file has (a nullable one holds null); any other, a file written before it was recorded lacks.
_REQUIRED = frozenset(
    f.name for f in dataclasses.fields(TrainMetrics) if f.default is dataclasses.MISSING
) - set(_ADDED_LATER)
# Counts; the seconds, MiB, rates and ratios of them measured or predicted (none can be negative); the
# differences of memory figures and the quality model's fraction (either sign); the losses.
_COUNTS = ("trainable_params", "total_params", "steps", "tokens_seen", "target_tokens_seen", "resumed_from",
           "max_batch_positions", "forward_positions", "skipped_steps", "planned_steps", "clipped_steps",
           "best_step")  # fmt: skip
_AMOUNTS = (
    "epochs", "peak_memory_mib", "wall_time_s", "s_per_step", "tokens_per_s", "predicted_step_time_s",
    "batch_tokens_per_step", "predicted_step_time_scaled_s", "predicted_peak_memory_mib",
    "predicted_peak_memory_scaled_mib", "peak_memory_start_mib", "batch_positions_per_step", "init_s",
    "forward_s", "predicted_forward_s", "predicted_forward_scaled_s", "s_per_step_data", "step_time_ratio",
    "peak_memory_ratio", "forward_ratio",
)  # fmt: skip
_SIGNED = (
    "predicted_training_memory_mib", "training_memory_ratio", "predicted_quality",
    "predicted_peak_memory_at_start_mib", "peak_memory_at_start_ratio",
)  # fmt: skip
_LOSSES = ("first_train_loss", "final_train_loss", "final_val_loss", "best_val_loss")
_NOT_NULL = frozenset({"trainable_params", "total_params", "steps", "tokens_seen", "target_tokens_seen",
                       "epochs", "peak_memory_mib", "wall_time_s"})  # fmt: skip


def check_train_metrics(d: Mapping[str, Any], source: str) -> None:
    """Check a train_metrics.json dict field by field: types, counts, signs and the shapes of its curves and
    records. A field added after the first files (see the dataclass) may be missing; the others may not."""
    f = Fields(source)
    f.known(d, {x.name for x in dataclasses.fields(TrainMetrics)} | {"kind", "schema_version"})

    def field(key: str) -> Any:  # a field every file has must be there; a later one may be missing
        return f.get(d, key) if key in _REQUIRED else d.get(key)

    for key in ("provenance", "model", "config"):
        f.mapping(f.get(d, key), key)
    task = check_task_record(f, f.get(d, "task"), "task")
    for key, n in (f.optional(task.get("cut"), "task.cut", f.mapping) or {}).items():  # runs since counted
        f.integer(n, f"task.cut.{key}", minimum=0)
    f.optional(f.get(d, "val_task"), "val_task", lambda v, w: check_task_record(f, v, w))
    for key in ("adapter_kind", "adapter_dir", "peak_memory_kind", "device"):
        f.text(f.get(d, key), key)
    for key in ("init", "predicted_memory_figure"):
        f.optional(d.get(key), key, f.text)
    f.optional(d.get("stopped_early"), "stopped_early", f.flag)
    for key in ("world_size", "batch_size"):
        f.integer(f.get(d, key), key, minimum=1)
    for key in ("predicted_batch_size", "predicted_batch_tokens"):
        f.optional(f.get(d, key), key, lambda v, w: f.integer(v, w, minimum=1))
    for keys, check in (
        (_COUNTS, lambda v, w: f.integer(v, w, minimum=0)),
        (_AMOUNTS, lambda v, w: f.number(v, w, minimum=0)),
        (_SIGNED, f.number),
        # any sign: a Trainer subclass's own objective (a margin, a reward) may log a negative loss
        (_LOSSES, f.number),
    ):
        for key in keys:
            if key in _NOT_NULL:
                check(field(key), key)
            else:
                f.optional(field(key), key, check)
    for key in ("loss_curve", "val_curve"):
        _check_curve(f, f.get(d, key), key)
    _check_placement(f, f.mapping(f.get(d, "plan"), "plan"), "plan")
    f.optional(d.get("adapted"), "adapted", lambda v, w: _check_placement(f, f.mapping(v, w), w))
    f.optional(d.get("eva_ranks"), "eva_ranks", lambda v, w: _ints_by_name(f, v, w))
    f.optional(d.get("s_per_step_spread"), "s_per_step_spread", lambda v, w: _check_spread(f, v, w))
    for key in ("budget_notes", "price_notes"):
        for i, line in enumerate(f.optional(d.get(key), key, f.items) or []):
            f.text(line, f"{key}[{i}]")
    f.optional(d.get("peak_memory_steps"), "peak_memory_steps", lambda v, w: _check_session(f, v, w))


def check_task_record(f: Fields, value: Any, where: str) -> Mapping[str, Any]:
    """What an artifact records of the data it read (:meth:`layercard.tasks.Task.describe`), as far as the
    report shows it: the task's name and split, its examples and the hash of their data. Each may be null or
    missing: a run of the Trainer callback not told its task records only the card's name and hash."""
    task = f.mapping(value, where)
    for key in ("name", "split", "data_hash"):
        f.optional(task.get(key), f"{where}.{key}", f.text)
    f.optional(task.get("n_examples"), f"{where}.n_examples", lambda v, w: f.integer(v, w, minimum=0))
    return task


def _check_curve(f: Fields, value: Any, where: str) -> None:
    """A loss curve: ``[step, loss]`` pairs."""
    for i, row in enumerate(f.items(value, where)):
        if not (isinstance(row, list) and len(row) == 2):
            f.fail(f"{where}[{i}]", "must be a [step, loss] pair", row)
        f.integer(row[0], f"{where}[{i}][0]", minimum=0)
        f.number(row[1], f"{where}[{i}][1]")  # a loss, of any sign (see _LOSSES)


def _check_placement(f: Fields, d: Mapping[str, Any], where: str) -> None:
    """The placement as planned (``plan``) or as trained (``adapted``): its layers, modules and ranks."""
    for i, x in enumerate(f.items(d.get("layers", []), f"{where}.layers")):
        f.integer(x, f"{where}.layers[{i}]", minimum=0)
    f.optional(d.get("modules"), f"{where}.modules", lambda v, w: f.integer(v, w, minimum=0))
    f.optional(d.get("ranks"), f"{where}.ranks", lambda v, w: _ints_by_name(f, v, w))


def _ints_by_name(f: Fields, value: Any, where: str) -> None:
    """A mapping of module names to ranks (0: a module EVA dropped)."""
    for name, x in f.mapping(value, where).items():
        f.integer(x, f"{where}.{name}", minimum=0)


def _check_spread(f: Fields, value: Any, where: str) -> None:
    """The timed steps' spread: seconds and a count, with the percentiles the report shows."""
    spread = f.mapping(value, where)
    for key in ("p10", "p90"):
        f.get(spread, key, where)
    for key, x in spread.items():
        f.number(x, f"{where}.{key}", minimum=0)


def _check_session(f: Fields, value: Any, where: str) -> None:
    """The [first, last] optimizer steps of the session whose peak the metrics give."""
    steps = f.items(value, where)
    if len(steps) != 2:
        f.fail(where, "must be [first, last]", steps)
    first, last = (f.integer(x, f"{where}[{i}]", minimum=1) for i, x in enumerate(steps))
    if first > last:
        f.fail(where, "must be [first, last] with first <= last", steps)


def checkpointing_mismatch(predicted: dict[str, Any], on: bool) -> str | None:
    """Where a run trains with activation checkpointing set otherwise than the plan's costs were calibrated
    (``calibration_checkpointing``), what that does to its figures: "…, and the plan's costs were
    calibrated without it: expect …"; None where they agree or the plan has no calibrated costs."""
    if predicted.get("calibration_batch_size") is None:
        return None
    priced = bool(predicted.get("calibration_checkpointing", False))
    if priced == on:
        return None
    this, plan = ("with", "without") if on else ("without", "with")
    expect = "slower steps and a lower peak" if on else "faster steps and a higher peak"
    return (
        f"trains {this} activation checkpointing, and the plan's costs were calibrated {plan} it: expect "
        f"{expect} than predicted"
    )


def machine_mismatch(predicted: dict[str, Any], device_type: str, here: dict[str, Any]) -> str | None:
    """Where the plan's costs were measured on another device type than ``device_type``, or on a machine
    whose processor, CPUs, torch threads or GPU (:func:`layercard.artifacts.other_machine`) differ from
    ``here`` (:func:`layercard.artifacts.machine_info`), the line that says so; None where they agree, the
    plan has no calibrated costs, or its card did not record them."""
    if predicted.get("calibration_batch_size") is None:
        return None
    device = predicted.get("calibration_device")
    measured = predicted.get("calibration_machine") or {}
    other_device = device is not None and str(device).split(":")[0] != device_type
    differs = other_machine(measured, here, device_type)
    if not other_device and not differs:
        return None
    there = f"{device} on {machine_text(measured)}" if measured else str(device)
    why = "another device" if other_device else ", ".join(dict.fromkeys(_MACHINE_FIELDS[k] for k in differs))
    return (
        f"the plan's costs were measured on {there}; this run trains on {device_type} on "
        f"{machine_text(here)} ({why}): its steps and peak are priced for the other (measure the card "
        "here to price it)"
    )


# the machine fields :func:`other_machine` compares, as a message names them
_MACHINE_FIELDS = {
    "cuda_device": "another GPU",
    "cpu_model": "another processor",
    "processor": "another processor",
    "cpu_count": "other CPUs",
    "torch_threads": "other torch threads",
}


def predictions(
    predicted: dict[str, Any],
    s_per_step: float | None,
    tokens_per_step: float | None,
    peak_mib: float,
    start_mib: float | None,
    positions_per_step: float | None = None,
    max_positions: int | None = None,
    forward_s: float | None = None,
    forward_positions: int | None = None,
    first_step: bool = False,
    micro_batches: int | None = None,
) -> dict[str, Any]:
    """The plan's predictions beside what the run measured, as :class:`TrainMetrics` fields.

    The cost model was calibrated on the card's batch. Part of a step's time grows with the positions it
    computes (padding included), and so do the activations kept for backward, so both predictions are also
    given at this run's positions (``*_scaled``; at its real tokens where the card did not record its
    batch's positions): step time at the mean positions per step, its growing part by the card's
    ``step_time_position_share`` (all of it on cards that did not measure one), and peak memory at the
    largest micro-batch (``max_positions``), since the peak is that of the step whose activations were
    largest. The unmerged forward time is given at the positions it was timed on (``forward_positions``),
    its growing part by the card's ``forward_position_share`` (all of it where the card measured none).
    ``step_time_ratio`` is measured over the prediction as planned; ``peak_memory_ratio`` is measured
    over the scaled prediction where there is one. Memory is also compared
    as what training adds over the memory in use when it began (``start_mib``), since a training process
    may hold more or less around the model than the card's did, and the peak is restated from that start
    (``predicted_peak_memory_at_start_mib``: the start plus the predicted addition): a run in the card's
    own process starts about 100 MiB above the resident size the card measured before its probe on a CPU,
    one in a fresh process about 20 MiB above it (benchmarks/results/cost/, design §5). With
    ``first_step`` (a run in a process that ran no calibration, :func:`layercard.cost.prices_by_first_step`)
    memory is priced by the plan's first-step figure where it has one (``predicted_memory_figure``).
    """
    peak_mib = round(peak_mib, 1)  # as recorded, so the ratios reproduce from the file
    start_mib = None if start_mib is None else round(start_mib, 1)
    size = predicted.get("calibration_batch_size")
    tokens = predicted.get("calibration_batch_tokens")
    positions = predicted.get("calibration_batch_positions")
    at = priced_at(
        predicted, positions_per_step, max_positions, tokens_per_step, first_step=first_step,
        micro_batches=micro_batches,
    )  # fmt: skip
    step, step_scaled = at["step_time_s"], at["step_time_scaled_s"]
    peak, peak_scaled = at["peak_mib"], at["peak_scaled_mib"]
    figure, memory = at["figure"], at["memory"]
    peak_ref = peak_scaled or peak
    resident = memory.get("resident_mib")
    added = peak_ref - resident if peak_ref and resident else None
    at_start = start_mib + added if added is not None and start_mib is not None else None
    quality = predicted.get("quality")
    forward = predicted.get("forward_s")
    forward_share = predicted.get("forward_position_share")
    forward_share = 1.0 if forward_share is None else float(forward_share)
    forward_scale = forward_positions / positions if positions and forward_positions else None
    forward_scaled = (
        forward * (1.0 - forward_share + forward_share * forward_scale) if forward and forward_scale else None
    )
    forward_ref = forward_scaled or forward
    return {
        "predicted_step_time_s": step,
        "predicted_batch_size": int(size) if size else None,
        "predicted_batch_tokens": int(tokens) if tokens else None,
        "step_time_ratio": (s_per_step / step) if step and s_per_step else None,
        "predicted_step_time_scaled_s": step_scaled,
        "predicted_peak_memory_mib": peak,
        "predicted_peak_memory_scaled_mib": peak_scaled,
        "peak_memory_ratio": (peak_mib / peak_ref) if peak_ref else None,
        "peak_memory_start_mib": start_mib,
        "predicted_training_memory_mib": added,
        "training_memory_ratio": (peak_mib - start_mib) / added if added and start_mib is not None else None,
        "predicted_peak_memory_at_start_mib": at_start,
        "predicted_memory_figure": figure,
        "peak_memory_at_start_ratio": peak_mib / at_start if at_start and at_start > 0 else None,
        "predicted_quality": quality.get("fraction") if isinstance(quality, dict) else None,
        "batch_positions_per_step": positions_per_step,
        "max_batch_positions": max_positions,
        "forward_s": forward_s,
        "forward_positions": forward_positions,
        "predicted_forward_s": forward,
        "predicted_forward_scaled_s": forward_scaled,
        "forward_ratio": forward_s / forward_ref if forward_ref and forward_s else None,
    }


def priced_at(
    predicted: dict[str, Any],
    positions_per_step: float | None,
    max_positions: int | None,
    tokens_per_step: float | None = None,
    *,
    first_step: bool = False,
    micro_batches: int | None = None,
) -> dict[str, Any]:
    """The plan's step time and peak memory, as planned and restated at a run's batches (see
    :func:`predictions`): ``step_time_s``, ``step_time_scaled_s`` (at ``positions_per_step`` in
    ``micro_batches`` micro-batches a step, each paying the step's fixed part; or at ``tokens_per_step``
    where the card did not record its batch's positions), ``peak_mib`` and
    ``peak_scaled_mib`` (at the largest micro-batch, ``max_positions``), ``figure`` (the memory figure
    taken: ``first_step`` with ``first_step`` where the plan has it) and ``memory`` (that figure's dict)."""
    step = predicted.get("step_time_s")
    tokens = predicted.get("calibration_batch_tokens")
    positions = predicted.get("calibration_batch_positions")
    if positions and positions_per_step:
        scale: float | None = positions_per_step / positions
    else:
        scale = tokens_per_step / tokens if tokens and tokens_per_step else None
    # The card's measured share of a step that grows with positions; proportional where it measured none.
    share = predicted.get("step_time_position_share")
    share = 1.0 if share is None else float(share)
    # the plan's fixed part is for its own micro-batches a step; the run pays it for each of its own
    planned_micro = float(predicted.get("step_micro_batches") or 1)
    micro = (micro_batches or planned_micro) / planned_micro
    step_scaled = step * (micro * (1.0 - share) + share * scale) if step and scale else None
    # peak memory may be priced at other positions than a step: a run's largest micro-batch
    mem_positions = predicted.get("calibration_memory_positions") or positions
    mem_scale = max_positions / mem_positions if mem_positions and max_positions else scale
    memory = predicted.get("memory") or {}
    figure = "window" if memory else None
    if first_step and memory.get("first_step"):
        memory, figure = memory["first_step"], "first_step"
    peak = memory.get("peak_mib")
    peak_scaled = (
        peak + float(memory.get("activations_mib") or 0.0) * (mem_scale - 1.0) if peak and mem_scale else None
    )
    return {
        "step_time_s": step,
        "step_time_scaled_s": step_scaled,
        "peak_mib": peak,
        "peak_scaled_mib": peak_scaled,
        "figure": figure,
        "memory": memory,
        "positions_per_step": positions_per_step,
        "max_positions": max_positions,
    }


def over_budget(budget: str | None, predicted: dict[str, Any], at: dict[str, Any]) -> list[str]:
    """One line for each of the plan's ``memory`` and ``step_time`` budgets that a run's own batches put
    its prediction over (``at``: :func:`priced_at` at those batches); none where they fit.

    A plan checks its budgets at the positions it was priced at (the card's calibration batch, unless it
    was given a run's), but a run's peak is that of its largest micro-batch and its step time follows its
    mean positions per step. A relative budget is resolved
    against the plan's reference placement (left out where the plan did not price one)."""
    from layercard.config.budget import Budgets
    from layercard.plan.space import fits

    if not budget:
        return []
    reference = predicted.get("reference") or {}
    step_at = predicted.get("calibration_batch_positions")
    # per cost: as planned, restated at the run's batches, the run's positions and the plan's, and its words
    checks = {
        "memory": {
            "planned": at["peak_mib"], "here": at["peak_scaled_mib"], "positions": at["max_positions"],
            "plan_positions": predicted.get("calibration_memory_positions") or step_at,
            "batches": "largest micro-batch", "per": "", "verb": "puts", "cost": "peak",
            "unit": "{:,.0f} MiB",
        },
        "step_time": {
            "planned": at["step_time_s"], "here": at["step_time_scaled_s"],
            "positions": at["positions_per_step"], "plan_positions": step_at,
            "batches": "batches", "per": " per step", "verb": "put", "cost": "step time", "unit": "{:.3g} s",
        },
    }  # fmt: skip
    lines = []
    for b in Budgets.parse(budget):
        c = checks.get(b.kind)
        if c is None or (b.relative and b.kind not in reference):
            continue
        cap = b.cap(reference)
        if not c["here"] or fits(c["here"], cap):
            continue
        unit = c["unit"].format
        against = f", against the plan's {c['plan_positions']:,.0f}" if c["plan_positions"] else ""
        count = f" ({c['positions']:,.0f} padded positions{c['per']}{against})" if c["positions"] else ""
        lines.append(
            f"budget {b.label}: this run's {c['batches']}{count} {c['verb']} its predicted {c['cost']} at "
            f"{unit(c['here'])}, over the budget's {unit(cap)}; the plan checked the budget at its own "
            f"positions, where it priced {unit(c['planned'])}"
        )
    return lines


def _timed_rows(step_times: list[list[Any]]) -> list[list[Any]]:
    # A session's first step pays warm-up: left out wherever another step was timed.
    return [r for r in step_times if not r[3]] or step_times


def median_time(step_times: list[list[Any]]) -> tuple[float | None, float | None]:
    """(median s/step, tokens/s) over steps that are not a session's first (which pays warm-up)."""
    rows = _timed_rows(step_times)
    if not rows:
        return None, None
    secs = sum(r[1] for r in rows)
    return float(statistics.median(r[1] for r in rows)), (
        sum(r[2] for r in rows) / secs if secs > 0 else None
    )


def step_time_spread(step_times: list[list[Any]]) -> dict[str, float] | None:
    """The spread of the steps :func:`median_time` takes the median of: the fastest, the 10th and 90th
    percentiles and the slowest seconds, and how many steps (None without steps)."""
    secs = [float(r[1]) for r in _timed_rows(step_times)]
    if not secs:
        return None
    p10, p90 = (float(q) for q in np.percentile(secs, [10, 90]))
    return {"fastest": min(secs), "p10": p10, "p90": p90, "slowest": max(secs), "steps": len(secs)}


def data_time(step_times: list[list[Any]]) -> float | None:
    """The median seconds the steps :func:`median_time` takes spent on their data (None where any of
    them did not record it)."""
    rows = _timed_rows(step_times)
    if not rows or any(len(r) < 5 for r in rows):
        return None
    return float(statistics.median(float(r[4]) for r in rows))


def eval_loss(
    model: nn.Module, encoded: Sequence[Encoded], batch_size: int, pad_id: int, accelerator: Any
) -> float:
    """Mean CE over the target tokens of ``encoded``, no grad, eval mode (dropout off)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for b in batches(encoded, batch_size, pad_id):
            b = {k: v.to(accelerator.device) for k, v in b.items()}
            with accelerator.autocast():
                ls, n = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
            total += float(ls)
            count += n
    return total / max(count, 1)
