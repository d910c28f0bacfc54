"""The trimmed adapter on disk (docs/design.md §8): the adapter without its decoder layers ``> K``.

For LoRA a vanilla PEFT folder (state dict restricted, ``target_modules`` rewritten as the full paths of
the kept modules, ``rank_pattern``/``alpha_pattern`` restricted to keys that still match a kept module);
for layercard bottleneck adapters the same in layercard's format. Adapter modules outside the decoder
layers (e.g. a LoRA on ``lm_head``) and PEFT ``modules_to_save`` copies (which are not tuner layers) are
never trimmed. :func:`export_merged` merges a trimmed LoRA into the base weights.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.adapters import kept_torch_rng
from layercard.artifacts import atomic_path, is_within
from layercard.errors import LayercardError
from layercard.trim.mask import _is_int, _layer_of, _layers_path

__all__ = ["MERGED_MARK", "check_merged_target", "export_merged", "export_trimmed"]

# Written into a merged model's folder: a later export may replace a folder holding it, and no other.
MERGED_MARK = "layercard_merged.json"
_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"


def _adapter_kind(adapter_dir: Path) -> str:
    from layercard.adapters import CONFIG_FILE, PEFT_CONFIG_FILE

    if not adapter_dir.is_dir():
        raise LayercardError(f"adapter {adapter_dir}: no such folder")
    if (adapter_dir / PEFT_CONFIG_FILE).is_file():
        return "peft"
    if (adapter_dir / CONFIG_FILE).is_file():
        return "layercard"
    raise LayercardError(
        f"{adapter_dir}: not an adapter folder; looked for {PEFT_CONFIG_FILE} (PEFT) "
        f"and {CONFIG_FILE} (layercard)"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LayercardError(f"{path.parent}: no {path.name} (trimming reads safetensors weights only)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LayercardError(f"{path}: cannot read safetensors ({e})") from None


def _module_of_key(key: str) -> str:
    """Module path (relative to the base model) of a saved PEFT LoRA tensor name."""
    name = key.removeprefix("base_model.model.")
    head, sep, _ = name.partition(".lora_")
    return head if sep else name.rsplit(".", 1)[0]


def check_mergeable(src: Path, model: nn.Module) -> None:
    """Refuse, before any work, merging an adapter of a module whose weight another module shares (a LoRA
    on an lm_head tied to the embeddings): merged into the one weight, it would change both."""
    from safetensors import safe_open

    from layercard.models import tied_modules

    tied = tied_modules(model)
    if not tied:
        return
    with safe_open(str(src / _PEFT_WEIGHTS), framework="pt") as f:
        adapted = {_module_of_key(k) for k in f.keys() if ".lora_" in k}
    both = sorted(adapted & tied)
    if both:
        raise LayercardError(
            f"--export-merged: {src} adapts {both[0]}, whose weight another module shares (tied "
            "embeddings): merged, it would change both; trim without --export-merged"
        )


def check_trimmable(src: Path) -> dict[str, Any]:
    """The PEFT adapter config of ``src``, refused (before any work) where trimming cannot export it: not
    LoRA, LoRA on raw parameters, or weights not in safetensors."""
    try:
        cfg = json.loads((src / _PEFT_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise LayercardError(f"{src / _PEFT_CONFIG}: not valid JSON ({e.msg}: {where})") from None
    if cfg.get("peft_type") != "LORA":
        raise LayercardError(
            f"{src}: peft_type={cfg.get('peft_type')!r}; trimming exports LoRA adapters only"
        )
    if cfg.get("target_parameters"):
        raise LayercardError(f"{src}: target_parameters (LoRA on raw parameters) cannot be trimmed")
    if not (src / _PEFT_WEIGHTS).is_file():
        raise LayercardError(f"{src}: no {_PEFT_WEIGHTS} (trimming reads safetensors weights only)")
    return cfg


def _write_trimmed_peft(src: Path, dst: Path, keep_upto: int, layers_path: str) -> dict[str, Any]:
    from peft.utils.other import get_pattern_key

    cfg = check_trimmable(src)
    tensors = _read_safetensors(src / _PEFT_WEIGHTS)
    kept: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        layer = _layer_of(key.removeprefix("base_model.model."), layers_path)
        # Only LoRA tensors are trimmed: modules_to_save copies are not tuner layers, so masking leaves
        # them on too, and dropping them would make PEFT report missing keys.
        if ".lora_" not in key or layer is None or layer <= keep_upto:
            kept[key] = t.contiguous()
    modules = sorted({_module_of_key(k) for k in kept if ".lora_" in k})
    if not modules:
        raise LayercardError(
            f"keep_upto={keep_upto}: no LoRA module of {src} is left in layers <= {keep_upto}"
        )
    new = dict(cfg)
    # Exact module paths: PEFT matches a listed name exactly (or as a suffix), and a list of names
    # bypasses layers_to_transform, which PEFT anyway refuses next to a string target_modules.
    new["target_modules"] = modules
    new["layers_to_transform"] = None
    new["layers_pattern"] = None
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(field) or {}
        # PEFT picks, per module, the first key that matches it; dropping keys that match no kept module
        # cannot change any kept module's pick.
        new[field] = {k: v for k, v in pattern.items() if any(get_pattern_key([k], m) == k for m in modules)}
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    home = _own_tree(src)
    for f in src.iterdir():  # README, tokenizer files...: carried over unchanged
        # a link out of the adapter's own files (to a key, a home folder) is not the adapter's to share
        if f.is_file() and f.name not in (_PEFT_CONFIG, _PEFT_WEIGHTS) and is_within(f, home):
            shutil.copy2(f, dst / f.name)
    save_file(kept, str(dst / _PEFT_WEIGHTS), metadata={"format": "pt"})
    (dst / _PEFT_CONFIG).write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "format": "peft",
        "kept_tensors": len(kept),
        "dropped_tensors": len(tensors) - len(kept),
        "modules": modules,
    }


def _write_trimmed_layercard(src: Path, dst: Path, keep_upto: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    from layercard.adapters import CONFIG_FILE, WEIGHTS_FILE, _read_config

    cfg = _read_config(src)
    layers = [int(i) for i in cfg["layers"] if int(i) <= keep_upto]
    if not layers:
        raise LayercardError(
            f"keep_upto={keep_upto}: no adapter layer of {src} is left (it has {cfg['layers']})"
        )
    tensors = _read_safetensors(src / WEIGHTS_FILE)
    kept = {}
    for key, t in tensors.items():
        m = re.match(r"adapters\.(\d+)\.", key)
        if m is None:
            raise LayercardError(f"{src / WEIGHTS_FILE}: tensor {key!r} is not a per-layer adapter weight")
        if int(m.group(1)) <= keep_upto:
            kept[key] = t.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})  # one key: see save_adapters
    (dst / CONFIG_FILE).write_text(json.dumps({**cfg, "layers": layers}, indent=1) + "\n", encoding="utf-8")
    modules = [f"layer {i}:{s}" for i in layers for s in ("attn", "mlp")]
    return {
        "format": "layercard",
        "kept_tensors": len(kept),
        "dropped_tensors": len(tensors) - len(kept),
        "modules": modules,
    }


def _write_trimmed(adapter_dir: Path, dst: Path, keep_upto: int, model: nn.Module) -> dict[str, Any]:
    if _adapter_kind(adapter_dir) == "peft":
        return _write_trimmed_peft(adapter_dir, dst, keep_upto, _layers_path(model))
    return _write_trimmed_layercard(adapter_dir, dst, keep_upto)


def export_trimmed(adapter_dir: str | Path, out_dir: str | Path, keep_upto: int, model: nn.Module) -> Path:
    """Write the adapter in ``adapter_dir`` without its decoder layers ``> keep_upto`` to ``out_dir``.

    ``model`` (the base, with or without the adapter) supplies the decoder-layer path. LoRA: a vanilla
    PEFT folder that ``PeftModel.from_pretrained`` loads with no missing keys; bottleneck adapters:
    layercard's format. ``out_dir`` appears complete or not at all.
    """
    if not _is_int(keep_upto) or keep_upto < 0:
        raise LayercardError(f"keep_upto={keep_upto!r}: must be a layer index >= 0")
    from layercard.models import num_layers

    n = num_layers(model)
    if keep_upto >= n:
        # Past the last layer nothing is dropped: a "trimmed" copy would be the whole adapter.
        raise LayercardError(
            f"keep_upto={keep_upto}: the model has layers 0..{n - 1}; nothing would be dropped"
        )
    src = Path(adapter_dir)
    _adapter_kind(src)
    with atomic_path(out_dir) as tmp:
        _write_trimmed(src, tmp, keep_upto, model)
    return Path(out_dir)


def check_merged_target(
    out_dir: str | Path,
    keep: Sequence[str | Path],
    what: str = "--export-merged",
    *,
    outside: Sequence[str | Path] = (),
) -> None:
    """Refuse, before any work, a merged model's folder whose replacement would lose files: a folder
    that is, or holds, one of ``keep`` (the adapter, the trim's own folder), one inside one of
    ``outside``, or one that holds anything but a merged model written before (its :data:`MERGED_MARK`)."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise LayercardError(f"{what} {p}: exists and is a file, not a folder")
    for k in keep:
        if is_within(k, p):
            raise LayercardError(f"{what} {p}: would replace {k}, which it holds; give a folder of its own")
    for k in outside:
        if is_within(p, k):  # the folder itself is one of keep, refused above
            raise LayercardError(f"{what} {p}: is inside the adapter folder {k}; give a folder of its own")
    if p.is_dir() and any(p.iterdir()) and not (p / MERGED_MARK).is_file():
        raise LayercardError(
            f"{what} {p}: holds files that are not a merged model this version of layercard trim wrote "
            f"(no {MERGED_MARK}); remove it, or give a new or empty folder"
        )


def export_merged(
    loaded: Any,
    trimmed_dir: str | Path,
    out_dir: str | Path,
    *,
    in_place: bool = False,
    check: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> nn.Module:
    """Merge the (trimmed) LoRA adapter into the base and save it as safetensors plus the tokenizer.

    The folder loads with :func:`layercard.models.load_model`. ``in_place=False`` merges into a deep copy
    (twice the model's memory); ``in_place=True`` merges into ``loaded.model`` itself, which then *is* the
    merged model (for a caller that is done with the base). ``check`` sees the merged model before
    anything is written (it raises to write nothing); what it returns goes into the folder's
    :data:`MERGED_MARK` beside the base and adapter. Returns the merged model.
    """
    from peft import PeftModel

    src = Path(trimmed_dir)
    if _adapter_kind(src) != "peft":
        raise LayercardError(
            f"{src}: bottleneck adapters (houlsby/parallel) are nonlinear and cannot be merged into weights"
        )
    check_merged_target(out_dir, [src], what="merged model folder")
    base = loaded.model if in_place else copy.deepcopy(loaded.model)
    with kept_torch_rng(base):  # PEFT draws initial LoRA weights from the caller's generator
        merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    merged.eval()
    checked = check(merged) if check is not None else {}
    mark = {"base": loaded.model_id, "base_hash": loaded.model_hash, "adapter": str(src), **checked}
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
        (tmp / MERGED_MARK).write_text(json.dumps(mark, indent=1) + "\n", encoding="utf-8")
    return merged


def _own_tree(src: Path) -> Path:
    """The tree an adapter folder's files may link into: a Hugging Face cache's model folder
    (``models--*``, whose snapshot files are links into its ``blobs/``), else the folder itself."""
    here = src.resolve()
    return next((p for p in (src.absolute(), *src.absolute().parents) if p.name.startswith("models--")), here)
