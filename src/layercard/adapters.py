"""Bottleneck adapters (Houlsby and parallel) and one loader for every adapter folder layercard writes.

No maintained adapter library works with the pinned transformers (the ``adapters`` package pins an
old one), so this is a small module of ours (docs/design.md §7):

- ``houlsby`` (sequential): after the attention sublayer and after the MLP sublayer of a chosen decoder
  layer, ``h ← h + B(h)`` on the sublayer's output;
- ``parallel``: beside each sublayer, ``out ← sublayer(x) + B(x)`` with ``x`` the sublayer's input.

``B(x) = up(act(down(x)))`` with ``down: d → r`` and ``up: r → d``; ``up`` starts at zero, so an adapted
model starts exactly equal to its base. Adapters run through forward hooks on the attention and MLP
modules, found from :mod:`layercard.models`' units (the parents of the ``o`` and ``down`` modules), so
no architecture knowledge lives here. An :class:`AdapterSet` registers itself as a submodule of the
model while attached: its parameters then move with ``model.to()``, show in ``model.parameters()``
(which Accelerate/DDP need) and follow ``model.train()/eval()``; :meth:`AdapterSet.remove` undoes both.

Saved folder: ``layercard_adapter.json`` (kind, bottleneck, layers, activation, base model hash,
schema version) and ``adapter_model.safetensors``. :func:`load_adapter` also opens PEFT folders.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.artifacts import SCHEMA_VERSION, atomic_path
from layercard.errors import LayercardError, expect, first_line

__all__ = [
    "ACTIVATIONS",
    "ADAPTER_ATTR",
    "ADAPTER_KINDS",
    "CONFIG_FILE",
    "PEFT_CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterSet",
    "Bottleneck",
    "add_adapters",
    "attached_adapters",
    "load_adapter",
    "load_adapters",
    "save_adapters",
    "sublayer_paths",
]

ADAPTER_KINDS = ("houlsby", "parallel")
ACTIVATIONS = ("relu", "gelu")
CONFIG_FILE = "layercard_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
# Beside a PEFT adapter layercard trained: the base it was trained on (PEFT's own config names a path).
BASE_FILE = "layercard_base.json"
ADAPTER_ATTR = "layercard_adapters"  # submodule name on the (PEFT-unwrapped) model while attached
_SUBLAYERS = ("attn", "mlp")


class Bottleneck(nn.Module):
    """``up(act(down(x)))``: d → r → d, with ``up`` zero-initialised so the adapter starts as a no-op."""

    def __init__(self, d: int, r: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise LayercardError(f"activation {activation!r}: unknown; use one of {', '.join(ACTIVATIONS)}")
        self.down = nn.Linear(d, r)
        self.act: nn.Module = nn.ReLU() if activation == "relu" else nn.GELU()
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def sublayer_paths(model: nn.Module, layer: int) -> tuple[str, str]:
    """``(attention module path, MLP module path)`` of decoder layer ``layer``.

    They are the parents of the layer's ``o`` and ``down`` units, so the layout stays in models.py; a
    layer whose attention or MLP modules have no module of their own (OPT's ``fc1``/``fc2``) is refused.
    """
    from layercard import models

    layer_path = f"{models.layout_for(model).layers_path}.{layer}"
    out = []
    for role, what in (("o", "attention"), ("down", "MLP")):
        specs = models.units(model, role, layers=[layer])
        if not specs or "." not in specs[0].name:
            raise LayercardError(f"layer {layer}: no {role!r} module to locate its sublayer from")
        parent = specs[0].name.rsplit(".", 1)[0]
        if parent == layer_path:
            # A hook on the whole decoder layer would run the adapter after the residual sum, not beside
            # the sublayer (OPT keeps fc1 and fc2 directly in the layer).
            raise LayercardError(
                f"layer {layer}: the {what} modules ({specs[0].name}) sit directly in the decoder layer, "
                f"with no {what} module to place a bottleneck adapter on; use --kind lora for this model"
            )
        out.append(parent)
    return out[0], out[1]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The sublayer's input: first positional tensor, else ``hidden_states=`` (Llama calls by keyword)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    raise LayercardError("parallel adapter: cannot find the sublayer's input tensor in its call")


class AdapterSet(nn.Module):
    """Bottleneck adapters on some decoder layers, plus the hooks that run them.

    ``enabled`` switches all of them off (the model then computes its base outputs);
    :meth:`set_enabled_layers` keeps only some layers on. Use as a context manager, or call
    :meth:`remove`, to detach.
    """

    def __init__(
        self, kind: str, layers: Sequence[int], d: int, bottleneck: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.kind = kind
        self.layers = tuple(int(i) for i in layers)
        self.bottleneck = int(bottleneck)
        self.activation = activation
        self.d = int(d)
        self.adapters = nn.ModuleDict(
            {
                str(i): nn.ModuleDict({s: Bottleneck(d, bottleneck, activation) for s in _SUBLAYERS})
                for i in self.layers
            }
        )
        self.enabled = True
        self._active: frozenset[int] = frozenset(self.layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # A list, not an attribute: nn.Module would register the owner as *our* submodule (a cycle).
        self._owner: list[nn.Module] = []

    @property
    def enabled_layers(self) -> tuple[int, ...]:
        return tuple(i for i in self.layers if i in self._active)

    def set_enabled_layers(self, layers: Iterable[int] | None) -> None:
        """Run only the adapters of ``layers`` (None: all); the others are skipped, not deleted."""
        if layers is None:
            self._active = frozenset(self.layers)
            return
        wanted = {int(i) for i in layers}
        unknown = sorted(wanted - set(self.layers))
        if unknown:
            raise LayercardError(
                f"layers {unknown}: no adapters there; adapted layers are {list(self.layers)}"
            )
        self._active = frozenset(wanted)

    def _hook(self, layer: int, sub: str):
        adapter = self.adapters[str(layer)][sub]

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if not self.enabled or layer not in self._active:
                return None
            is_seq = isinstance(output, (tuple, list))
            h = output[0] if is_seq else output
            if not isinstance(h, torch.Tensor):
                raise LayercardError(
                    f"layer {layer} {sub}: sublayer returned {type(h).__name__}, not a tensor"
                )
            src = h if self.kind == "houlsby" else _first_tensor(args, kwargs)
            # Adapters keep their own dtype (fp32 beside a bf16 or 4-bit base) and cast at the boundary.
            dtype = adapter.down.weight.dtype
            new = h + adapter(src.to(dtype)).to(h.dtype)
            return (new, *output[1:]) if is_seq else new

        return hook

    def attach(self, model: nn.Module) -> AdapterSet:
        """Register the hooks on ``model`` and make this set its submodule (once: a second attach, or a
        model that holds adapters already, is refused)."""
        from layercard import models

        if self._owner:
            raise LayercardError("adapter set is already attached; call remove() first")
        base = models._base(model)
        if hasattr(base, ADAPTER_ATTR):
            raise LayercardError(f"model already has layercard adapters ({ADAPTER_ATTR}); remove them first")
        try:
            for i in self.layers:
                for sub, path in zip(_SUBLAYERS, sublayer_paths(model, i), strict=True):
                    mod = models.get_module(model, path)
                    h = mod.register_forward_hook(self._hook(i, sub), with_kwargs=True)
                    self._handles.append(h)
        except BaseException:
            self._detach_hooks()
            raise
        base.add_module(ADAPTER_ATTR, self)
        self._owner.append(base)
        return self

    def _detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def remove(self) -> None:
        """Detach the hooks and the submodule; the model computes its base outputs again."""
        self._detach_hooks()
        for owner in self._owner:
            if getattr(owner, ADAPTER_ATTR, None) is self:
                delattr(owner, ADAPTER_ATTR)
        self._owner.clear()

    def __enter__(self) -> AdapterSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bottleneck": self.bottleneck,
            "layers": list(self.layers),
            "activation": self.activation,
            "d": self.d,
        }

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layers={list(self.layers)}, bottleneck={self.bottleneck}"


def _check_kind(kind: str) -> None:
    if kind not in ADAPTER_KINDS:
        raise LayercardError(
            f"adapter kind {kind!r}: unknown; bottleneck kinds are {', '.join(ADAPTER_KINDS)}"
        )


def add_adapters(
    model: nn.Module,
    kind: str,
    layers: Sequence[int],
    bottleneck: int = 16,
    seed: int = 0,
    *,
    activation: str = "relu",
) -> AdapterSet:
    """Attach ``kind`` bottleneck adapters to decoder ``layers`` of ``model`` and return them.

    ``down`` is drawn from ``seed`` without touching the global RNG; ``up`` is zero. The adapters
    sit on the device of the first adapted layer's attention module, in float32.
    """
    from layercard import models

    _check_kind(kind)
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise LayercardError(f"bottleneck: must be a positive integer, got {bottleneck!r}")
    if not layers:
        raise LayercardError("layers: no layers to adapt")
    n = models.num_layers(model)
    bad = sorted({int(i) for i in layers if not 0 <= int(i) < n})
    if bad:
        raise LayercardError(f"layers: {bad} out of range; the model has layers 0..{n - 1}")
    layers = sorted({int(i) for i in layers})
    d = models.hidden_size(model)  # the residual stream's width, which the sublayers read and write
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aset = AdapterSet(kind, layers, d, bottleneck, activation)
    attn_path, _ = sublayer_paths(model, layers[0])
    ref = next(models.get_module(model, attn_path).parameters(), None)
    if ref is not None and ref.device.type != "meta":
        aset.to(ref.device)
    return aset.attach(model)


def attached_adapters(model: nn.Module) -> AdapterSet | None:
    """The :class:`AdapterSet` attached to ``model``, if any."""
    from layercard import models

    aset = getattr(models._base(model), ADAPTER_ATTR, None)
    return aset if isinstance(aset, AdapterSet) else None


def save_adapters(adapter_set: AdapterSet, path: str | Path, *, base_model_hash: str | None = None) -> Path:
    """Write ``layercard_adapter.json`` and ``adapter_model.safetensors`` into folder ``path``."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**adapter_set.config(), "base_model_hash": base_model_hash, "schema_version": SCHEMA_VERSION}
    if adapter_set._owner:  # the base it is attached to: what a load checks besides the width
        cfg.update(_shape_of(adapter_set._owner[0]))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_set.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        # one key: the metadata of several is written in an order that varies per process (the kind is in
        # the config beside it)
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")
    return folder


def _shape_of(model: nn.Module) -> dict[str, Any]:
    """The base model's architecture as an adapter folder records it: its type and number of layers."""
    from layercard import models

    return {"model_type": models.model_type(model), "n_layers": models.num_layers(model)}


def _read_config(folder: Path) -> dict[str, Any]:
    """``layercard_adapter.json``, every field it is read for checked (one line naming the field)."""
    from layercard.artifacts import Fields, read_json

    p = folder / CONFIG_FILE
    if not p.exists():
        raise LayercardError(f"{folder}: no {CONFIG_FILE}; not a layercard adapter folder")
    cfg = read_json(p)
    f = Fields(str(p))
    f.mapping(cfg, "the file")
    version = f.get(cfg, "schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        f.fail("schema_version", f"this layercard reads {SCHEMA_VERSION}", version)
    kind = f.text(f.get(cfg, "kind"), "kind")
    if kind not in ADAPTER_KINDS:
        f.fail("kind", f"must be one of {', '.join(ADAPTER_KINDS)}", kind)
    f.integer(f.get(cfg, "bottleneck"), "bottleneck", minimum=1)
    layers = f.items(f.get(cfg, "layers"), "layers")
    if not layers:
        f.fail("layers", "must list at least one layer", layers)
    for i, layer in enumerate(layers):
        f.integer(layer, f"layers[{i}]", minimum=0)
    f.optional(cfg.get("activation"), "activation", f.text)
    for key in ("d", "n_layers"):
        f.optional(cfg.get(key), key, lambda v, w: f.integer(v, w, minimum=1))
    for key in ("model_type", "base_model_hash"):
        f.optional(cfg.get(key), key, f.text)
    return cfg


def _refuse_other_shape(folder: Path, cfg: dict[str, Any], model: nn.Module) -> None:
    """Refuse a base of another architecture, depth or width than the one the adapters were saved on
    (where the folder records it): their weights would load into any model of the same width."""
    from layercard import models

    here = {**_shape_of(model), "d": models.hidden_size(model)}
    for key, what in (("model_type", "architecture"), ("n_layers", "number of layers"), ("d", "width")):
        saved = cfg.get(key)
        if saved is not None and here[key] is not None and saved != here[key]:
            raise LayercardError(
                f"{folder / CONFIG_FILE}: adapters of a model of {what} {saved}; this model's is {here[key]}"
            )


def load_adapters(model: nn.Module, path: str | Path, *, model_hash: str | None = None) -> AdapterSet:
    """Attach the bottleneck adapters saved in folder ``path`` to ``model``.

    Weights come from safetensors only; a missing, unexpected or mis-shaped tensor is an error naming
    it. With ``model_hash``, a folder trained on another base model is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    cfg = _read_config(folder)
    if model_hash is not None:
        _refuse_other_base(folder, cfg.get("base_model_hash"), model_hash)
    _refuse_other_shape(folder, cfg, model)
    wfile = folder / WEIGHTS_FILE
    if not wfile.is_file():
        raise LayercardError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError) as e:
        raise LayercardError(f"{wfile}: cannot read safetensors ({e})") from None
    width = int(cfg["bottleneck"])
    if not any(width in t.shape for t in tensors.values()):
        # refused before the adapters are built: a width the weights do not have could ask for any memory
        raise LayercardError(
            f"{folder / CONFIG_FILE}: bottleneck {width}: no tensor of {WEIGHTS_FILE} has it"
        )
    aset = add_adapters(model, cfg["kind"], cfg["layers"], width, activation=cfg.get("activation", "relu"))
    try:
        expected = aset.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unexpected {', '.join(extra)}"] if extra else []
            )
            raise LayercardError(f"{wfile}: tensors do not match {CONFIG_FILE}: {'; '.join(parts)}")
        bad = [k for k, v in expected.items() if tuple(v.shape) != tuple(tensors[k].shape)]
        if bad:
            k = bad[0]
            got, want = tuple(tensors[k].shape), tuple(expected[k].shape)
            raise LayercardError(f"{wfile}: tensor {k} has shape {got}, expected {want}")
        aset.load_state_dict(tensors)
    except BaseException:
        aset.remove()
        raise
    return aset


def load_adapter(model: nn.Module, path: str | Path, *, is_trainable: bool = False) -> nn.Module:
    """``model`` with the adapter in folder ``path`` attached: a PEFT folder or a layercard one.

    A PEFT folder (``adapter_config.json``) returns ``PeftModel.from_pretrained(model, path)``; a layercard
    folder (``layercard_adapter.json``) returns ``model`` itself with an :class:`AdapterSet` attached
    (see :func:`attached_adapters`). As with PEFT, the base weights are frozen and the adapter's are
    trainable only with ``is_trainable``.
    """
    # a LoadedModel is what every other function takes: say which part of it this one wants
    expect("load_adapter", "model", model, nn.Module, "pass the loaded model's .model")
    folder = Path(path)
    if (folder / PEFT_CONFIG_FILE).is_file():
        from peft import PeftModel

        _check_peft_config(folder / PEFT_CONFIG_FILE)
        if not (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_model.bin").is_file():
            # weights are read from safetensors only, as the models' are
            raise LayercardError(
                f"{folder}: holds adapter_model.bin but no adapter_model.safetensors; layercard loads "
                "weights from safetensors only (save the adapter with safe_serialization=True)"
            )
        try:
            with undone_on_failure(model), kept_torch_rng(model):
                return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
        except Exception as e:
            raise LayercardError(f"{folder}: PEFT cannot load this adapter ({first_line(e)})") from e
    if (folder / CONFIG_FILE).is_file():
        aset = load_adapters(model, folder)  # first: a folder it refuses leaves the model as it was
        own = {id(p) for p in aset.parameters()}
        for p in model.parameters():
            p.requires_grad_(is_trainable and id(p) in own)
        return model
    raise LayercardError(
        f"{folder}: not an adapter folder; looked for {PEFT_CONFIG_FILE} (PEFT) and {CONFIG_FILE} (layercard)"
    )


def _adapter_modules(model: nn.Module) -> set[str]:
    """Names of modules that belong to an adapter library or to layercard's adapters."""
    return {
        name
        for name, m in model.named_modules()
        if type(m).__module__.startswith(("peft.", "layercard.adapters"))
    }


@contextlib.contextmanager
def undone_on_failure(model: nn.Module) -> Iterator[None]:
    """Where the block raises (a library's error, Ctrl-C, memory), put ``model`` back as it was: the
    adapter layers the block wrapped around its modules removed, its ``requires_grad`` flags restored.
    PEFT wraps layer after layer before it can fail; a wrapper left behind would have the next run train
    the base itself."""
    before = _adapter_modules(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    had_config = "peft_config" in vars(model)
    try:
        yield
    except BaseException:
        _unwrap(model, _adapter_modules(model) - before)
        for n, p in model.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])
        if not had_config:
            vars(model).pop("peft_config", None)
        raise


@contextlib.contextmanager
def kept_torch_rng(model: nn.Module) -> Iterator[None]:
    """Leave the caller's torch random state as it was: PEFT draws the initial LoRA weights from it, also
    where they are then overwritten by saved ones."""
    device = next(model.parameters()).device
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        yield


def _unwrap(model: nn.Module, names: set[str]) -> None:
    """Put back the base layer of every wrapper among ``names`` (an adapter's layers left in ``model``)."""
    for name in sorted(names, key=len):  # outer wrappers first; their inner modules go with them
        parent_name, _, child = name.rpartition(".")
        try:
            parent, module = model.get_submodule(parent_name), model.get_submodule(name)
        except AttributeError:  # inside a wrapper already put back
            continue
        base_layer = getattr(module, "get_base_layer", None)
        if callable(base_layer):
            setattr(parent, child, base_layer())


# What a base's files other than its weights are recorded as (LoadedModel.base_files): the same weights
# read other tokens, or compute otherwise, under other tokenizer files or another config.json.
BASE_FILES = {"tokenizer_hash": "tokenizer or chat-template files", "config_hash": "config.json"}


def write_base(
    folder: str | Path, model_id: str, model_hash: str, files: Mapping[str, str] | None = None
) -> None:
    """Record in an adapter folder the base model it was trained on (:data:`BASE_FILE`), with the hashes
    of its other files ``files`` (:data:`BASE_FILES`) where it came from a folder."""
    from layercard.artifacts import write_json

    record = {"model_id": model_id, "model_hash": model_hash, **(files or {})}
    write_json(Path(folder) / BASE_FILE, record)


def recorded_base(folder: str | Path) -> str | None:
    """The base model an adapter folder names (its :data:`BASE_FILE`'s ``model_id``, as it was loaded:
    a built-in name, a folder or a hub id), or None where it names none."""
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        return None
    try:
        model_id = json.loads(path.read_text(encoding="utf-8")).get("model_id")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise LayercardError(f"{path}: not a JSON object") from None
    return model_id if isinstance(model_id, str) and model_id else None


def check_base(folder: str | Path, model_hash: str, files: Mapping[str, str] | None = None) -> None:
    """Refuse an adapter folder trained on another base: its :data:`BASE_FILE` (PEFT) or its config's
    ``base_model_hash`` (layercard's format). A folder that records neither is not checked. Where the
    weights are the same but the base's other ``files`` differ from those recorded, say so: the adapter
    loads, and may not do here what it did there."""
    p = Path(folder)
    record: dict[str, Any] = {}
    saved = None
    for name, key in ((BASE_FILE, "model_hash"), (CONFIG_FILE, "base_model_hash")):
        if (p / name).is_file():
            try:
                record = json.loads((p / name).read_text(encoding="utf-8"))
                saved = record.get(key)
            except (json.JSONDecodeError, AttributeError):
                raise LayercardError(f"{p / name}: not a JSON object") from None
            break
    _refuse_other_base(p, saved, model_hash)
    now = files or {}
    other = [
        what for key, what in BASE_FILES.items() if key in record and key in now and record[key] != now[key]
    ]
    if other:
        from layercard.progress import say

        say(
            f"note: {p}: trained on a base with these weights but other {' and '.join(other)} than this "
            "model's; what it measured there may not hold here",
            enabled=True,
        )


def _refuse_unweighted_ranks(folder: Path, cfg: Any) -> None:
    """Refuse a PEFT config whose largest rank no LoRA tensor of its weights has: PEFT builds the modules
    at the config's ranks before it reads a weight, so such a rank could ask for any memory. Read from the
    safetensors header alone."""
    from safetensors import SafetensorError, safe_open

    weights = folder / "adapter_model.safetensors"
    if not isinstance(cfg, dict) or not weights.is_file():
        return
    ranks = [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    if not ranks:
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            dims = {d for k in f.keys() if ".lora_" in k for d in f.get_slice(k).get_shape()}
    except (SafetensorError, OSError) as e:
        raise LayercardError(f"{weights}: cannot read safetensors ({first_line(e)})") from None
    if dims and max(ranks) > max(dims):
        raise LayercardError(
            f"{folder / PEFT_CONFIG_FILE}: rank {max(ranks)}: larger than any LoRA tensor of {weights.name} "
            f"({max(dims)} at most)"
        )


def _check_peft_config(file: Path) -> None:
    """Refuse a PEFT config that asks for more than its weights hold (:func:`_refuse_unweighted_ranks`) or
    that would change the base itself: ``layer_replication`` adds layers to the shared base, which
    detaching the adapter does not undo, so every later use of it would be wrong."""
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LayercardError(f"{file}: not readable JSON ({first_line(e)})") from None
    _refuse_unweighted_ranks(file.parent, cfg)
    if isinstance(cfg, dict) and cfg.get("layer_replication"):
        raise LayercardError(
            f"{file}: layer_replication: {cfg['layer_replication']!r}; an adapter that replicates base "
            "layers changes the base model itself, which layercard shares between adapters: not loaded"
        )


def _refuse_other_base(folder: Path, saved: Any, model_hash: str) -> None:
    """The error for an adapter whose recorded base hash ``saved`` (None: not recorded) is not this one."""
    if saved is not None and saved != model_hash:
        raise LayercardError(
            f"{folder}: adapter was trained on base model {str(saved)[:12]}, this model is {model_hash[:12]}"
        )


@contextlib.contextmanager
def attached(
    base: nn.Module,
    adapter: str | Path,
    *,
    model_hash: str | None = None,
    files: Mapping[str, str] | None = None,
) -> Iterator[nn.Module]:
    """The base with ``adapter`` attached for the block; detached again afterwards, even on error.

    Callers reuse ``loaded.model`` (e.g. evaluate several adapters or trim levels on one base), so the
    base must come back exactly as it was: adapter layers or hooks removed and ``requires_grad`` flags
    restored (attaching freezes every base parameter). With ``model_hash``, an adapter recorded as trained
    on another base is refused (:func:`check_base`, which also compares the base's other ``files``).
    """
    if model_hash is not None:
        check_base(adapter, model_hash, files)
    before = _adapter_modules(base)
    had = attached_adapters(base)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    # PEFT wraps the base's layers before it finds the weights do not fit: load_adapter unwraps them
    adapted = load_adapter(base, adapter, is_trainable=False)
    try:
        yield adapted
    finally:
        if adapted is not base and callable(getattr(adapted, "unload", None)):
            adapted.unload()  # PeftModel: swaps every LoRA wrapper back to its base_layer, no merge
        else:
            aset = attached_adapters(base)  # layercard bottleneck adapters: hooks + a submodule
            if aset is not None and aset is not had:
                aset.remove()
        for n, p in base.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])
        left = _adapter_modules(base) - before
        if left:
            raise LayercardError(
                f"adapter {adapter}: {len(left)} adapter modules stayed attached to the base model "
                f"after use (e.g. {sorted(left)[0]})"
            )
