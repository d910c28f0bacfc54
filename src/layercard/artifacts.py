"""Versioned JSON artifacts: provenance, content hashes, atomic writes and one writer per folder.

Every artifact a stage writes goes through :func:`write_json` (temp file + rename), so a failed
stage never leaves a half-written file behind, and carries a :class:`Provenance` block. JSON has no
NaN or Infinity, so :func:`write_json` refuses them. A write's temporary sibling is named after its
owner process (``.NAME.HOST-PID.XXXX.tmp``): the next write of ``NAME`` removes those whose owner is
gone. :func:`writer_lock` keeps a second process out of a folder another live process is writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from layercard.errors import LayercardError, message_line

SCHEMA_VERSION = 1
_TRACKED_PACKAGES = ("layercard", "torch", "transformers", "peft", "accelerate", "numpy")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers in an artifact."""
    out: dict[str, str] = {}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    if out.get("layercard") == "absent":  # run from a source tree without installing it
        from layercard import __version__

        out["layercard"] = f"{__version__} (source)"
    commit = source_commit()
    if commit is not None:
        out["layercard_commit"] = commit
    out["python"] = platform.python_version()
    return out


@functools.cache
def source_commit() -> str | None:
    """The git commit of the source tree layercard runs from, ``+modified`` when its tracked files under
    ``src/`` differ from that commit; None for an installed wheel, or where git cannot tell.

    Every commit of a source checkout reports the same package version, so without it two artifacts of
    different code would look alike."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    asks = (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no", "--", "src"])
    try:
        head, changed = (
            subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            for args in asks
        )
    except (OSError, subprocess.SubprocessError):  # no git, not a repository it trusts, too slow
        return None
    if not re.fullmatch(r"[0-9a-f]{40,64}", head):
        return None
    return head + ("+modified" if changed else "")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return sha256_bytes(_canonical(obj).encode())


class JsonListHash:
    """:func:`sha256_json` of a list, or of ``{into: the list, **beside}``, taken as the items come
    (:meth:`add`): the list is never held whole."""

    def __init__(self, *, into: str | None = None, beside: Mapping[str, Any] | None = None) -> None:
        head, self._tail = "[", "]"
        if into is not None:
            rest = dict(beside or {})
            if into in rest:
                raise ValueError(f"JsonListHash: {into!r} is both the list's key and beside it")
            keys = sorted([into, *rest])
            at = keys.index(into)
            before = "".join(f"{_canonical(k)}:{_canonical(rest[k])}," for k in keys[:at])
            after = "".join(f",{_canonical(k)}:{_canonical(rest[k])}" for k in keys[at + 1 :])
            head, self._tail = "{" + before + _canonical(into) + ":[", "]" + after + "}"
        self._h = hashlib.sha256(head.encode())
        self._sep = ""

    def add(self, item: Any) -> None:
        self._h.update((self._sep + _canonical(item)).encode())
        self._sep = ","

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(self._tail.encode())
        return h.hexdigest()


def sha256_json_list(
    items: Iterable[Any], *, into: str | None = None, beside: Mapping[str, Any] | None = None
) -> str:
    """:func:`sha256_json` of ``list(items)``, or of ``{into: list(items), **beside}``, taken as the items
    come (:class:`JsonListHash`)."""
    h = JsonListHash(into=into, beside=beside)
    for item in items:
        h.add(item)
    return h.hexdigest()


def _update_from_file(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def hash_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    _update_from_file(h, Path(path))
    return h.hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """Hash of a JSON artifact without its provenance and timings (when it was made, how long it took), so
    a stage rerun that reproduces the same content does not invalidate the stages downstream of it."""
    return artifact_hash(read_json(path))


def artifact_hash(obj: Any) -> str:
    """:func:`content_hash` of an artifact's JSON form in memory (``Plan.to_dict()``)."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in ("provenance", "timings")}
    return sha256_json(obj)


# What an adapter folder's identity leaves out: its model card, which records the measured step time and
# memory and the folder's path, so that the same weights trained twice have one identity.
_NOT_IDENTITY = frozenset({"README.md"})


