"""The card over several processes: probe batches sharded, sums all-reduced (docs/design.md §12).

Every statistic the probe pass accumulates is a sum over probe positions, so N processes that each take
every N-th micro-batch and then add their sums hold exactly what one process holding all of them would.
Three ways in:

- a process group that already exists (the caller's): ``compute_card`` shards its batches over it
  (``probe.rank_world``, ``probe.all_reduce_sums``);
- a launcher (``torchrun``, ``accelerate launch``) that set ``WORLD_SIZE``: :func:`launch_group` joins
  its group for the duration of one command;
- ``layercard card --processes N``: :func:`spawn_card` starts N local workers itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from layercard.config import CardConfig
from layercard.errors import LayercardError
from layercard.progress import hide_library_deprecations

_ERROR_FILE = "error.{rank}.txt"
_CARD_FILE = "card.json"


def launched_world() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank in a launch (``RANK``; 0 without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


@contextlib.contextmanager
def launch_group(device: torch.device) -> Iterator[torch.device]:
    """Under a launcher, join its process group for the block and yield this process's device.

    The launcher's environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) is the
    rendezvous. On CUDA each process takes the GPU of its ``LOCAL_RANK`` and talks over NCCL; on CPU over
    gloo. Without a launcher, or when a group already exists, nothing is joined.
    """
    import torch.distributed as dist

    if launched_world() <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def check_processes(processes: int, device: str) -> torch.device:
    """The device of ``--processes N`` workers, or a one-line error before any work."""
    from layercard.models import resolve_device

    if processes < 1:
        raise LayercardError(f"--processes {processes}: must be at least 1")
    if processes > 1 and launched_world() > 1:
        raise LayercardError(
            f"--processes {processes}: this command already runs as one of {launched_world()} launched "
            "processes; use either the launcher or --processes"
        )
    if processes == 1:
        return resolve_device(device)
    try:
        dev = resolve_device(device)
    except LayercardError as e:
        raise LayercardError(f"--processes {processes}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise LayercardError(f"--processes {processes} --device {device}: only cpu or cuda processes")
    if dev.type == "cuda" and dev.index not in (None, 0):
        # Worker r takes cuda:r; a start at another index would be dropped without a word.
        raise LayercardError(
            f"--processes {processes} --device {device}: the processes take cuda:0 to cuda:{processes - 1}; "
            "choose the GPUs with CUDA_VISIBLE_DEVICES and pass --device cuda"
        )
    if dev.type == "cuda" and processes > torch.cuda.device_count():
        raise LayercardError(
            f"--processes {processes} --device {device}: one GPU per process, and this machine has "
            f"{torch.cuda.device_count()}"
        )
    return dev


# Local workers are started with torch.multiprocessing rather than by running the command again under a
# launcher: the arguments travel as Python objects (no command line to rebuild, so the library and the
# test runner can call it too), the parent keeps the folder's lock and writes the card, and a worker that
# fails takes its siblings down with it, its message coming back as one line.
def spawn_card(
    processes: int,
    model: str,
    task: str,
    cfg: CardConfig,
    *,
    split: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    progress: bool | None = None,
    task_kw: dict[str, Any] | None = None,
) -> Any:
    """The card of ``model`` on ``task`` measured by ``processes`` local processes; returns the Card.

    Each worker loads the model and the task itself, takes its share of the probe batches and joins a
    gloo (CPU) or NCCL (one GPU each) group; the first returns the card. On the CPU the workers share
    this process's torch threads while they run side by side, so that they do not oversubscribe the
    cores; the first has them all for coupling and calibration.
    """
    import torch.multiprocessing as mp

    from layercard.card.artifact import Card
    from layercard.models.loading import convert_once

    dev = check_processes(processes, device)
    convert_once(model)  # here: converted by each worker, one would wait on the other under a lock note
    threads = torch.get_num_threads()  # each worker divides them while the others run (probe.shared_cores)
    with tempfile.TemporaryDirectory(prefix="layercard-card-") as tmp:
        args = (processes, tmp, model, task, cfg, split, dtype, dev.type, trust_remote_code, progress)
        try:
            with _quiet_sibling_stops():
                mp.spawn(_worker, args=(*args, task_kw or {}, threads), nprocs=processes, join=True)
        except Exception as e:  # a worker failed; its own message, when it left one, says why
            said = sorted(Path(tmp).glob(_ERROR_FILE.format(rank="*")))
            if said:
                raise LayercardError(said[0].read_text(encoding="utf-8").strip()) from None
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise LayercardError(
                f"--processes {processes}: a card process failed: {lines[-1] if lines else type(e).__name__}"
            ) from None
        return Card.load(Path(tmp) / _CARD_FILE)


class _SiblingStops(logging.Filter):
    """Drops torch's warning that it stops the other workers once one has failed: the failure is reported
    as one line, and stopping its siblings is the expected consequence, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Terminating process")


@contextlib.contextmanager
def _quiet_sibling_stops() -> Iterator[None]:
    log = logging.getLogger("torch.multiprocessing.spawn")
    quiet = _SiblingStops()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _worker(
    rank: int,
    world: int,
    tmp: str,
    model: str,
    task: str,
    cfg: CardConfig,
    split: str | None,
    dtype: str,
    device_type: str,
    trust_remote_code: bool,
    progress: bool | None,
    task_kw: dict[str, Any],
    threads: int,
) -> None:
    """One process of :func:`spawn_card` (started by torch.multiprocessing; ``rank`` comes first)."""
    import torch.distributed as dist

    from layercard.card.compute import compute_card
    from layercard.models import load_model
    from layercard.tasks import load_task

    hide_library_deprecations()  # a fresh interpreter: the command line's filters are not in it
    torch.set_num_threads(threads)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # all on this machine: they share its cores
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A file rendezvous in the private temporary folder: no port to pick, none to collide.
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"file://{Path(tmp) / 'rendezvous'}",
        rank=rank,
        world_size=world,
    )
    try:
        the_task = load_task(task, split=split, seed=cfg.seed, **task_kw)
        loaded = load_model(model, dtype=dtype, device=str(device), trust_remote_code=trust_remote_code)
        card = compute_card(loaded, the_task, cfg, progress=progress if rank == 0 else False)
        if rank == 0:
            card.save(Path(tmp) / _CARD_FILE)
    except LayercardError as e:
        (Path(tmp) / _ERROR_FILE.format(rank=rank)).write_text(str(e), encoding="utf-8")
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()
