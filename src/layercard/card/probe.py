"""The card's measuring pass: hooks that stream X and G = ∂L/∂Y into running sums.

Only the activations need gradients: the base stays frozen and the embedding output is made to
require grad, so backward computes no weight gradient. Each unit's ∇W = Gᵀ X is formed in the
hooks from the same X its forward saw, which is the work a weight gradient would cost anyway.
Hooks exist only inside :func:`probe_hooks`.

Every accumulator is a sum over probe positions, so processes that each take a share of the micro-batches
and then add their sums (:func:`all_reduce_sums`) hold what one process taking all of them would
(docs/design.md §12).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from layercard.errors import LayercardError
from layercard.inference import restore_modes, training_modes
from layercard.models import UnitSpec, decoder_layers, get_module, input_embeddings
from layercard.tasks.loss import forward_loss

T = TypeVar("T")


# Column block of the XᵀX sum: only blocks on or above the diagonal are formed. Narrower blocks make GEMMs
# too small to run at full speed; on this project's CPU 192 took the 1536-wide sum from 35 to 21 ms.
GRAM_BLOCK = 192


def add_gram(acc: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """Add the blocks of XᵀX on and above the diagonal into ``acc`` (k × k); the rest of it is left alone.

    XᵀX is symmetric, so the blocks below the diagonal would repeat the ones above: skipping them saves
    close to half the multiply-adds. :func:`symmetric_gram` rebuilds the whole matrix.
    """
    k = x.shape[1]
    if k <= 2 * block:
        acc.addmm_(x.T, x)
        return
    for i in range(0, k, block):
        acc[i : i + block, i:].addmm_(x[:, i : i + block].T, x[:, i:])


def symmetric_gram(acc: torch.Tensor) -> torch.Tensor:
    """The whole XᵀX from a sum that :func:`add_gram` filled (a new tensor).

    Its upper triangle lies inside the blocks that were formed; the lower one mirrors it.
    """
    upper = acc.triu()
    return upper + upper.triu(1).T


@dataclass
class GroupAccumulator:
    """Σ-side statistics of one distinct input (layer, input_group)."""

    d_in: int
    xtx: torch.Tensor  # (k, k), k = d_in or the sketch size, compute dtype; only its upper triangle is whole
    n: int = 0
    sketch: torch.Tensor | None = None  # (d_in, k) projection, None when exact


@dataclass
class UnitAccumulator:
    """Gradient-side statistics of one unit."""

    spec: UnitSpec
    group: GroupAccumulator
    grad: torch.Tensor  # (d_out, d_in), logical orientation, in the compute dtype
    a_stack: torch.Tensor  # (draws*r, d_in) LoRA A draws, stacked
    asa: torch.Tensor  # (draws*r, draws*r): A X ᵀ X Aᵀ summed, in the compute dtype
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class _State:
    keep: torch.Tensor | None = None  # flat indices of the unpadded positions; None when none is padded
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # this micro-batch's X per group

    def begin(self, attention_mask: torch.Tensor | None) -> None:
        """Start a micro-batch: note which positions count and forget the last micro-batch's inputs."""
        self.inputs = {}
        self.keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.keep = attention_mask.reshape(-1).nonzero().squeeze(1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the hook products and their sums: float32, or float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def probe_hooks(
    model: nn.Module, accs: Sequence[UnitAccumulator], state: _State, *, start_layer: int = 0
) -> Iterator[None]:
    """Attach the measuring hooks for ``accs``; always removed on exit.

    Backward starts its graph at the input of decoder layer ``start_layer`` (the lowest layer measured):
    the output gradients of the layers above do not depend on what lies below, so a layer group's pass
    need not run backward, or keep activations, beneath its lowest layer.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def embed_hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        # The base is frozen; gradients must still flow back through every layer.
        return out.detach().requires_grad_(True)

    def layer_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def make_hook(acc: UnitAccumulator):
        spec = acc.spec

        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            g = acc.group
            x2 = state.inputs.get(id(g))
            if x2 is None:
                # Once per distinct input and micro-batch: the units that share it (q, k, v; gate, up) reuse
                # the same rows. Padded positions are dropped rather than zeroed, so no product spends time
                # on them.
                x = inputs[0].detach().reshape(-1, spec.d_in)
                x2 = (x if state.keep is None else x.index_select(0, state.keep)).to(g.xtx.dtype)
                state.inputs[id(g)] = x2
                xs = x2 @ g.sketch if g.sketch is not None else x2
                # addmm_ adds the product into the sum inside the GEMM: no product tensor is written and
                # read back. Each micro-batch's product already sums its rows in this dtype, so a wider
                # running sum over a few micro-batches would buy nothing measurable.
                add_gram(g.xtx, xs)
                g.n += x2.shape[0]
            xa = x2 @ acc.a_stack.T
            acc.asa.addmm_(xa.T, xa)
            if out.requires_grad:
                keep = state.keep

                def grad_hook(gout: torch.Tensor) -> None:
                    g2 = gout.reshape(-1, spec.d_out)
                    g2 = (g2 if keep is None else g2.index_select(0, keep)).to(x2.dtype)
                    acc.grad.addmm_(g2.T, x2)

                out.register_hook(grad_hook)

        return hook

    try:
        if start_layer > 0:
            layer = decoder_layers(model)[start_layer]
            handles.append(layer.register_forward_pre_hook(layer_hook, with_kwargs=True))
        else:
            handles.append(input_embeddings(model).register_forward_hook(embed_hook))
        for acc in accs:
            handles.append(get_module(model, acc.spec.name).register_forward_hook(make_hook(acc)))
        yield
    finally:
        for h in handles:
            h.remove()


def make_accumulators(
    specs: Sequence[UnitSpec],
    *,
    lora_rank: int,
    a_draws: int,
    seed: int,
    sketch: int | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> list[UnitAccumulator]:
    """One accumulator per unit, sharing a group accumulator per distinct input.

    ``dtype`` is that of the sums and of the hook products (:func:`compute_dtype` of the model's dtype).
    """
    groups: dict[tuple[int, str], GroupAccumulator] = {}
    accs: list[UnitAccumulator] = []
    # The float64 draws of every projection land in one reused buffer: a fresh one per input costs its
    # memory's first touch each time, and the draws are the same.
    draws: dict[tuple[int, int], torch.Tensor] = {}
    for spec in specs:
        gkey = (spec.layer, spec.input_group)
        if gkey not in groups:
            proj = None
            k = spec.d_in
            if sketch is not None and sketch < spec.d_in:
                gen = torch.Generator().manual_seed(
                    _stable_seed(seed, f"sketch.{spec.layer}.{spec.input_group}")
                )
                shape = (spec.d_in, sketch)
                buf = draws.setdefault(shape, torch.empty(shape, dtype=torch.float64))
                torch.randn(spec.d_in, sketch, generator=gen, dtype=torch.float64, out=buf)
                proj = buf.div_(math.sqrt(sketch)).to(device=device, dtype=dtype, copy=True)
                k = sketch
            groups[gkey] = GroupAccumulator(
                d_in=spec.d_in, xtx=torch.zeros(k, k, dtype=dtype, device=device), sketch=proj
            )
        rng = np.random.default_rng(_stable_seed(seed, f"lora_a.{spec.key}"))
        bound = 1.0 / math.sqrt(spec.d_in)
        a = rng.uniform(-bound, bound, size=(a_draws * lora_rank, spec.d_in))
        accs.append(
            UnitAccumulator(
                spec=spec,
                group=groups[gkey],
                grad=torch.zeros(spec.d_out, spec.d_in, dtype=dtype, device=device),
                a_stack=torch.from_numpy(a).to(device=device, dtype=dtype),
                asa=torch.zeros(a.shape[0], a.shape[0], dtype=dtype, device=device),
            )
        )
    return accs


def _stable_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block (no dropout: a measurement must not depend on a random mask),
    then each module back in the mode it had, so a caller's mix of train and eval modules survives."""
    modes = training_modes(model)
    model.eval()
    try:
        yield
    finally:
        restore_modes(modes)


def run_probe(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    accs: Sequence[UnitAccumulator],
    *,
    n_target_tokens: int,
    progress=None,
    start_layer: int = 0,
    numbering: tuple[int, int] = (0, 1),
) -> float:
    """One forward+backward over ``batches`` with hooks; returns the mean target loss.

    ``numbering`` (first, stride): the index in the whole probe set of ``batches[0]`` and the step between
    the next ones (a process's share, :func:`shard`), so that an error names the micro-batch of the set.

    Each micro-batch's summed loss is divided by the probe's total target-token count, so the
    accumulated gradients are those of the mean loss over the whole probe set.
    """
    if n_target_tokens <= 0:
        raise LayercardError("probe set has no target tokens (every label is masked)")
    device = next(model.parameters()).device
    state = _State()
    total = 0.0
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model), probe_hooks(model, accs, state, start_layer=start_layer):
            it = progress(batches) if progress is not None else batches
            for step, batch in enumerate(it):
                mask = batch["attention_mask"].to(device)
                state.begin(mask)
                loss, _ = forward_loss(model, batch["input_ids"].to(device), mask, batch["labels"].to(device))
                loss = loss / n_target_tokens
                if not torch.isfinite(loss):
                    index = numbering[0] + step * numbering[1]
                    raise LayercardError(f"non-finite loss on probe micro-batch {index} (loss={loss.item()})")
                loss.backward()
                total += float(loss.detach())
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return total


# ---------------------------------------------------------------------------------------------
# Several processes (docs/design.md §12)


def rank_world() -> tuple[int, int]:
    """(rank, number of processes) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def shared_cores(world: int, device: torch.device) -> Iterator[None]:
    """For the block, give this process its share of the torch threads when ``world`` processes run on the
    CPU side by side (``LOCAL_WORLD_SIZE`` of them on this machine): more would only oversubscribe cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "") or world)
    if world <= 1 or local <= 1 or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // local))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's weights are split over processes (FSDP's per-parameter sharding)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support has no sharded weights
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard(batches: Sequence[T], rank: int, world: int) -> list[T]:
    """This process's micro-batches: ``rank``, ``rank + world``, ... (a round-robin deal)."""
    return list(batches[rank::world])


