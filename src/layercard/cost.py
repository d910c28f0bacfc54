"""Non-additive cost model (docs/design.md §5), calibrated from short measured runs.

With a frozen base, backward only has to reach the lowest adapted layer, so a LoRA training step
costs t(S) ≈ a + b·(L − min S) + c·modules(S) + e·params(S): a forward plus head, a per-layer backward,
a per-adapted-module overhead and the adapters' own compute and optimizer work, which grows with
rank × (d_in + d_out). Peak training memory has the same shape: the loaded model, the activations kept
for backward from the lowest adapted layer up, a per-module term and the adapters' weights, gradients and
optimizer state per parameter. Unmerged inference adds a per-module cost to a forward pass. The
non-negative coefficients are fitted from timed steps of real PEFT LoRA placements on the user's machine
(one of them at a higher rank, so the rank terms are identified); train reports what it measured next to
these predictions.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layercard.errors import LayercardError
from layercard.inference import eval_mode, restore_modes, synchronize, training_modes
from layercard.progress import track

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# Whether the last reset of this process's resident high-water mark failed (a /proc it may not write):
# its peaks are then the lifetime's, and are named so.
_RESET_FAILED = {"cpu": False}
# Whether this process has run a cost calibration. On a CPU its steps widen the heap that a later training
# run in the same process starts from and peaks in; a process of its own does not carry that.
_calibrated_here = False


def prices_by_first_step(memory_kind: str) -> bool:
    """Whether a training run in this process is priced by the memory terms fitted to the calibration
    placements' first steps (:attr:`CostModel.memory_first_step`) rather than their windows' peaks: where
    the peak is the process's resident size and this process ran no calibration."""
    return memory_kind == "process_peak_rss" and not _calibrated_here


def memory_figure(cost: dict[str, Any] | None, setting: str = "auto") -> str:
    """The memory figure a plan prices peaks by: ``setting`` (``window`` or ``first_step``), or for ``auto``
    the one a training run in this process would take (:func:`prices_by_first_step`). ``first_step`` needs
    a card that kept those terms (:attr:`CostModel.memory_first_step`); without them every figure is the
    window's."""
    cost = cost or {}
    if not cost.get("memory_first_step"):
        return "window"
    if setting == "auto":
        kind = cost.get("memory_kind")
        return "first_step" if kind and prices_by_first_step(kind) else "window"
    return setting


def figure_elsewhere(cost: dict[str, Any] | None) -> str:
    """The memory figure a training run in another process (one that runs no calibration) takes: what
    ``auto`` resolves to there, for a plan made in this process to be trained later by another."""
    # auto's rule where the training process ran no calibration; memory_figure checks the card's terms
    rss = (cost or {}).get("memory_kind") == "process_peak_rss"
    return memory_figure(cost, "first_step" if rss else "window")


def peak_of(memory: dict[str, Any] | None, figure: str | None) -> float | None:
    """The predicted peak (MiB) in a :meth:`CostModel.memory` dict by ``figure`` (None without one)."""
    if not memory:
        return None
    if figure == "first_step" and memory.get("first_step"):
        return memory["first_step"]["peak_mib"]
    return memory.get("peak_mib")


def peak_text(memory: dict[str, Any], figure: str | None) -> str:
    """A plan's predicted peak as printed: MiB, what it measures (a process's resident peak counts the
    whole process; CUDA's allocator leaves out its context and cache), and where it is the first steps'
    figure, that it holds for a training process of its own."""
    notes = [memory_kind_text(memory["kind"])] if memory.get("kind") else []
    if figure == "first_step":
        notes.append("the first steps' figure, for training in a process that runs no calibration")
    return f"{peak_of(memory, figure):,.0f} MiB" + (f" ({'; '.join(notes)})" if notes else "")


def touch_weights(model: torch.nn.Module) -> None:
    """Read every parameter once, so memory-mapped weights are resident before memory is measured.

    A model loaded from safetensors may still be on disk page by page; the first forward pulls it in.
    Measuring the memory in use before that would count the weights in what the run adds in one process
    and in the starting memory in another.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu" and p.numel():
                # one read per 4 KiB page, whatever the element size
                p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()


def memory_in_use(device: torch.device) -> float | None:
    """The memory in use now (MiB): CUDA's allocated, or on Linux the resident size once the freed heap is
    handed back to the system; None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if not _STATUS.exists():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the resident size may then include freed but cached heap
    return _status_mib("VmRSS")


def reset_peak_memory(device: torch.device) -> float | None:
    """Start a new peak-memory window and return the memory in use at its start (MiB); None where only
    the process's lifetime peak can be read.

    CUDA resets its allocator's counter. On Linux the freed heap is first handed back to the system
    (otherwise it stays resident and hides the next window's peak) and the resident high-water mark is
    set to the current resident size.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    if not (_STATUS.exists() and _CLEAR_REFS.exists()):
        return None
    start = memory_in_use(device)
    try:
        _CLEAR_REFS.write_text("5", encoding="utf-8")
    except OSError:
        _RESET_FAILED["cpu"] = True
        return None
    _RESET_FAILED["cpu"] = False
    return start


def _status_mib(field: str) -> float | None:
    text = _STATUS.read_text(encoding="utf-8", errors="replace") if _STATUS.exists() else ""
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) / 2**10 if m else None


def peak_memory_kind(device: torch.device) -> str:
    """What :func:`peak_memory` measures on ``device``: CUDA's allocator peak; on a CPU the process's
    resident peak since the last reset, or, where the system offers no reset (outside Linux) or it failed,
    since the process began (``process_lifetime_peak_rss``: a run's peak then includes all the process did
    before it)."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    windowed = _STATUS.exists() and _CLEAR_REFS.exists() and not _RESET_FAILED["cpu"]
    return "process_peak_rss" if windowed else "process_lifetime_peak_rss"


