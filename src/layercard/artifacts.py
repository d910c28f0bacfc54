"""Versioned JSON artifacts: provenance, content hashes and atomic writes.

Every artifact a stage writes goes through :func:`write_json` (temp file + rename), so a failed
stage never leaves a half-written file behind, and carries a :class:`Provenance` block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError

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
    out["python"] = platform.python_version()
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def _update_from_file(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def hash_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    _update_from_file(h, Path(path))
    return h.hexdigest()


def hash_folder(folder: str | os.PathLike[str]) -> str:
    """sha256 over a folder's relative file names and bytes: the one identity of an adapter folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder)}\n".encode())
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
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def machine_info() -> dict[str, Any]:
    """A short description of the machine a number was measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:  # torch missing is not an error for provenance
        pass
    return info


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and folders. On failure the temporary is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and target.is_dir():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            target.rename(final)
            shutil.rmtree(old)
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike[str], *, kind: str | None = None) -> dict[str, Any]:
    """Read an artifact, checking its kind and schema version; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise LayercardError(f"{p}: no such file")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LayercardError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if kind is not None:
        if not isinstance(obj, dict) or obj.get("kind") != kind:
            got = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
            raise LayercardError(f"{p}: expected a {kind} artifact, found kind={got!r}")
        ver = obj.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise LayercardError(f"{p}: schema_version={ver!r}, this layercard reads {SCHEMA_VERSION}")
    return obj


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