def all_reduce_sums(accs: Sequence[UnitAccumulator], loss: float) -> float:
    """Add every process's sums into every process's accumulators (in place); return the summed loss.

    The tensors are reduced in place one by one rather than packed into one buffer: packing would hold a
    second copy of all of them, and memory is what layer groups and sketches are there to bound.
    """
    import torch.distributed as dist

    groups = list({id(a.group): a.group for a in accs}.values())  # first-seen order: equal on every rank
    for g in groups:
        dist.all_reduce(g.xtx)
    for a in accs:
        dist.all_reduce(a.grad)
        dist.all_reduce(a.asa)
    # `extra` keys may differ between processes (one that saw no batch has none): agree on their union.
    mine = sorted({(i, k) for i, a in enumerate(accs) for k in a.extra})
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    extras = sorted({tuple(x) for keys in seen for x in keys})
    device = accs[0].grad.device if accs else torch.device("cpu")
    # Counts travel as float64: exact below 2**53 positions.
    vec = torch.tensor(
        [loss, *[float(g.n) for g in groups], *[accs[i].extra.get(k, 0.0) for i, k in extras]],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(vec)
    vals = vec.tolist()
    for g, n in zip(groups, vals[1 : 1 + len(groups)], strict=True):
        g.n = round(n)
    for (i, k), v in zip(extras, vals[1 + len(groups) :], strict=True):
        accs[i].extra[k] = v
    return vals[0]