KIND_TEXT = {
    "process_peak_rss": "process's resident peak",
    "process_lifetime_peak_rss": "process's resident peak since it began, not this run's alone",
    "cuda_max_memory_allocated": "CUDA allocator's peak",
}


def memory_kind_text(kind: str | None) -> str:
    """What a peak of ``kind`` (:func:`peak_memory_kind`) measures, in words."""
    return KIND_TEXT.get(kind or "", kind or "unknown")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what was measured) since the last :func:`reset_peak_memory` where it succeeded.

    CUDA: the allocator's maximum allocated. Elsewhere the process's peak resident size (the whole process:
    Python, libraries and the loaded model included), read from /proc on Linux, else the lifetime peak.
    """
    kind = peak_memory_kind(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, kind
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm, kind
    import resource  # Unix only; imported here so that the rest of layercard imports anywhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (2**20 if sys.platform == "darwin" else 2**10), kind


def _counted(modules: int, width: float | None, mean_width: float | None) -> float:
    """``modules`` adapted modules of ``width`` in all, counted in modules of ``mean_width`` (the
    calibration's) where both are known, else one by one."""
    if width is None or not mean_width:
        return float(modules)
    return float(width) / float(mean_width)


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
    # Peak training memory, MiB (None on cards calibrated before memory was measured). memory_base_mib is
    # the memory in use before the steps (``memory_resident_mib``: the loaded model and the process around
    # it) plus the fitted constant part of what training adds.
    memory_resident_mib: float | None = None
    memory_base_mib: float | None = None
    memory_per_layer_mib: float | None = None
    memory_per_module_mib: float | None = None
    memory_per_mparam_mib: float | None = None
    memory_kind: str | None = None
    # The mean input width (d_in) of the calibration placements' adapted modules. Where it was recorded, the
    # module term counts an adapted module as its d_in over this: what a module keeps for its backward
    # grows with its input, and a placement of the MLP's down projections keeps more than one of as many
    # q,v projections. On the calibration's placements, which adapt every role, that sum equals the count.
    # None (cards calibrated before it): the module term is the count.
    memory_module_width: float | None = None
    # The memory in use before the card's probe pass, where memory_resident_mib is the larger of it and
    # what the card's process held once its calibration was done (None on cards made before it was kept).
    memory_resident_before_mib: float | None = None
    # Unmerged inference: seconds of one no-grad forward over the calibration batch.
    forward_base_s: float | None = None
    forward_per_module_s: float | None = None
    # Padded positions of the calibration batch (batch × length): compute and activations scale with
    # these, not with the real tokens (None on cards made before it was recorded).
    batch_positions: float | None = None
    # The padded positions of the micro-batch peak memory is priced at, where :meth:`at_positions` moved it
    # apart from the step's (a run's largest micro-batch against its mean step); None: batch_positions.
    memory_positions: float | None = None
    # How much of a step grows with the positions it computes, from the all-layer placement timed again on
    # half the calibration batch: the share of its step time, and of the memory training adds, that a line
    # through the two batches puts on the positions (0: none, 1: all). None on cards made before it was
    # measured: step time is then taken as proportional to positions and the activations as the depth term.
    step_position_share: float | None = None
    memory_position_share: float | None = None
    batch_scaling: dict[str, Any] | None = None  # the two measurements the shares come from
    # Micro-batches a step's time is priced for (gradient accumulation): the part of a step that does not
    # grow with positions (kernel launches, per-pass overheads) is paid once per micro-batch, so the step
    # time is m·(1 − share) + share·k times the calibration's, not 1 − share + share·k.
    step_micro_batches: int = 1
    # The same share for the unmerged forward, from the base model's forward on the calibration batch and
    # on half of it. None on cards made before it was measured: forward time is then taken as proportional
    # to positions.
    forward_position_share: float | None = None
    # The LoRA dropout the calibration placements trained with. Dropout makes every adapted module keep a
    # dropped copy of its input, and its random draws cost time, so costs hold for plans of this dropout
    # (cards made before it was recorded: 0).
    dropout: float = 0.0
    # Whether the calibration placements trained with activation checkpointing: each decoder layer then
    # keeps only its input for backward and recomputes its forward there, so steps are slower and peaks
    # lower, and costs hold for runs trained the same way (cards made before it was recorded: off).
    checkpointing: bool = False
    # The dtype the calibration placements' weights computed in (float32, bfloat16): steps and peaks hold
    # for runs that compute in it. None on cards made before it was recorded.
    dtype: str | None = None
    # The mean width (d_in + d_out) of the calibration placements' adapted modules. Where it was recorded,
    # step time's module term counts an adapted module as its width over this: a module's work grows with
    # the rows and columns it reads and writes, and a q,v projection does less than a down projection. On
    # the calibration's placements, which adapt every role, that sum equals the count. None (cards
    # calibrated before it): the module term is the count.
    step_module_width: float | None = None
    # The memory terms refitted to each calibration placement's first step (its peak plus the optimizer
    # state it made) instead of its window's peak, with that figure's own position share: the keys of the
    # memory terms above they replace. On a CPU a process that ran a calibration holds a heap that the
    # window's later steps widen, and a process of its own does not: its runs peaked where this prices them
    # (benchmarks/results/cost, design §5, "Where a run trains"). None on cards made before it was kept.
    memory_first_step: dict[str, float | None] | None = None

    def first_step_model(self) -> CostModel | None:
        """This model with :attr:`memory_first_step`'s memory terms in place of its own, or None."""
        if not self.memory_first_step:
            return None
        return dataclasses.replace(self, **self.memory_first_step, memory_first_step=None)

    def step_modules(self, modules: int, width: float | None = None) -> float:
        """Step time's module term: ``modules`` adapted modules of ``width`` = Σ (d_in + d_out) in all,
        counted in modules of the calibration's mean width where the card recorded it, else one by one."""
        return _counted(modules, width, self.step_module_width)

    def step_time(
        self, layers: Sequence[int], modules: int, params: int = 0, width: float | None = None
    ) -> float:
        """Predicted seconds per step: ``modules`` adapters with ``params`` parameters on ``layers``;
        ``width``: Σ (d_in + d_out) over the adapted modules (see :meth:`step_modules`)."""
        if not layers:
            return 0.0
        depth = self.n_layers - min(layers)
        return (
            self.intercept_s
            + self.per_layer_backward_s * depth
            + self.per_module_s * self.step_modules(modules, width)
            + self.per_mparam_s * params / 1e6
        )

    @property
    def has_memory(self) -> bool:
        return self.memory_base_mib is not None

    def memory_modules(self, modules: int, input_width: float | None = None) -> float:
        """The memory's module term: ``modules`` adapted modules whose inputs are ``input_width`` wide in
        all (Σ d_in), counted in modules of the calibration's mean input width where the card recorded it,
        else counted one by one."""
        return _counted(modules, input_width, self.memory_module_width)

    def peak_memory(
        self, layers: Sequence[int], modules: int, params: int = 0, input_width: float | None = None
    ) -> float | None:
        """Predicted peak training memory (MiB) at the batch this model prices (the calibration's, or the
        one :meth:`at_batch` / :meth:`at_positions` moved it to), or None if it was not measured.
        ``input_width``: Σ d_in over the adapted modules (see :meth:`memory_modules`)."""
        if not self.has_memory:
            return None
        depth = self.n_layers - min(layers) if layers else 0
        return (
            float(self.memory_base_mib)  # type: ignore[arg-type]
            + float(self.memory_per_layer_mib or 0.0) * depth
            + float(self.memory_per_module_mib or 0.0) * self.memory_modules(modules, input_width)
            + float(self.memory_per_mparam_mib or 0.0) * params / 1e6
        )

    def memory(
        self, layers: Sequence[int], modules: int, params: int = 0, input_width: float | None = None
    ) -> dict[str, Any] | None:
        """Predicted peak training memory and its activation part (MiB, at the calibration batch), or None.

        The activation part is what grows with positions per step, so a run with another batch can rescale
        it: the measured share of what training adds where the card measured one, else the depth term.
        """
        peak = self.peak_memory(layers, modules, params, input_width)
        if peak is None:
            return None
        depth = self.n_layers - min(layers) if layers else 0
        resident = float(self.memory_resident_mib or 0.0)
        if self.memory_position_share is not None:
            activations = self.memory_position_share * max(peak - resident, 0.0)
        else:
            activations = float(self.memory_per_layer_mib or 0.0) * depth
        out: dict[str, Any] = {"peak_mib": peak, "activations_mib": activations, "resident_mib": resident}
        if self.memory_kind is not None:  # what the peak is: a process's resident size, or CUDA's allocated
            out["kind"] = self.memory_kind
        first = self.first_step_model()
        if first is not None:  # what a run in a process that ran no calibration is priced by
            out["first_step"] = first.memory(layers, modules, params, input_width)
        return out

    def at_batch(self, rows: int) -> CostModel:
        """This model priced at ``rows`` sequences per micro-batch instead of its calibration batch's (the
        sequences as long as the calibration's): only the measured shares of a step's time and of the memory
        training adds grow with the batch; cards without those shares take the earlier rule (time in
        proportion, the depth term as the activations). The shares are restated at the new batch, so that a
        run's own rescaling from it (``train.metrics.predictions``) gives what it would from the card's.
        The unmerged forward time grows by its own measured share (in proportion on cards without one)."""
        if rows < 1:
            raise LayercardError(f"batch_size {rows}: must be ≥ 1")
        k = rows / self.batch_size
        if k == 1.0:
            return self
        return dataclasses.replace(self._scaled(k, k), batch_size=rows)

    def at_positions(self, step: float | None, peak: float | None, micro_batches: int = 1) -> CostModel:
        """This model priced at other padded positions: step time and the unmerged forward at ``step``
        positions per step (all of its ``micro_batches``), peak memory at a largest micro-batch of ``peak``
        positions; None keeps the model's own (``step``: ``micro_batches`` calibration batches). A run's
        positions follow its data, so a plan for it is priced at them (``layercard run``: its training
        stream's)."""
        if micro_batches < 1:
            raise LayercardError(f"micro_batches {micro_batches}: must be ≥ 1")
        if step is None and peak is None and micro_batches == 1:
            return self
        if step is None and peak is None:  # m calibration batches a step: no positions needed
            return self._scaled(float(micro_batches), 1.0, micro_batches)
        if self.batch_positions is None:
            raise LayercardError(
                "positions: this card's cost model did not record its calibration batch's positions; "
                "make the card again to price other positions"
            )
        for name, v in (("step_positions", step), ("peak_positions", peak)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise LayercardError(f"{name} {v}: must be a positive finite number")
        own = float(self.memory_positions or self.batch_positions)
        k_step = float(micro_batches) if step is None else step / self.batch_positions
        return self._scaled(k_step, 1.0 if peak is None else peak / own, micro_batches)

    def _scaled(self, k: float, k_mem: float, micro_batches: int = 1) -> CostModel:
        """Step time and the forward priced at ``k`` times the positions they are at, in
        ``micro_batches`` times the micro-batches, peak memory at ``k_mem`` times its own (see
        :meth:`at_batch`)."""
        bp = self.batch_positions
        own = None if bp is None else float(self.memory_positions or bp)
        memory_positions = None if own is None or own * k_mem == bp * k else own * k_mem
        s = 1.0 if self.step_position_share is None else float(self.step_position_share)
        f = micro_batches * (1.0 - s) + s * k
        changes: dict[str, Any] = {
            "step_micro_batches": self.step_micro_batches * micro_batches,
            "intercept_s": self.intercept_s * f,
            "per_layer_backward_s": self.per_layer_backward_s * f,
            "per_module_s": self.per_module_s * f,
            "per_mparam_s": self.per_mparam_s * f,
            "batch_tokens": round(self.batch_tokens * k),
            # unrounded: a run's mean positions per step, which its own rescaling then divides by
            "batch_positions": None if bp is None else bp * k,
            "memory_positions": memory_positions,
        }
        if self.step_position_share is not None:
            changes["step_position_share"] = s * k / f
        if self.forward_base_s is not None:
            v = 1.0 if self.forward_position_share is None else float(self.forward_position_share)
            h = 1.0 - v + v * k
            changes |= {
                "forward_base_s": float(self.forward_base_s) * h,
                "forward_per_module_s": float(self.forward_per_module_s or 0.0) * h,
            }
            if self.forward_position_share is not None:
                changes["forward_position_share"] = v * k / h
        if self.has_memory and self.memory_position_share is not None:
            m = float(self.memory_position_share)
            g = 1.0 - m + m * k_mem
            resident = float(self.memory_resident_mib or 0.0)
            changes |= {
                "memory_base_mib": resident + (float(self.memory_base_mib) - resident) * g,  # type: ignore[arg-type]
                "memory_per_layer_mib": float(self.memory_per_layer_mib or 0.0) * g,
                "memory_per_module_mib": float(self.memory_per_module_mib or 0.0) * g,
                "memory_per_mparam_mib": float(self.memory_per_mparam_mib or 0.0) * g,
                "memory_position_share": m * k_mem / g,
            }
        elif self.has_memory:
            changes["memory_per_layer_mib"] = float(self.memory_per_layer_mib or 0.0) * k_mem
        first = self.first_step_model()
        if first is not None:
            moved = first._scaled(k, k_mem, micro_batches)
            changes["memory_first_step"] = {key: getattr(moved, key) for key in self.memory_first_step or {}}
        return dataclasses.replace(self, **changes)

    def forward_time(self, modules: int) -> float | None:
        """Predicted seconds of one unmerged no-grad forward over this model's batch, or None."""
        if self.forward_base_s is None:
            return None
        return float(self.forward_base_s) + float(self.forward_per_module_s or 0.0) * modules

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["formula"] = (
            "t = intercept_s + per_layer_backward_s·(L − min S) + per_module_s·modules"
            " + per_mparam_s·params/1e6; modules = Σ (d_in + d_out) / step_module_width where that is"
            " recorded"
        )
        d["memory_formula"] = (
            "MiB = memory_base_mib + memory_per_layer_mib·(L − min S) + memory_per_module_mib·modules"
            " + memory_per_mparam_mib·params/1e6; modules = Σ d_in / memory_module_width where that is"
            " recorded"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        fields = [f for f in dataclasses.fields(cls)]
        return cls(**{f.name: d[f.name] for f in fields if f.name in d or f.default is dataclasses.MISSING})


def grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    """The L2 norm of the parameters' gradients (inf or NaN when any gradient is)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def all_finite(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether every value of every parameter is finite (one check per tensor, as training does)."""
    return all(bool(torch.isfinite(p).all()) for p in params)


@dataclasses.dataclass(frozen=True)
class _Timed:
    step_s: list[float]  # every timed step
    warmup_s: float  # the untimed first step after the wrap, kept to show what skipping it leaves out
    resident_mib: float | None  # in use when the steps began; None: no per-run peak on this system
    peak_mib: float  # the peak over every step of the window
    forward_s: float | None  # None where the placement's forward was not timed
    first_step_mib: float  # the first step's peak plus the optimizer state it made, if below peak_mib


def forward_seconds(model, batch: dict[str, torch.Tensor], *, warm: bool, repeats: int = 1) -> float:
    """Seconds of one no-grad forward in eval mode: the fastest of ``repeats`` timed passes, after one
    untimed warm-up pass unless ``warm``."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    times = []
    with eval_mode(model):
        for i in range(repeats if warm else repeats + 1):
            synchronize(device)
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            synchronize(device)
            if warm or i > 0:
                times.append(time.perf_counter() - t)
    return float(min(times))


def _time_steps(
    model,
    targets: list[str],
    batch: dict[str, torch.Tensor],
    steps: int,
    rank: int = 8,
    *,
    forward: bool = True,
    dropout: float = 0.0,
    checkpointing: bool = False,
) -> _Timed:
    """Wrap ``targets`` in fresh LoRA modules (LoRA dropout ``dropout``) and time ``steps`` optimizer steps
    after one untimed step (with activation checkpointing where ``checkpointing``), then (with ``forward``)
    the unmerged no-grad forward, the fastest of two.

    The first step after a wrap is about a tenth slower than the next ones, in every round and not only the
    first (benchmarks/results/calibration_warmup.md); a training run's median never sees it.

    Memory: the peak over the window, and beside it the peak by the end of the first step plus the
    optimizer state that step made (where lower). On a CPU the resident peak climbs over later steps, most
    after an earlier, larger placement has left the heap wide, while the first step's holds still; a
    training run climbs over its own steps too, in a process of its own as well, and the window's peak
    priced runs better (benchmarks/results/cost/memory_window.md, design §5).
    """
    from peft import LoraConfig, get_peft_model

    from layercard.adapters import undone_on_failure
    from layercard.models import activation_checkpointing

    device = next(model.parameters()).device
    requires = [p.requires_grad for p in model.parameters()]
    with undone_on_failure(model):
        peft_model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=dropout)
        )
    try:
        with activation_checkpointing(peft_model, checkpointing):
            return _steps_timed(peft_model, batch, steps, forward, device)
    finally:
        peft_model.unload()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


def _steps_timed(peft_model, batch: dict[str, torch.Tensor], steps: int, forward: bool, device) -> _Timed:
    """:func:`_time_steps`' measurement on the wrapped model."""
    from layercard.tasks.loss import forward_loss

    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    times = []
    resident = reset_peak_memory(device)
    for _ in range(steps + 1):
        synchronize(device)
        t = time.perf_counter()
        loss, n = forward_loss(peft_model, ids, mask, labels)
        (loss / max(n, 1)).backward()
        del loss
        # The checks a training step makes on its gradients and update cost per tensor: timed too.
        grad_norm(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        all_finite(params)
        synchronize(device)
        times.append(time.perf_counter() - t)
        if len(times) == 1:
            first_peak = peak_memory(device)[0] + _tensor_mib(opt.state)
    peak, _ = peak_memory(device)
    del opt
    # The fastest of two: a single pass right after the steps at times took 1.5-2.7x as long.
    fwd = forward_seconds(peft_model, batch, warm=True, repeats=2) if forward else None
    return _Timed(times[1:], times[0], resident, float(peak), fwd, float(min(peak, first_peak)))


def timings_by_round(row: dict[str, Any]) -> list[list[float]]:
    """A calibration row's timed steps, round by round. Rows recorded before ``timed_steps_by_round``
    timed as many steps in every round."""
    xs = list(row["timings_s_per_step"])
    counts = row.get("timed_steps_by_round") or [len(xs) // len(row["warmup_s_by_round"])] * len(
        row["warmup_s_by_round"]
    )
    out, at = [], 0
    for n in counts:
        out.append(xs[at : at + n])
        at += n
    return out


def _memory_by_round(ts: Sequence[_Timed], peaks: Sequence[float]) -> float:
    """A placement's memory over its rounds, like its time: the median start plus the median of what each
    round's peak added over its own start; where no per-run window exists, the median of the peaks."""
    if any(t.resident_mib is None for t in ts):
        return float(np.median(peaks))
    added = [p - t.resident_mib for p, t in zip(peaks, ts, strict=True)]
    return float(np.median([t.resident_mib for t in ts])) + float(np.median(added))


def _tensor_mib(state: Any) -> float:
    """MiB held by the tensors of an optimizer's state."""
    tensors = [t for st in state.values() for t in st.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _out_of_order(configs: Sequence[tuple[list[int], int]], times: Sequence[float]) -> list[int]:
    """Indices of placements timed slower than one that costs at least as much: a placement whose backward
    reaches at least as deep, on at least as many layers at at least the rank of another, is not faster.
    Load can only slow a step, so of the two it is the slower, cheaper one whose time is suspect."""
    bad: set[int] = set()
    for i, (li, ri) in enumerate(configs):
        for j, (lj, rj) in enumerate(configs):
            covers = i != j and min(li) <= min(lj) and len(li) >= len(lj) and ri >= rj
            if covers and times[i] < times[j] * 0.98:  # 2%: timing jitter is not a contradiction
                bad.add(j)
    return sorted(bad)


def calibrate(
    model,
    tokenizer,
    batch: dict[str, torch.Tensor],
    roles: Sequence[str],
    *,
    steps: int = 2,
    rounds: int = 1,
    progress=None,
    resident_mib: float | None = None,
    dropout: float = 0.0,
    checkpointing: bool = False,
) -> CostModel:
    """Time LoRA steps (top layer alone, bottom layer alone, middle layer, all layers at rank 8, all layers at
    rank 32), measure each one's peak memory and, for the rank-8 all-layer placement, the unmerged forward
    time, and fit the cost model.

    The placements are timed in ``rounds`` interleaved rounds of ``steps`` timed steps per placement, each
    round's after an untimed warm-up step; a placement's time is the fastest of its timed steps. Other load
    on the machine can only slow a step, and a few timed steps cannot outvote one slowed step the way the
    median over a training run's many steps does: with the median of two, calibrations over-predicted the
    steps of the runs they priced by 6.7% on average over eight task-runs of benchmarks/cost.py, with the
    fastest by 2.7% (benchmarks/results/cost/refit.md). Interleaving spreads slow spells of the machine over
    every placement instead of letting one absorb them. A placement timed slower than one that costs at
    least as much (reaches as deep, on as many layers, at as high a rank) is timed once more: load can only
    slow a step, so the cheaper, slower one is the suspect.

    ``resident_mib``: the memory in use with the model loaded and nothing else of the caller's held (the
    card measures it before its probe pass). A training process of its own starts about there (on a CPU
    about 20 MiB above it), not from whatever the caller holds while calibrating; a run in the card's own
    process starts from what the card leaves, higher on a CPU. The plan's memory starts from the larger of
    the two (the first is kept as ``memory_resident_before_mib``), and training states its peak restated
    from where it actually began beside the plan's. Without it the calibration runs' own starting memory
    is used.

    ``dropout``: the LoRA dropout every placement trains with, as the plans it prices will (recorded).
    ``checkpointing``: every placement trains with activation checkpointing, as the runs it prices will
    (recorded).
    """
    from layercard import models

    global _calibrated_here
    if steps < 1 or rounds < 1:
        raise LayercardError(f"cost calibration: steps and rounds must be ≥ 1, got {steps} and {rounds}")
    if not 0.0 <= dropout < 1.0:
        raise LayercardError(f"cost calibration: dropout must be in [0, 1), got {dropout}")
    n_layers = models.num_layers(model)
    # the layers that hold the roles (a hybrid's state-space layers hold no q): "every layer" is these, so
    # that a row's depth is where its backward stops, and the top, bottom and middle are among them
    held = sorted({u.layer for u in models.units(model, roles)}) or list(range(n_layers))
    everything = held
    top, bottom = [held[-1]], [held[0]]
    configs: list[tuple[list[int], int]] = [(top, 8), (bottom, 8), (everything, 8), (everything, 32)]
    if len(held) > 2:
        configs.insert(2, ([held[len(held) // 2]], 8))
    modes = training_modes(model)
    device = next(model.parameters()).device
    rows_in_batch = int(batch["input_ids"].shape[0])
    half_batch = {k: v[: rows_in_batch // 2] for k, v in batch.items()}
    # The fastest of two passes each: the share below is read off their difference. No untimed pass
    # first: the card's probe has just run the model, and the fastest of the first two passes came within
    # 2.4% of the fastest of two after an untimed one (benchmarks/results/cost/forward_warmup.md).
    base_forward = forward_seconds(model, batch, warm=True, repeats=2)
    half_forward = forward_seconds(model, half_batch, warm=True, repeats=2) if rows_in_batch >= 2 else None
    model.train()
    timed: list[list[_Timed]] = [[] for _ in configs]

    def timed_on(i: int, rows: dict[str, torch.Tensor], forward: bool, n_steps: int = steps) -> _Timed:
        layers, rank = configs[i]
        specs = models.units(model, roles, layers=layers)
        if not specs:
            raise LayercardError(f"cost calibration: no units for roles {list(roles)} in layers {layers}")
        names = [s.name for s in specs]
        return _time_steps(
            model, names, rows, n_steps, rank, forward=forward, dropout=dropout, checkpointing=checkpointing
        )

    full = configs.index((everything, 8))

    def measure(i: int, n_steps: int = steps) -> None:
        # The forward's line is read off the base model and the rank-8 all-layer placement: a single
        # layer's few modules add next to nothing to the base model's forward, and the rank-32 placement
        # adapts the same modules, so that the line gains nothing from it that the rank-8 one does not give;
        # timing them cost a tenth of the calibration for no better prediction
        # (benchmarks/results/cost/calibration_subset.md). A placement timed again for its steps keeps the
        # forward it has.
        timed[i].append(timed_on(i, batch, forward=not timed[i] and i == full, n_steps=n_steps))

    def step_time(ts: list[_Timed]) -> float:
        return float(min(x for t in ts for x in t.step_s))

    # The all-layer placement once more on half the batch, so that a run at another batch is priced by
    # a line through two batches rather than in proportion: on a GPU much of a small step does not grow
    # with the batch (benchmarks/results/cost/gpu-nvidia-h200).
    order: list[int | None] = [i for _ in range(rounds) for i in range(len(configs))]
    if rows_in_batch >= 2:
        order.append(None)
    half: _Timed | None = None
    try:
        for i in track(order, "cost calibration", total=len(order), enabled=progress):
            if i is None:
                half = timed_on(full, half_batch, forward=False)  # its forward: the base model's
            else:
                measure(i)
        # A placement that backward reaches deeper, or that adds more, cannot be faster: where the timings
        # say otherwise, outside load slowed one of them, and the slower, cheaper one is timed once more:
        # a warm-up and one timed step. Refitted on the committed cost runs, one step priced them as well as
        # two (a tie) and saves a step of that placement (benchmarks/results/cost/calibration_subset.md).
        again = _out_of_order(configs, [step_time(ts) for ts in timed])
        if again:
            for i in track(again, "cost calibration (again)", total=len(again), enabled=progress):
                measure(i, n_steps=1)
    finally:
        restore_modes(modes)
        # the heap a CPU's training steps widened is this process's from now on; a calibration that
        # stopped before any step, or whose peaks are CUDA's allocator's, widened none
        if any(timed) and peak_memory_kind(device) == "process_peak_rss":
            _calibrated_here = True
    rows = []
    for (layers, rank), ts in zip(configs, timed, strict=True):
        specs = models.units(model, roles, layers=layers)
        residents = [t.resident_mib for t in ts]
        row_resident = None if None in residents else float(np.median(residents))
        row_peak = _memory_by_round(ts, [t.peak_mib for t in ts])
        row_first = _memory_by_round(ts, [t.first_step_mib for t in ts])
        rows.append(
            {
                "layers": layers,
                "modules": len(specs),
                "input_width": sum(s.d_in for s in specs),
                "rank": rank,
                "params": sum(rank * (s.d_in + s.d_out) for s in specs),
                "s_per_step": round(step_time(ts), 4),
                "timings_s_per_step": [round(x, 4) for t in ts for x in t.step_s],
                "timed_steps_by_round": [len(t.step_s) for t in ts],
                "warmup_s_by_round": [round(t.warmup_s, 4) for t in ts],
                "resident_mib": None if row_resident is None else round(row_resident, 1),
                "peak_memory_mib": round(row_peak, 1),
                "peak_memory_by_round_mib": [round(t.peak_mib, 1) for t in ts],
                "first_step_peak_memory_mib": round(row_first, 1),
                "first_step_peak_by_round_mib": [round(t.first_step_mib, 1) for t in ts],
                "forward_s": None if ts[0].forward_s is None else round(ts[0].forward_s, 4),
            }
        )
    memory: dict[str, Any] = {}
    if all(r["resident_mib"] is not None for r in rows):  # a lifetime peak says nothing about one placement
        # A run in this process begins from what the card leaves behind (modules it imported, the heap its
        # passes widened), on a CPU about 60 MiB above what it found; a process of its own begins about
        # 20 MiB above that. The larger is the plan's start (design §5, "Where a run begins").
        after = memory_in_use(device)
        start = resident_mib if resident_mib is None or after is None else max(resident_mib, after)
        memory = fit_memory(rows, n_layers, start) | {"memory_kind": peak_memory(device)[1]}
        if resident_mib is not None:
            memory["memory_resident_before_mib"] = resident_mib
    positions = (int(batch["input_ids"].numel()), int(half_batch["input_ids"].numel()))
    scaling = _batch_scaling(rows[full], half, *positions) if half is not None else {}
    if memory:
        memory["memory_first_step"] = first_step_terms(rows, n_layers, memory, scaling)
    if half_forward is not None:
        base_row = {"forward_s": round(base_forward, 4), "half_forward_s": round(half_forward, 4)}
        scaling["batch_scaling"] = scaling.get("batch_scaling", {}) | base_row
        scaling["forward_position_share"] = position_share(
            base_row["forward_s"], base_row["half_forward_s"], *positions
        )
    return CostModel(
        **fit_step_time(rows, n_layers),
        n_layers=n_layers,
        batch_size=int(batch["input_ids"].shape[0]),
        batch_tokens=int(batch["attention_mask"].sum()),
        batch_positions=int(batch["input_ids"].numel()),
        measured=rows,
        device=str(device),
        dropout=float(dropout),
        checkpointing=bool(checkpointing),
        dtype=models.weights_dtype(model),
        # every row adapts every role, so its modules' width is its parameters over its rank
        step_module_width=sum(r["params"] / r["rank"] for r in rows) / sum(r["modules"] for r in rows),
        **fit_forward(base_forward, rows),
        **memory,
        **scaling,
    )


def _terms(rows: Sequence[dict[str, Any]], n_layers: int, y: Sequence[float]) -> np.ndarray:
    """The four terms (constant, layers backward reaches, modules, million parameters) fitted to ``y``
    over calibration rows by non-negative least squares: each term is a time or a size, and noise must not
    make one negative."""
    from scipy.optimize import nnls

    x = np.array([[1.0, n_layers - min(r["layers"]), r["modules"], r["params"] / 1e6] for r in rows])
    coef, _ = nnls(x, np.asarray(y, dtype=float))
    return coef


def fit_step_time(rows: Sequence[dict[str, Any]], n_layers: int) -> dict[str, float]:
    """The step-time terms of a cost model from calibration rows (their ``s_per_step``)."""
    coef = _terms(rows, n_layers, [r["s_per_step"] for r in rows])
    return {
        "intercept_s": float(coef[0]),
        "per_layer_backward_s": float(coef[1]),
        "per_module_s": float(coef[2]),
        "per_mparam_s": float(coef[3]),
    }


def fit_forward(base_forward_s: float, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The unmerged forward's line in the number of adapted modules, through the base model's forward and
    the rows that timed one (non-negative least squares)."""
    from scipy.optimize import nnls

    points = [(0, base_forward_s)] + [(r["modules"], r["forward_s"]) for r in rows if r.get("forward_s")]
    fwd, _ = nnls(np.array([[1.0, m] for m, _ in points]), np.array([t for _, t in points]))
    return {"forward_base_s": float(fwd[0]), "forward_per_module_s": float(fwd[1])}


def fit_memory(
    rows: Sequence[dict[str, Any]], n_layers: int, resident_mib: float | None, key: str = "peak_memory_mib"
) -> dict[str, float]:
    """The memory terms of a cost model from calibration rows: each row's ``key`` less the memory in use
    when its steps began, fitted as what a placement adds over that (so that the model transfers to a
    training process whose resident size differs from the card's), on top of ``resident_mib`` (else the
    rows' median start)."""
    mem = _terms(rows, n_layers, [r[key] - r["resident_mib"] for r in rows])
    resident = float(np.median([r["resident_mib"] for r in rows])) if resident_mib is None else resident_mib
    out = {
        "memory_resident_mib": resident,
        "memory_base_mib": resident + float(mem[0]),
        "memory_per_layer_mib": float(mem[1]),
        "memory_per_module_mib": float(mem[2]),
        "memory_per_mparam_mib": float(mem[3]),
    }
    # The count is fitted; the width turns another placement's modules into calibration modules. Over the
    # committed CPU and GPU cost runs this priced peak memory at 4.4% against 4.6% for the count, and took
    # the count's bias between attention and MLP placements away (benchmarks/results/cost/memory_terms.md).
    if rows and all(r.get("input_width") for r in rows):
        out["memory_module_width"] = sum(r["input_width"] for r in rows) / sum(r["modules"] for r in rows)
    return out


def refit_memory(
    rows: Sequence[dict[str, Any]],
    n_layers: int,
    resident_mib: float | None,
    scaling: dict[str, Any],
    key: str,
    added: str,
    half_added: str,
) -> dict[str, float | None]:
    """The memory terms refitted to another figure of each row (``key``) from the same start, with that
    figure's own share growing with positions where the half batch measured it (``batch_scaling``'s
    ``added`` and ``half_added``), else the share in ``scaling``: the keys of a cost model's terms they
    replace."""
    fit = fit_memory(rows, n_layers, resident_mib, key=key)
    b = scaling.get("batch_scaling") or {}
    share = scaling.get("memory_position_share")
    if b.get(half_added) is not None:
        share = position_share(b[added], b[half_added], b["positions"], b["half_positions"])
    keys = ("memory_base_mib", "memory_per_layer_mib", "memory_per_module_mib", "memory_per_mparam_mib")
    return {k: fit[k] for k in keys} | {"memory_position_share": share}


def first_step_terms(
    rows: Sequence[dict[str, Any]], n_layers: int, memory: dict[str, Any], scaling: dict[str, Any]
) -> dict[str, float | None]:
    """The memory terms refitted to each row's first-step figure (see :func:`refit_memory`)."""
    return refit_memory(
        rows, n_layers, memory["memory_resident_mib"], scaling,
        "first_step_peak_memory_mib", "first_step_added_mib", "half_first_step_added_mib",
    )  # fmt: skip


def _batch_scaling(row: dict[str, Any], half: _Timed, positions: int, half_positions: int) -> dict[str, Any]:
    """The shares of step time and of added memory that grow with positions, from one placement measured on
    the full calibration batch (``row``) and on half of it (``half``); each clipped to [0, 1]."""
    # as recorded (rounded like the rows), so that the shares reproduce from the card
    t_full, t_half = float(row["s_per_step"]), round(float(min(half.step_s)), 4)
    measured = {
        "positions": positions,
        "half_positions": half_positions,
        "s_per_step": t_full,
        "half_s_per_step": t_half,
        "half_timings_s_per_step": [round(x, 4) for x in half.step_s],
        "half_warmup_s": round(half.warmup_s, 4),
    }
    out: dict[str, Any] = {
        "step_position_share": position_share(t_full, t_half, positions, half_positions),
        "batch_scaling": measured,
    }
    if row["resident_mib"] is not None and half.resident_mib is not None:
        added = round(row["peak_memory_mib"] - row["resident_mib"], 1)
        half_added = round(half.peak_mib - half.resident_mib, 1)
        measured |= {"added_mib": added, "half_added_mib": half_added}
        measured |= {  # the first step's memory too (see _time_steps)
            "first_step_added_mib": round(row["first_step_peak_memory_mib"] - row["resident_mib"], 1),
            "half_first_step_added_mib": round(half.first_step_mib - half.resident_mib, 1),
        }
        out["memory_position_share"] = position_share(added, half_added, positions, half_positions)
    return out


def position_share(full: float, part: float, positions: int, part_positions: int, clip: bool = True) -> float:
    """The share of ``full`` (a cost at ``positions``) that a line through it and ``part`` (the cost at
    ``part_positions`` < ``positions``) puts on the positions, clipped to [0, 1] unless ``clip`` is false:
    1 where the cost is proportional to positions, 0 where it does not grow with them."""
    if full <= 0 or positions <= part_positions:
        return 1.0
    share = (full - part) / (positions - part_positions) * positions / full
    return float(min(max(share, 0.0), 1.0)) if clip else float(share)