def _in_identity(rel: Path) -> bool:
    # Hidden files and folders (.DS_Store, .ipynb_checkpoints) are what file browsers and notebooks leave
    # beside an adapter; no adapter format keeps its weights or config in one.
    return rel.as_posix() not in _NOT_IDENTITY and not any(part.startswith(".") for part in rel.parts)


def hash_folder(folder: str | os.PathLike[str]) -> str:
    """sha256 over a folder's relative file names, sizes and bytes (its top-level README.md and hidden
    files aside): the one identity of an adapter folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = (p for p in folder.rglob("*") if p.is_file() and _in_identity(p.relative_to(folder)))
    for f in sorted(files):
        # the size ahead of the bytes: one file's bytes cannot pass for another file's name and bytes
        h.update(f"{f.relative_to(folder).as_posix()}\n{f.stat().st_size}\n".encode())
        _update_from_file(h, f)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where an artifact came from: enough to tell whether two artifacts are comparable."""

    stage: str
    model_id: str
    model_hash: str
    task: str
    data_hash: str
    config: dict[str, Any]
    seed: int
    versions: dict[str, str]
    wall_time_s: float
    created: str
    machine: dict[str, Any]
    # the model folder's tokenizer and chat-template files (models.tokenizer_folder_hash): they decide the
    # tokens every stage reads, and model_hash covers the weights only; None for a model built in memory
    tokenizer_hash: str | None = None

    @classmethod
    def make(
        cls,
        *,
        stage: str,
        model_id: str,
        model_hash: str,
        task: str,
        data_hash: str,
        config: dict[str, Any],
        seed: int,
        wall_time_s: float,
        tokenizer_hash: str | None = None,
    ) -> Provenance:
        return cls(
            stage=stage,
            model_id=model_id,
            model_hash=model_hash,
            task=task,
            data_hash=data_hash,
            config=config,
            seed=seed,
            versions=package_versions(),
            wall_time_s=round(float(wall_time_s), 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            machine=machine_info(),
            tokenizer_hash=tokenizer_hash,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        # a field added later (tokenizer_hash) has a default, and artifacts written before it lack it
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d or f.default is None})


@functools.cache
def _cpu_model() -> str | None:
    """The processor's model name where the system tells it (Linux's /proc, macOS's sysctl):
    ``platform.processor()`` names only the architecture, alike for every x86 or Apple silicon machine."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """A short description of the machine a number was measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if model := _cpu_model():
        info["cpu_model"] = model
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:  # torch missing is not an error for provenance
        pass
    return info


def machine_text(machine: dict[str, Any]) -> str:
    """A machine as messages state it: processor, CPUs, torch threads and any GPU."""
    cpu = machine.get("cpu_model") or machine.get("processor", "?")
    text = f"{cpu} with {machine.get('cpu_count', '?')} CPUs"
    if machine.get("torch_threads") is not None:
        n = machine["torch_threads"]
        text += f", {n} torch thread" + ("" if n == 1 else "s")
    return text + (f", {machine['cuda_device']}" if machine.get("cuda_device") else "")


def other_machine(measured: dict[str, Any], here: dict[str, Any], device_type: str) -> list[str]:
    """What differs between the machine ``measured`` describes and ``here`` (both :func:`machine_info`)
    that moves a ``device_type`` step's time: the GPU on CUDA, the processor, its CPUs and torch's threads
    on a CPU. A field one of the two lacks (a record from before it was kept) is not a difference."""
    keys = (
        ("cuda_device",)
        if device_type == "cuda"
        else ("cpu_model", "processor", "cpu_count", "torch_threads")
    )
    return [k for k in keys if k in measured and k in here and measured[k] != here[k]]


# ---------------------------------------------------------------------------------------------------------
# Owners of temporary files and locks
# ---------------------------------------------------------------------------------------------------------


def _host_tag() -> str:
    """This machine's name as it appears in temporary names: no dots or dashes, at most 32 characters."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _pid_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot, where the system says (Linux): with the
    pid, it names one process, where a pid alone may have been reused since."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the name may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace where the system names one (Linux): a pid from another namespace (a
    container on the same machine) names another process here, or none."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _hold(fd: int) -> None:
    """Take an exclusive ``flock`` on ``fd``'s file where the system has one: held until the process
    closes it or ends, however it ends, and seen from every pid namespace of the machine."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):  # no flock here (another platform, some network file systems)
        pass


