"""The training data stream and the learning-rate schedule: both pure functions of the seed and config.

Epoch ``e`` is the ``e``-th permutation drawn from one generator seeded with ``seed`` (so two seeds
share no epoch order) and a step consumes the next ``grad_accum`` micro-batches of the cycled stream, so
a checkpoint needs only the number of micro-batches consumed. With ``group_by_length`` each window of
:data:`GROUP_WINDOW` micro-batches of that order is sorted by length and cut into micro-batches, whose
order within the window is then shuffled: the same examples per step and per epoch, less padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from layercard.tasks import Encoded, EncodedTask, collate
from layercard.train.config import TrainConfig

# Micro-batches whose examples group_by_length sorts by length together: wide enough that a batch's rows
# come out close in length, narrow enough that a window holds a sample of the whole epoch's lengths
# rather than one end of them.
GROUP_WINDOW = 50


class Stream:
    """Micro-batch ``k`` of the cycled, per-epoch-shuffled stream; a pure function of the seed (and of
    ``group_by_length``)."""

    def __init__(
        self,
        encoded: Sequence[Encoded],
        batch_size: int,
        pad_id: int,
        seed: int,
        *,
        group_by_length: bool = False,
    ) -> None:
        self.encoded = encoded
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.group_by_length = group_by_length
        self.per_epoch = math.ceil(len(encoded) / batch_size)
        self._gen: torch.Generator | None = None
        self._perm: tuple[int, list[int]] = (-1, [])
        self._windows: dict[tuple[int, int], list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        # One generator drawn epoch after epoch: seeding epoch e with seed + e gave seed s's second
        # epoch the order of seed s + 1's first, so seed replicates of a multi-epoch run overlapped.
        if self._gen is None or epoch < self._perm[0]:
            self._gen = torch.Generator().manual_seed(self.seed)
            self._perm = (-1, [])
        while self._perm[0] < epoch:
            self._perm = (self._perm[0] + 1, torch.randperm(len(self.encoded), generator=self._gen).tolist())
        return self._perm[1]

    def _window_span(self, epoch: int, w: int) -> list[int]:
        """The examples of window ``w`` of epoch ``epoch``'s order, before any grouping."""
        span = GROUP_WINDOW * self.batch_size
        return self._order(epoch)[w * span : (w + 1) * span]

    def _window(self, epoch: int, w: int) -> list[int]:
        """Window ``w`` of epoch ``epoch`` as grouped: sorted longest first (ties in the shuffled order),
        cut into micro-batches, the full ones shuffled. A short last micro-batch stays last, where the
        epoch's micro-batches are cut. Grouped one window at a time, so that a run reading part of a
        large training set encodes no more than the windows it reads."""
        key = (epoch, w)
        if key not in self._windows:
            if self._windows and next(iter(self._windows))[0] != epoch:
                self._windows.clear()  # one epoch's windows at a time
            part = self._window_span(epoch, w)
            if isinstance(self.encoded, EncodedTask):
                self.encoded.fill(part)  # in a few passes, not one example at a time
            part = sorted(part, key=lambda j: -len(self.encoded[j]))
            bs = self.batch_size
            rows = [part[i : i + bs] for i in range(0, len(part), bs)]
            full = [r for r in rows if len(r) == bs]
            # Each window's shuffle is drawn from its own seed, so that any micro-batch can be found
            # without grouping the windows before it, and the epoch order's draws stay as without.
            order = np.random.default_rng([self.seed, epoch, w]).permutation(len(full)).tolist()
            self._windows[key] = [j for i in order for j in full[i]] + [
                j for r in rows[len(full) :] for j in r
            ]
        return self._windows[key]

    def _indices(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if self.group_by_length:
            w, i = divmod(i, GROUP_WINDOW)
            return self._window(epoch, w)[i * self.batch_size : (i + 1) * self.batch_size]
        return self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def run_indices(self, micro_batches: int) -> list[int]:
        """The examples the first ``micro_batches`` micro-batches hold, each once, in order; grouped, those
        of every window they draw from, whose lengths the grouping reads."""
        if micro_batches >= self.per_epoch:  # a whole epoch holds every example
            return list(range(len(self.encoded)))
        if self.group_by_length:  # the first epoch's windows that hold them, whole
            windows = math.ceil(micro_batches / GROUP_WINDOW)
            return sorted(self._order(0)[: windows * GROUP_WINDOW * self.batch_size])
        return sorted({j for k in range(micro_batches) for j in self._indices(k)})

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """The ``k``-th micro-batch of the stream (epochs follow each other)."""
        return collate([self.encoded[j] for j in self._indices(k)], self.pad_id)

    def positions(self, k: int) -> int:
        """The padded positions (rows × the longest row) of micro-batch ``k``, without building it."""
        idx = self._indices(k)
        return len(idx) * max(len(self.encoded[j]) for j in idx)


# Micro-batches of one process whose positions are counted one by one (about 1.3 s on a 2-core CPU);
# a longer run's mean is that of its first ones, which span many epochs by then.
EXACT_MICRO_BATCHES = 1 << 20


def run_positions(stream: Stream, steps: int, grad_accum: int, world: int, rank: int) -> tuple[float, int]:
    """(mean padded positions per step, the largest micro-batch's) that process ``rank`` of ``world``
    computes over a run of ``steps`` optimizer steps: what its step time and peak memory are priced at,
    since each process computes its own micro-batches.

    Exact up to :data:`EXACT_MICRO_BATCHES` micro-batches of the process; beyond, both are those of its
    first that many, so that pricing a run of any length takes a second or so rather than time in
    proportion to its steps.
    """
    counted = min(steps * grad_accum, EXACT_MICRO_BATCHES)
    total = largest = 0
    for m in range(counted):
        n = stream.positions(m * world + rank)
        total += n
        largest = max(largest, n)
    return total * grad_accum / counted, largest


def launch_positions(stream: Stream, steps: int, grad_accum: int, world: int) -> tuple[float, int]:
    """:func:`run_positions` of the process that computes the most per step and of the one with the
    largest micro-batch, among ``world``: the processes wait for each other at every step, and any one
    of them can run out of memory."""
    per_rank = [run_positions(stream, steps, grad_accum, world, r) for r in range(world)]
    return max(p for p, _ in per_rank), max(n for _, n in per_rank)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
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