def _flocked(path: Path) -> bool | None:
    """Whether some process holds ``path``'s ``flock`` (:func:`_hold`); None where that cannot be told."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # and with it the probe's own shared lock
    return False


def _boot_id() -> str | None:
    """This boot's id where the system has one (Linux): a lock from before a reboot is stale."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of layercard's temporaries (``.NAME.HOST-PID.XXXX.tmp``): never the
    content of a folder, whether its writer is alive (the folder's lock says so) or gone (swept)."""
    return _TEMP_RE.match(name) is not None


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove ``folder``'s temporary siblings (of ``name``, or of any name) whose owner process is gone.

    Names of the form ``.NAME.HOST-PID.XXXX.tmp`` are removed when written on this machine by a process
    that is gone; a live owner's temporaries (this process's included) are left alone. Those of an older
    layercard, which named no owner, are removed once an hour old by the next write of their name only.
    Returns what was removed.
    """
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    host, removed = _host_tag(), []
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m is None:
            if not _legacy_stale(p, name):
                continue
        elif (name is not None and m["name"] != name) or m["host"] != host:
            continue
        elif int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


_LEGACY_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_LEGACY_AGE_S = 3600.0


def _legacy_stale(p: Path, name: str | None) -> bool:
    """A temporary of an older layercard, which named no owner (``.NAME.XXXXXXXX.tmp``): stale once an
    hour old, far longer than any single write takes. Only a write of ``NAME`` removes it: a sweep of
    every name (``name`` None) could not tell it from a user's own file of that form."""
    m = _LEGACY_RE.match(p.name)
    if m is None or name is None or m["name"] != name:
        return False
    try:
        return time.time() - p.lstat().st_mtime > _LEGACY_AGE_S
    except OSError:
        return False


def _temp_prefix(name: str) -> str:
    return f".{name}.{_host_tag()}-{os.getpid()}."


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


def remove_folder(folder: str | os.PathLike[str]) -> None:
    """Delete ``folder`` so that an interrupt leaves it whole or gone: it is first renamed to a temporary
    sibling owned by this process, which a later sweep of its parent (:func:`remove_stale_temps`) removes
    where the delete was cut. Deleting in place would leave a part, perhaps without the file that says
    what the folder is."""
    folder = Path(folder)
    tmp = folder.parent / f"{_temp_prefix(folder.name)}{secrets.token_hex(4)}.tmp"
    try:
        folder.rename(tmp)
    except OSError as e:
        raise LayercardError(
            f"{folder}: cannot be removed to make it again ({e.strerror or e}); nothing in it was changed"
        ) from None
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and folders. On failure the temporary is removed and ``path`` is untouched, and the
    folders above it that this write made are removed again where they are still empty. Stale temporaries
    of the same name left by a killed process are removed first.
    """
    final = Path(path)
    _check_parents(final, str(final))
    made = _missing_folders(final.parent)
    done = False
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(final.parent, final.name)
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=final.parent))
        except OSError as e:
            raise _not_written(final, e) from None
        target = tmp / final.name
        try:
            yield target
            _commit(target, final, tmp)
            done = True
        except OSError as e:
            if not _write_failed(e, tmp, final):
                raise
            raise _not_written(final, e) from None
        except LayercardError as e:
            # a write inside the block names its file inside this temporary, which is gone once it fails:
            # named where it would have been
            if str(target) not in str(e):
                raise
            raise LayercardError(str(e).replace(str(target), str(final)), exit_code=e.exit_code) from None
        except Exception as e:
            # safetensors and torch's zip writer say a failed write in errors of their own
            if not _library_write_failed(e):
                raise
            raise _not_written(final, e, free=final.parent) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not done:
            for folder in made:  # deepest first; one that holds anything by now stays
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those above it that do not exist yet, deepest first: what a write would make."""
    out = []
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            break
        out.append(p)
    return out


def _write_failed(e: OSError, tmp: Path, final: Path) -> bool:
    """Whether ``e`` is the write's own failure (a full disk, a file-size limit, a read-only file system,
    no permission where it writes), not one of reading an input inside the block, which keeps its own
    message."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return True
    if e.errno not in (errno.EACCES, errno.EPERM):
        return False
    names = [Path(n) for n in (e.filename, e.filename2) if isinstance(n, (str, os.PathLike))]
    return any(n == final or tmp in n.parents or n == tmp for n in names)


# What safetensors (SafetensorError) and torch's zip writer (RuntimeError) say when the disk refuses a write.
_LIBRARY_WRITE_FAILURES = (
    "No space left on device", "os error 28", "File too large", "os error 27", "Disk quota exceeded",
    "PytorchStreamWriter failed writing", "unexpected pos",
)  # fmt: skip


def _library_write_failed(e: Exception) -> bool:
    """Whether a library's own error inside an atomic write is the disk refusing it."""
    text = str(e)
    return type(e).__name__ in ("SafetensorError", "RuntimeError") and any(
        m in text for m in _LIBRARY_WRITE_FAILURES
    )


def _not_written(final: Path, e: Exception, free: Path | None = None) -> LayercardError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else message_line(e)
    if free is not None:
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(free).free:,} bytes free there"
    return LayercardError(f"{final}: cannot be written ({reason}); nothing was written there")


def _current_umask() -> int:
    """The process's umask, read where the system reports it: setting it to learn it (the only other way)
    leaves a moment in which another thread's files are made with no mask at all."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_modes(target: Path) -> None:
    """Give what was written the modes a plain write gives (some writers, safetensors among them, make
    their files readable by their owner alone), so that an artifact is as readable as its folder."""
    mask = _current_umask()
    paths = [target, *target.rglob("*")] if target.is_dir() else [target]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _sync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and everything in it) to the disk, so that a rename made after it
    never names data a power cut could still lose (a checkpoint cut short would block its resumption)."""
    paths = [path] if not path.is_dir() else [*sorted(path.rglob("*"), reverse=True), path]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:
            # some file systems cannot flush a folder, or anything: nothing more can be done there
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
        finally:
            os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it), where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(target: Path, final: Path, tmp: Path) -> None:
    """Flush the finished ``target`` to the disk and move it onto ``final``."""
    if target.exists():
        _usual_modes(target)
        _sync(target)
    _move(target, final, tmp)
    _sync_folder(final.parent)


def _move(target: Path, final: Path, tmp: Path) -> None:
    if target.is_dir() != final.is_dir() and final.exists():
        what = "a folder" if final.is_dir() else "a file"
        raise LayercardError(f"{final}: exists and is {what}; cannot replace it with a {_kind(target)}")
    if target.is_dir() and final.is_dir():
        # One atomic exchange where the system has it: the old folder lands in this write's temporary, a
        # unique name removed with it. Else two renames, the old folder put back if the second is cut.
        if _exchange(target, final):
            return
        old = tmp / f"{final.name}.old"
        final.rename(old)
        try:
            target.rename(final)
        except BaseException:
            old.rename(final)
            raise
    else:
        os.replace(target, final)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd, exchange = -100, 2
    if fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # no such call, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, both resolved (links and ``..`` followed)."""
    real, top = Path(path).resolve(), Path(folder).resolve()
    return real == top or top in real.parents


def _kind(p: Path) -> str:
    return "folder" if p.is_dir() else "file"


def _out_path(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, refusing an empty one (which would mean the current folder) and one through a
    symbolic link that leads nowhere (dangling, or a loop), which would fail only once the work is done."""
    if not str(os.fspath(path)).strip():
        raise LayercardError(f"{what}: is empty; give a path")
    p = Path(path)
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            raise LayercardError(f"{what} {p}: {q} is a symbolic link to nothing (dangling, or a loop)")
    return p


def _check_parents(p: Path, shown: str) -> Path:
    """Refuse a path below a file: the nearest existing ancestor must be a folder; it is returned."""
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LayercardError(f"{shown}: {parent} is a file, not a folder")
            return parent
    return Path(".")


def check_out_folder(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be one (an existing file, a file above it) or
    cannot be made (its nearest existing folder takes no new entries)."""
    p = _out_path(path, what)
    if p.exists() and not p.is_dir():
        raise LayercardError(f"{what} {p}: exists and is a file, not a folder")
    nearest = _check_parents(p, f"{what} {p}")
    _check_writable(p if p.is_dir() else nearest, f"{what} {p}")
    return p


def _check_writable(folder: Path, shown: str) -> None:
    """Refuse, before any work, a path whose nearest existing folder takes no new entries (no permission,
    a read-only or virtual file system): made and removed at once, a probe folder tells, where the mode
    bits would not (root, mounts)."""
    try:
        probe = tempfile.mkdtemp(prefix=_temp_prefix("probe"), suffix=".tmp", dir=folder)
    except OSError as e:
        raise LayercardError(f"{shown}: cannot create files in {folder} ({e.strerror or e})") from None
    os.rmdir(probe)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links and relative parts too)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_out_file(
    path: str | os.PathLike[str], what: str = "--out", *, example: str = "", suffix: str = ""
) -> Path:
    """Refuse, before any work, an output file path that is a folder (or lies below a file, or where no
    file can be made), or, with ``suffix``, one whose name does not end in it (a folder meant, not yet
    made, would become a file)."""
    p = _out_path(path, what)
    if p.is_dir():
        hint = f"; give a file path such as {p / example}" if example else "; give a file path"
        raise LayercardError(f"{what} {p}: is a folder{hint}")
    if suffix and p.suffix.lower() != suffix:
        # a name with another suffix meant a file (x8.txt: x8.json); one without may have meant a folder
        such = p.with_suffix(suffix) if p.suffix else p / example if example else None
        hint = f", such as {such}" if such is not None else ""
        raise LayercardError(f"{what} {p}: give a file path ending in {suffix}{hint}")
    _check_writable(_check_parents(p, f"{what} {p}"), f"{what} {p}")
    return p


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON atomically (temp file + rename); NaN and Infinity, which JSON lacks, are refused."""
    try:
        text = json.dumps(obj, indent=1, default=_json_default, allow_nan=False)
    except ValueError as e:
        if "out of range float" not in str(e).lower():
            raise
        found = non_finite(obj)
        raise LayercardError(
            f"{path}: refusing to write a non-finite number{f' at {found[0]}' if found else ''} "
            "(JSON has no NaN or Infinity); nothing was written"
        ) from None
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """The field path (``units[3].grad_norm``) and value of the first NaN or infinity in ``obj`` (nested
    mappings, lists, dataclasses, numpy values), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "(top level)", obj)
    if isinstance(obj, Mapping):
        items: Any = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        try:
            converted = _json_default(obj)
        except TypeError:
            return None
        return non_finite(converted, where) if converted is not obj else None
    for w, v in items:
        found = non_finite(v, w)
        if found is not None:
            return found
    return None


def finite_text(value: float) -> str:
    """A non-finite number as JSON-like text would write it (``NaN``, ``Infinity``, ``-Infinity``)."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def load_artifact(
    path: str | os.PathLike[str],
    *,
    kind: str,
    what: str,
    build: Callable[[dict[str, Any], Path], Any],
    file_name: str | None = None,
) -> Any:
    """Read a typed artifact: ``path`` or, for a folder holding ``file_name``, that file inside it.

    ``build(d, file)`` turns the checked JSON into the artifact; a field it cannot take is one line naming
    the file (``FILE: malformed plan (KeyError: 'units')``).
    """
    file = Path(path)
    if file_name is not None and file.is_dir() and (file / file_name).is_file():
        file = file / file_name  # the folder the stage wrote
    d = read_json(file, kind=kind)
    try:
        return build(d, file)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise LayercardError(f"{file}: malformed {what} ({type(e).__name__}: {e})".splitlines()[0]) from None


def read_json(path: str | os.PathLike[str], *, kind: str | None = None) -> dict[str, Any]:
    """Read an artifact, checking its kind and schema version; errors name the file."""
    p = Path(path)
    if p.is_dir():
        raise LayercardError(f"{p}: is a folder, not a JSON file")
    if not p.is_file():
        raise LayercardError(f"{p}: no such file")
    try:
        # utf-8-sig: a byte-order mark some editors add is not an error
        obj = json.loads(p.read_bytes().decode("utf-8-sig"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError as e:
        raise LayercardError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LayercardError(f"{p}: not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # a repeated key, or an integer past the digits Python converts
        raise LayercardError(f"{p}: not valid JSON ({message_line(e).split(';')[0]})") from None
    # Python's json reads NaN and Infinity, which JSON lacks and no artifact is written with: an edited
    # or foreign file's non-finite number must not become a result.
    found = non_finite(obj)
    if found is not None:
        raise LayercardError(f"{p}: {found[0]}: must be a finite number, got {finite_text(found[1])}")
    if kind is not None:
        if not isinstance(obj, dict) or obj.get("kind") != kind:
            got = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
            article = "an" if kind[:1] in "aeiou" else "a"
            raise LayercardError(f"{p}: expected {article} {kind} artifact, found kind={got!r}")
        if "schema_version" not in obj:
            raise LayercardError(f"{p}: schema_version: missing; this layercard reads {SCHEMA_VERSION}")
        ver = obj["schema_version"]
        # type first: True == 1 and 1.0 == 1 would pass as version 1
        if type(ver) is not int or ver != SCHEMA_VERSION:
            when = (
                " (a newer layercard wrote it)"
                if type(ver) is int and ver > SCHEMA_VERSION
                else " (an older layercard wrote it)"
                if type(ver) is int
                else ""
            )
            raise LayercardError(f"{p}: schema_version={ver!r}{when}, this layercard reads {SCHEMA_VERSION}")
    return obj


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a key written twice (an edit) would keep its last value in
    silence."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Field checks of an artifact read from disk
# ---------------------------------------------------------------------------------------------------------

_MISSING = object()


def show(value: Any) -> str:
    """A value as an error message shows it: NaN and Infinity as JSON spells them, text quoted."""
    if isinstance(value, float) and not math.isfinite(value):
        return finite_text(value)
    if isinstance(value, str):
        return f"{value[:40]!r} (text)"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        if len(value) > 8 or not all(_is_number(v) or isinstance(v, str) for v in value):
            return f"a list of {len(value)}"
        return "[" + ", ".join(show(v) if not isinstance(v, str) else repr(v) for v in value) + "]"
    return repr(value)[:40]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class Fields:
    """Checks of one artifact's fields; the first failure raises ``SOURCE: FIELD: PROBLEM, got VALUE``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str, value: Any = _MISSING) -> NoReturn:
        got = "" if value is _MISSING else f", got {show(value)}"
        raise LayercardError(f"{self.source}: {where}: {problem}{got}")

    def get(self, d: Mapping[str, Any], key: str, where: str = "") -> Any:
        """``d[key]``; a missing key fails naming it."""
        path = f"{where}.{key}" if where else key
        if key not in d:
            self.fail(path, "missing")
        return d[key]

    def mapping(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(where, "must be a mapping", value)
        return value

    def items(self, value: Any, where: str) -> Sequence[Any]:
        if not isinstance(value, list):
            self.fail(where, "must be a list", value)
        return value

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, "must be true or false", value)
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, "must be text", value)
        return value

    def integer(self, value: Any, where: str, *, minimum: int | None = None, below: int | None = None) -> int:
        """An integer (not a float, text or bool) in ``[minimum, below)``."""
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if ok and minimum is not None and value < minimum:
            ok = False
        if ok and below is not None and value >= below:
            ok = False
        if not ok:
            if below is not None:
                self.fail(where, f"must be an integer in {minimum or 0}..{below - 1}", value)
            self.fail(where, "must be an integer" + (f" >= {minimum}" if minimum is not None else ""), value)
        return int(value)

    def number(self, value: Any, where: str, *, minimum: float | None = None, above: bool = False) -> float:
        """A finite number (``minimum`` inclusive, or exclusive with ``above``)."""
        ok = _is_number(value) and math.isfinite(value)
        if ok and minimum is not None:
            ok = value > minimum if above else value >= minimum
        if not ok:
            bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
            self.fail(where, f"must be a finite number{bound}", value)
        return float(value)

    def numbers(self, value: Any, where: str, *, minimum: float | None = None) -> list[float]:
        """A list of finite numbers, each ``>= minimum``."""
        for i, v in enumerate(self.items(value, where)):
            if not (_is_number(v) and math.isfinite(v) and (minimum is None or v >= minimum)):
                self.number(v, f"{where}[{i}]", minimum=minimum)
        return value

    def known(self, d: Mapping[str, Any], names: set[str], where: str = "") -> None:
        """Refuse a key of ``d`` that is none of ``names``, naming the closest: a misspelt field
        (``default_scroe``) would otherwise be dropped and its default taken in silence."""
        import difflib

        extra = next((k for k in d if k not in names), None)
        if extra is not None:
            close = difflib.get_close_matches(str(extra), sorted(names), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.fail(f"{where}.{extra}" if where else str(extra), f"unknown field{hint}")

    def optional(self, value: Any, where: str, check: Callable[[Any, str], Any]) -> Any:
        """``value`` when null, else ``check(value, where)``."""
        return None if value is None else check(value, where)

    def finite_everywhere(self, value: Any, where: str) -> None:
        """No NaN or infinity anywhere in ``value`` (nested mappings and lists)."""
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(where, "must be a finite number", value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                self.finite_everywhere(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.finite_everywhere(v, f"{where}[{i}]")


# ---------------------------------------------------------------------------------------------------------
# One writer per folder
# ---------------------------------------------------------------------------------------------------------


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: the hidden sibling ``.NAME.lock`` (the folder itself stays clean).
    Links are followed, so that one folder reached by two paths has one lock."""
    t = Path(os.path.realpath(target))
    return t.parent / f".{t.name}.lock"


def _owner_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "pid_start": _pid_start(os.getpid()),
        "host": socket.gethostname(),
        "host_tag": _host_tag(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _owner_state(text: str, lock: Path) -> tuple[str, dict[str, Any]]:
    """("live" | "stale" | "elsewhere", the owner record) of lock file ``lock`` that held ``text``.

    An owner that holds the file's ``flock`` is live whatever its record says (it may be in another pid
    namespace, or have written no record yet); without one, the record is judged."""
    try:
        rec = json.loads(text)
        pid = int(rec["pid"])
    except (ValueError, KeyError, TypeError):
        # not a record layercard writes whole: no owner to wait for, unless one holds the file
        return ("live" if _flocked(lock) else "stale"), {}
    if rec.get("host_tag") != _host_tag():
        return "elsewhere", rec
    boot = _boot_id()
    if boot is not None and rec.get("boot_id") not in (None, boot):
        return "stale", rec  # written before this machine last booted
    held = _flocked(lock)
    if held:
        return "live", rec
    ns = _pid_namespace()
    if rec.get("pid_ns") not in (None, ns):
        # another pid namespace on this machine: its pid means nothing here, so only the flock can tell
        return ("stale" if held is False else "elsewhere"), rec
    live = pid == os.getpid() or _pid_alive(pid)
    started = rec.get("pid_start")
    if live and started is not None and _pid_start(pid) not in (None, started):
        live = False  # the pid was reused: its writer is gone
    return ("live" if live else "stale"), rec


def _describe(rec: dict[str, Any]) -> str:
    parts = [f"pid {rec.get('pid')} on {rec.get('host')}"]
    if rec.get("command"):
        parts.append(f"`{rec['command']}`")
    if rec.get("started"):
        parts.append(f"since {rec['started']}")
    return ", ".join(parts)


def _create_lock(lock: Path, text: str) -> int | None:
    """Create ``lock`` holding ``text`` in one step and hold its ``flock``: the open descriptor that holds
    it (closed when the lock is released), or None when the lock already exists."""
    tmp = lock.parent / f"{_temp_prefix(lock.name[1:])}{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:
        return None  # its folder was removed by a writer that made it and failed: the caller makes it again
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise LayercardError(f"{lock}: cannot write the lock file ({why})") from None
    _hold(fd)  # before the file is the lock: no moment where it is the lock and held by no one
    try:
        os.link(tmp, lock)  # a lock file never exists without its owner record
        return fd
    except FileExistsError:
        os.close(fd)
        return None
    except OSError:  # no hard links on this filesystem: an exclusive create, then the record
        os.close(fd)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        _hold(fd)
        os.write(fd, text.encode("utf-8"))
        return fd
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _take_over(lock: Path, seen: str) -> None:
    """Remove a stale lock, unless another process replaced it since it was read."""
    trash = lock.parent / f"{_temp_prefix(lock.name[1:])}{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.rename(lock, trash)
    except FileNotFoundError:
        return
    with contextlib.suppress(OSError):
        if trash.read_text(encoding="utf-8") != seen:  # a new owner got in between: give its lock back
            os.link(trash, lock)
    with contextlib.suppress(OSError):
        trash.unlink()


def _held(target: Any, what: str, state: str, rec: dict[str, Any], lock: Path) -> Exception:
    where = "" if state == "live" else f" (another machine: if it is gone, delete {lock})"
    return LayercardError(
        f"{Path(target)}: another layercard process is writing this {what} "
        f"({_describe(rec)}){where}; wait for it to finish or choose another output"
    )


def check_unlocked(target: str | os.PathLike[str], *, what: str = "folder") -> None:
    """Fail at once, writing nothing, when a live process holds ``target``'s lock (see :func:`writer_lock`).

    For a command that takes the lock only after slow preparation (loading a model): a stale lock is left
    for :func:`writer_lock` to take over.
    """
    held = _holder(target)
    if held is not None:
        raise _held(target, what, *held, lock_path(target))


def lock_held(target: str | os.PathLike[str]) -> bool:
    """Whether a process may be writing ``target``: a live one holds its lock, or one on another machine
    does (which cannot be checked, so it counts as held)."""
    return _holder(target) is not None


def _holder(target: str | os.PathLike[str]) -> tuple[str, dict[str, Any]] | None:
    """The state and owner record of ``target``'s lock where it is held (not stale), else None."""
    try:
        seen = lock_path(target).read_text(encoding="utf-8")
    except OSError:
        return None
    state, rec = _owner_state(seen, lock_path(target))
    return None if state == "stale" else (state, rec)


@contextlib.contextmanager
def writer_lock(
    target: str | os.PathLike[str], *, what: str = "folder", wait: float | None = 0.0
) -> Iterator[Path]:
    """Hold ``target``'s lock (:func:`lock_path`) for the block: one writing process per folder.

    A lock left by a process that is gone (this machine) is taken over, also where its pid now names
    another process (the lock records when its writer started). One held by a live process
    fails at once naming it, or with ``wait`` (seconds; None: no limit) is waited for. A lock written on
    another machine cannot be checked: it counts as held. Yields the lock file's path.
    """
    lock = lock_path(target)
    made = _missing_folders(lock.parent)  # made for the lock alone: removed again if the work left them empty
    mine = json.dumps(_owner_record())
    deadline = None if wait is None else time.monotonic() + wait
    said = wait == 0.0  # a wait of none at all is no wait to say
    while True:
        try:  # again each try: a failed writer may have removed it
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _not_written(Path(target), e) from None
        held = _create_lock(lock, mine)
        if held is not None:
            break
        try:
            seen = lock.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue  # released between our attempt and the read
        state, rec = _owner_state(seen, lock)
        if state == "stale":
            _take_over(lock, seen)
            continue
        # A lock written on another machine cannot be checked: waited for without end, a writer that died
        # there would hang this one unsaid.
        if state == "elsewhere" or (deadline is not None and time.monotonic() >= deadline):
            raise _held(target, what, state, rec, lock)
        if not said:
            from layercard.progress import say

            say(
                f"note: waiting for another layercard process writing {Path(target)} ({_describe(rec)})",
                enabled=True,
            )
            said = True
        time.sleep(0.1)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text(encoding="utf-8") == mine:  # still ours: nobody judged us stale and took it
                lock.unlink()
        os.close(held)  # the flock goes with it, after the file: a waiting writer then makes its own
        for folder in made:  # deepest first; one that holds anything stays
            with contextlib.suppress(OSError):
                folder.rmdir()
