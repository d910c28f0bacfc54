"""Boundary layer and trimming (DESIGN §8): logit lens, boundary candidates, sweep, trimmed export.

1. **Trace** (:func:`trace`): teacher forced on validation examples, each decoder layer's output hidden
   state goes through the final norm and the LM head (:func:`layercard.models.logits_from_hidden`, the
   logit lens); ``P(ℓ)`` is the mean over target tokens of the probability of the gold next token, with
   the adapter on and off. Layer outputs are taken with forward hooks on the decoder layers, not with
   ``output_hidden_states`` (whose last entry is already after the final norm in transformers 5).
2. **Candidates** (:func:`boundary_candidates`): ``sharpest_rise`` is the layer ``j ≥ 1`` maximising
   ``P(j) − P(j−1)`` (the layer whose own computation raises P most, i.e. ``ℓ+1`` for the argmax of
   ``P(ℓ+1) − P(ℓ)``); ``half_final`` is the first layer with ``P(ℓ) ≥ P(L−1)/2``.
3. **Sweep** (:func:`sweep`): for each boundary ``K`` the adapters of decoder layers ``> K`` are switched
   off (:func:`masked_layers`) and the validation set is scored (generation metrics and loss).
   :func:`choose_boundary` takes the best; rows within ``tie_tolerance`` (absolute, on the metric's own
   scale; default 1e-9, i.e. exact ties up to float noise) of the best count as tied, and a tie goes to
   fewer adapted layers, then the smaller ``K``.
4. **Export** (:func:`export_trimmed`): the adapter without layers ``> K``. For LoRA a vanilla PEFT folder
   (state dict restricted, ``target_modules`` rewritten as the full paths of the kept modules,
   ``rank_pattern``/``alpha_pattern`` restricted to keys that still match a kept module); for layercard
   bottleneck adapters the same in layercard's format.

``K`` always names a decoder layer that carries an adapter: boundaries that keep the same adapted layers
give identical models, so a window is mapped to the highest adapted layer ``≤ K`` and deduplicated
(:func:`candidate_ks`). Adapter modules outside the decoder layers (e.g. a LoRA on ``lm_head``) and PEFT
``modules_to_save`` copies (which are not tuner layers) are never trimmed.

How layers are masked: PEFT tuner layers (every ``BaseTunerLayer`` inside decoder layer ``ℓ > K``) get
their ``_disable_adapters`` flag set for the block, which is the flag PEFT's own ``disable_adapter()``
sets; their forward then returns ``base_layer(x)`` exactly, without computing the LoRA branch, which is
bit for bit what a model without that LoRA module computes. (``enable_adapters()`` is not used because
it also flips ``requires_grad``.) Layercard bottleneck adapters use
:meth:`layercard.adapters.AdapterSet.set_enabled_layers`. A merged adapter is refused: disabling it would
unmerge the weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.adapters import attached
from layercard.artifacts import SCHEMA_VERSION, Provenance, atomic_path, hash_folder, read_json, write_json
from layercard.errors import LayercardError
from layercard.progress import track
from layercard.tasks import METRICS, Example, Task, batches, compute_metrics, encode_task

__all__ = [
    "MERGED_DIR",
    "TRACE_FILE",
    "TRACE_PNG",
    "TRIMMED_DIR",
    "TRIM_FILE",
    "Trace",
    "TraceConfig",
    "TrimConfig",
    "adapted_layers",
    "adapted_modules",
    "adapters_off",
    "boundary_candidates",
    "candidate_ks",
    "choose_boundary",
    "export_merged",
    "export_trimmed",
    "lens_logits",
    "masked_layers",
    "run_trace",
    "sweep",
    "task_scorer",
    "trace",
    "trim",
]

TRACE_KIND = "trace"
TRIM_KIND = "trim"
TRACE_FILE = "trace.json"
TRACE_PNG = "trace.png"
TRIM_FILE = "trim.json"
TRIM_PNG = "trim.png"
TRIMMED_DIR = "adapter-trimmed"
MERGED_DIR = "merged"
_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
# Logit-lens rows per chunk: bounds the (rows × vocab) float32 logits to about 256 MB for any vocabulary.
_LENS_ELEMS = 1 << 26


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(owner: str, name: str, v: Any, minimum: int, *, optional: bool = False) -> None:
    if v is None and optional:
        return
    if not _is_int(v) or v < minimum:
        tail = " or null" if optional else ""
        raise LayercardError(f"{owner}: {name}={v!r} must be an integer >= {minimum}{tail}")


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """Which validation examples the logit lens reads and how they are batched. Errors name the field."""

    examples: int | None = 64  # seeded subset of the split (Task.subset); None = all
    batch_size: int = 8
    max_length: int | None = 256  # cap on prompt + target tokens; None: the format's limits only
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("trace config", "examples", self.examples, 1, optional=True)
        _check_int("trace config", "batch_size", self.batch_size, 1)
        _check_int("trace config", "max_length", self.max_length, 2, optional=True)
        _check_int("trace config", "seed", self.seed, -(2**63))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrimConfig:
    """The boundary sweep and export. Errors name the field.

    K values: ``window=(a, b)`` sweeps ``a..b``; ``all_layers`` every layer; otherwise ``±radius`` layers
    around each trace candidate. The last layer (no trimming) is always in the sweep.
    """

    examples: int | None = 64
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: task.format.max_new_tokens
    max_length: int | None = 256
    metric: str | None = None  # selection metric; None: the task's primary; "loss" selects the lowest loss
    window: tuple[int, int] | None = None
    all_layers: bool = False
    radius: int = 3
    tie_tolerance: float = 1e-9
    latency_repeats: int = 3  # generation passes timed before and after; the minimum is reported
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("trim config", "examples", self.examples, 1, optional=True)
        _check_int("trim config", "latency_repeats", self.latency_repeats, 1)
        _check_int("trim config", "batch_size", self.batch_size, 1)
        _check_int("trim config", "max_new_tokens", self.max_new_tokens, 1, optional=True)
        _check_int("trim config", "max_length", self.max_length, 2, optional=True)
        _check_int("trim config", "radius", self.radius, 0)
        _check_int("trim config", "seed", self.seed, -(2**63))
        if not isinstance(self.all_layers, bool):
            raise LayercardError(f"trim config: all_layers={self.all_layers!r} must be true or false")
        if self.metric is not None and self.metric != "loss" and self.metric not in METRICS:
            valid = ", ".join([*METRICS, "loss"])
            raise LayercardError(f"trim config: metric={self.metric!r} unknown; valid: {valid}")
        tol = self.tie_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise LayercardError(f"trim config: tie_tolerance={tol!r} must be a finite number >= 0")
        if self.window is not None:
            w = tuple(self.window)
            if len(w) != 2 or not all(_is_int(x) for x in w) or not 0 <= w[0] <= w[1]:
                raise LayercardError(
                    f"trim config: window={self.window!r} must be two layer indices a <= b, both >= 0"
                )
            object.__setattr__(self, "window", (int(w[0]), int(w[1])))
            if self.all_layers:
                raise LayercardError("trim config: window and all_layers exclude each other; give one")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["window"] = list(self.window) if self.window is not None else None
        return d

    def trace_config(self) -> TraceConfig:
        """The trace that supplies this sweep's candidates: same examples, batching and length cap."""
        return TraceConfig(
            examples=self.examples, batch_size=self.batch_size, max_length=self.max_length, seed=self.seed
        )


# ---------------------------------------------------------------------------------------------------------
# Which modules are adapters, and in which layer
# ---------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The model PEFT wraps (module names then match PEFT's target names); other models unchanged."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def _layers_path(model: nn.Module) -> str:
    from layercard.models import layout_for

    return layout_for(model).layers_path


def _layer_of(name: str, layers_path: str) -> int | None:
    """Decoder layer index of a module path relative to the base model, or None outside the layers."""
    m = re.match(rf"{re.escape(layers_path)}\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def _tuner_layers(model: nn.Module) -> list[tuple[str, int | None, nn.Module]]:
    """Every PEFT tuner layer (LoRA wrapper) of ``model``: (path relative to the base, layer, module)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    layers_path = _layers_path(model)
    return [
        (name, _layer_of(name, layers_path), mod)
        for name, mod in _unwrap(model).named_modules()
        if isinstance(mod, BaseTunerLayer)
    ]


def _bottleneck(model: nn.Module) -> Any:
    from layercard.adapters import attached_adapters

    return attached_adapters(model)


def adapted_layers(model: nn.Module) -> tuple[int, ...]:
    """Decoder layers that carry an adapter (PEFT tuner layers or layercard bottleneck adapters)."""
    found = {layer for _, layer, _ in _tuner_layers(model) if layer is not None}
    aset = _bottleneck(model)
    if aset is not None:
        found.update(aset.layers)
    return tuple(sorted(found))


def adapted_modules(model: nn.Module, keep_upto: int | None = None) -> list[str]:
    """Adapted modules that run at inference when layers ``> keep_upto`` are trimmed (None: all).

    LoRA: the path of each wrapped linear module; bottleneck adapters: ``<sublayer path>:<kind>`` (one
    per attention and MLP sublayer). Modules outside the decoder layers always count.
    """
    from layercard.adapters import sublayer_paths

    out = [
        name
        for name, layer, _ in _tuner_layers(model)
        if layer is None or keep_upto is None or layer <= keep_upto
    ]
    aset = _bottleneck(model)
    if aset is not None:
        for i in aset.layers:
            if keep_upto is None or i <= keep_upto:
                out += [f"{p}:{aset.kind}" for p in sublayer_paths(model, i)]
    return out


@contextlib.contextmanager
def _tuners_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Set PEFT's per-module ``_disable_adapters`` flag on ``modules`` for the block, then restore it."""
    saved: list[tuple[nn.Module, bool]] = []
    try:
        for mod in modules:
            if getattr(mod, "merged", False):
                raise LayercardError(
                    "adapter is merged into the weights; masking layers needs an unmerged adapter"
                )
            saved.append((mod, bool(mod._disable_adapters)))
            mod._disable_adapters = True
        yield
    finally:
        for mod, flag in reversed(saved):
            mod._disable_adapters = flag


@contextlib.contextmanager
def masked_layers(model: nn.Module, keep_upto: int) -> Iterator[tuple[int, ...]]:
    """Switch off the adapters of decoder layers ``> keep_upto`` for the block; yields the layers kept.

    No copy of the model: PEFT tuner layers get their ``_disable_adapters`` flag (their forward is then
    exactly ``base_layer(x)``), bottleneck adapters are narrowed with ``set_enabled_layers``. Everything is
    restored on exit. ``keep_upto=-1`` switches off every layer's adapter.
    """
    from layercard.models import num_layers

    n = num_layers(model)
    if not _is_int(keep_upto) or not -1 <= keep_upto < n:
        raise LayercardError(f"keep_upto={keep_upto!r}: must be an integer in -1..{n - 1}")
    tuners = _tuner_layers(model)
    aset = _bottleneck(model)
    if not any(layer is not None for _, layer, _ in tuners) and aset is None:
        raise LayercardError("model has no adapters in its decoder layers (neither PEFT nor layercard)")
    drop = [mod for _, layer, mod in tuners if layer is not None and layer > keep_upto]
    before = aset.enabled_layers if aset is not None else ()
    with _tuners_disabled(drop):
        try:
            if aset is not None:
                aset.set_enabled_layers([i for i in before if i <= keep_upto])
            yield tuple(i for i in adapted_layers(model) if i <= keep_upto)
        finally:
            if aset is not None:
                aset.set_enabled_layers(before)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Every adapter of ``model`` off for the block (decoder layers or not): the base model's outputs."""
    aset = _bottleneck(model)
    was = aset.enabled if aset is not None else None
    with _tuners_disabled(mod for _, _, mod in _tuner_layers(model)):
        try:
            if aset is not None:
                aset.enabled = False
            yield
        finally:
            if aset is not None:
                aset.enabled = was


# ---------------------------------------------------------------------------------------------------------
# Logit lens
# ---------------------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode (LoRA dropout off) and no autograd, restoring the caller's mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _layer_outputs(model: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Hooks that store each decoder layer's output hidden state (pre final norm) for one forward."""
    from layercard.models import decoder_layers, hidden_of

    layers = decoder_layers(model)
    store: list[torch.Tensor | None] = [None] * len(layers)

    def make(i: int):
        def hook(_mod: nn.Module, _args: Any, output: Any) -> None:
            store[i] = hidden_of(output).detach().clone()  # safe from any in-place reuse downstream

        return hook

    handles = [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _forward_layers(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every decoder layer's output hidden state and the model's own logits, for one batch."""
    with _layer_outputs(model) as store:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    missing = [i for i, h in enumerate(store) if h is None]
    if missing:
        raise LayercardError(f"decoder layers {missing} did not run in the forward pass")
    return [h for h in store if h is not None], out.logits


def lens_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logit lens at every position, ``(L, batch, seq, vocab)``: final norm + head of each layer's output.

    For small inputs (tests, inspection); :func:`trace` keeps only the gold-token probabilities.
    """
    from layercard.models import logits_from_hidden

    dev = _device(model)
    ids = input_ids.to(dev)
    mask = attention_mask.to(dev) if attention_mask is not None else None
    with _eval_no_grad(model):
        hiddens, _ = _forward_layers(model, ids, mask)
        return torch.stack([logits_from_hidden(model, h).float() for h in hiddens])


def _gold_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the lens probability of each target token's gold next token: ``(L, n_targets)``.

    Also returns the model's own probabilities of the same tokens (``n_targets``), for the self-check
    that the last layer's lens is the model's output.
    """
    from layercard.models import logits_from_hidden

    dev = _device(model)
    ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
    hiddens, logits = _forward_layers(model, ids, mask)
    # Position t predicts token t+1: the hidden state at t is scored against labels[t+1].
    gold_mask = labels[:, 1:] != -100
    gold = labels[:, 1:][gold_mask]
    out = torch.empty((len(hiddens), gold.numel()), dtype=torch.float64)
    chunk = max(1, _LENS_ELEMS // max(1, int(logits.shape[-1])))
    for i, h in enumerate(hiddens):
        rows = h[:, :-1][gold_mask]
        for s in range(0, rows.shape[0], chunk):
            lp = logits_from_hidden(model, rows[s : s + chunk]).float().log_softmax(-1)
            out[i, s : s + chunk] = lp.gather(-1, gold[s : s + chunk, None])[:, 0].exp().double().cpu()
    own = logits[:, :-1][gold_mask].float().log_softmax(-1).gather(-1, gold[:, None])[:, 0].exp()
    return out, own.double().cpu()


def _sub_task(task: Task, examples: Sequence[Example]) -> Task:
    return Task(task.name, task.source, task.split, task.format, tuple(examples))


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def _curve(
    model: nn.Module, encoded: Sequence[Any], pad: int, batch_size: int, desc: str, progress: bool | None
) -> tuple[list[float], float, int]:
    """Mean gold-token lens probability per layer, the model's own mean, and the number of targets."""
    total: torch.Tensor | None = None
    own_total, count = 0.0, 0
    groups = list(batches(encoded, batch_size, pad, sort_by_length=True))
    with _eval_no_grad(model):
        for batch in track(groups, desc, total=len(groups), enabled=progress):
            probs, own = _gold_probs(model, batch)
            total = probs.sum(1) if total is None else total + probs.sum(1)
            own_total += float(own.sum())
            count += probs.shape[1]
    if total is None or count == 0:
        raise LayercardError("trace: no target tokens to score")
    return [float(v) / count for v in total], own_total / count, count


def boundary_candidates(curve: Sequence[float]) -> dict[str, int]:
    """Boundary candidates of a lens curve ``P(0..L-1)``.

    ``sharpest_rise``: the layer ``j ≥ 1`` with the largest ``P(j) − P(j−1)`` (the first of
    rises equal up to 1e-12; 0 for a one-layer curve). ``half_final``: the first layer with
    ``P(ℓ) ≥ P(L−1) / 2``.
    """
    p = [float(v) for v in curve]
    if not p:
        raise LayercardError("boundary_candidates: empty curve")
    if any(not math.isfinite(v) for v in p):
        raise LayercardError(f"boundary_candidates: curve has non-finite values: {p}")
    if len(p) == 1:
        return {"sharpest_rise": 0, "half_final": 0}
    rises = [p[j] - p[j - 1] for j in range(1, len(p))]
    top = max(rises)
    # equal rises up to float rounding (1e-12) count as a tie, which goes to the earlier layer
    sharpest = 1 + next(k for k, r in enumerate(rises) if r >= top - 1e-12)
    half = p[-1] / 2
    first_half = next(i for i, v in enumerate(p) if v >= half)  # the last layer always qualifies
    return {"sharpest_rise": sharpest, "half_final": first_half}


@dataclasses.dataclass(frozen=True)
class Trace:
    """Logit-lens curves with the adapter on and off, and the boundary candidates of the 'on' curve."""

    curve_on: tuple[float, ...]
    curve_off: tuple[float, ...]
    candidates: dict[str, int]
    candidates_off: dict[str, int]
    n_examples: int
    n_target_tokens: int
    adapted_layers: tuple[int, ...]
    model_prob: float  # the model's own mean gold-token probability (= curve_on[-1], a self-check)
    task: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: str | None = None
    provenance: dict[str, Any] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.curve_on)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["curve_on"], d["curve_off"] = list(self.curve_on), list(self.curve_off)
        d["adapted_layers"] = list(self.adapted_layers)
        return {"kind": TRACE_KIND, "schema_version": SCHEMA_VERSION, "n_layers": self.n_layers, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key in ("curve_on", "curve_off", "adapted_layers"):
            kw[key] = tuple(kw.get(key, ()))
        return cls(**kw)

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``trace.png`` then ``trace.json`` (each atomic); returns both paths."""
        out = Path(out_dir)
        png = plot_trace(self, out / TRACE_PNG)
        return write_json(out / TRACE_FILE, self.to_dict()), png

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        p = Path(path)
        file = p / TRACE_FILE if p.is_dir() else p
        d = read_json(file, kind=TRACE_KIND)
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError) as e:
            raise LayercardError(f"{file}: malformed trace artifact ({e})") from None


def trace(
    model_with_adapter: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int | None,
    progress: bool | None = None,
) -> Trace:
    """Logit-lens curves of ``examples`` (teacher forced) with the model's adapters on and off."""
    if not examples:
        raise LayercardError(f"task {task.name!r}: no examples to trace")
    if not _is_int(batch_size) or batch_size < 1:
        raise LayercardError(f"batch_size: must be >= 1, got {batch_size!r}")
    layers = adapted_layers(model_with_adapter)
    if not layers:
        raise LayercardError("trace: the model has no adapters in its decoder layers")
    sub = _sub_task(task, examples)
    encoded = encode_task(tokenizer, sub, max_length=max_length)
    pad = _pad_id(tokenizer)
    on, own, n_tok = _curve(model_with_adapter, encoded, pad, batch_size, "lens (adapter on)", progress)
    with adapters_off(model_with_adapter):
        off, _, _ = _curve(model_with_adapter, encoded, pad, batch_size, "lens (adapter off)", progress)
    return Trace(
        curve_on=tuple(on),
        curve_off=tuple(off),
        candidates=boundary_candidates(on),
        candidates_off=boundary_candidates(off),
        n_examples=len(examples),
        n_target_tokens=n_tok,
        adapted_layers=layers,
        model_prob=own,
        task={**sub.describe(), "examples_in_split": len(task)},
    )


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def plot_trace(tr: Trace, path: str | Path) -> Path:
    """Both lens curves with the boundary candidates of the 'on' curve marked."""
    plt = _plt()
    layers = list(range(tr.n_layers))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, tr.curve_on, marker="o", ms=3, label="adapter on")
    ax.plot(layers, tr.curve_off, marker="o", ms=3, ls="--", color="grey", label="adapter off")
    styles = {"sharpest_rise": ("tab:red", "sharpest rise"), "half_final": ("tab:green", "half of final")}
    for key, layer in tr.candidates.items():
        color, label = styles.get(key, ("tab:purple", key))
        ax.axvline(layer, color=color, ls=":", lw=1.5, label=f"{label}: layer {layer}")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("layer (output of)")
    ax.set_ylabel("P(gold next token), logit lens")
    title = f"{(tr.provenance or {}).get('model_id', '')} · {tr.task.get('name', '')}".strip(" ·")
    ax.set_title(
        f"logit lens · {title}\n{tr.n_examples} examples, {tr.n_target_tokens} target tokens", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save_png(fig, Path(path))


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Selection metric and loss against the boundary K, the chosen K marked."""
    plt = _plt()
    rows = result["sweep"]
    ks = [r["k"] for r in rows]
    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [_row_value(r, metric) for r in rows]
    ax.plot(ks, [v if v is not None else float("nan") for v in vals], marker="o", label=metric)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("boundary K (adapters kept in layers ≤ K)")
    ax.set_ylabel(metric)
    if metric != "loss" and any(r.get("loss") is not None for r in rows):
        ax2 = ax.twinx()
        loss = [r["loss"] if r.get("loss") is not None else float("nan") for r in rows]
        ax2.plot(ks, loss, marker="s", ms=3, ls="--", color="grey", label="loss")
        ax2.set_ylabel("loss")
    ax.axvline(result["chosen_k"], color="tab:red", ls=":", label=f"chosen K={result['chosen_k']}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(f"trim sweep · {result['task'].get('name', '')}", fontsize=9)
    return _save_png(fig, Path(path))


# ---------------------------------------------------------------------------------------------------------
# Sweep and choice
# ---------------------------------------------------------------------------------------------------------

Scorer = Callable[[nn.Module, int], dict[str, Any]]


def candidate_ks(
    n_layers: int,
    adapted: Sequence[int],
    *,
    candidates: Iterable[int] = (),
    radius: int = 3,
    window: tuple[int, int] | None = None,
    all_layers: bool = False,
) -> list[int]:
    """Boundaries to sweep, ascending, each the highest adapted layer it keeps (so no two are equivalent).

    The raw set is ``window``'s range, every layer, or ``candidate ± radius``; the last layer (no
    trimming) is always added. Boundaries below the lowest adapted layer (no adapter left) are dropped.
    """
    if not adapted:
        raise LayercardError("the adapter has no decoder layers to trim")
    if window is not None:
        a, b = window
        if b >= n_layers:
            raise LayercardError(f"window {a}:{b}: the model has layers 0..{n_layers - 1}")
        raw = set(range(a, b + 1))
    elif all_layers:
        raw = set(range(n_layers))
    else:
        raw = {k for c in candidates for k in range(c - radius, c + radius + 1) if 0 <= k < n_layers}
    raw.add(n_layers - 1)
    have = sorted(set(adapted))
    out = {max(x for x in have if x <= k) for k in raw if k >= have[0]}
    return sorted(out)


def sweep(
    model_with_adapter: nn.Module,
    ks: Sequence[int],
    score: Scorer,
    *,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Score the model with adapters kept only in layers ``≤ K``, for each ``K`` in ``ks``.

    ``score(model, k)`` returns the row's measurements (``metrics``, ``loss``, timings...); each row also
    records ``k``, ``adapted_layers``, ``n_adapted_layers`` and ``adapted_modules`` (a count).
    """
    rows: list[dict[str, Any]] = []
    for k in track(list(ks), "trim sweep", total=len(ks), enabled=progress):
        with masked_layers(model_with_adapter, int(k)) as kept:
            measured = score(model_with_adapter, int(k))
            rows.append(
                {
                    "k": int(k),
                    "adapted_layers": list(kept),
                    "n_adapted_layers": len(kept),
                    "adapted_modules": len(adapted_modules(model_with_adapter, int(k))),
                    **measured,
                }
            )
    return rows


def _row_value(row: dict[str, Any], metric: str) -> float | None:
    v = row.get("loss") if metric == "loss" else row.get("metrics", {}).get(metric, row.get(metric))
    return None if v is None or not math.isfinite(float(v)) else float(v)


def choose_boundary(
    rows: Sequence[dict[str, Any]], metric: str, higher_is_better: bool = True, *, tolerance: float = 1e-9
) -> int:
    """The ``k`` of the best row by ``metric``; rows within ``tolerance`` (absolute) of the best are tied,
    and a tie goes to the fewest adapted layers, then the smallest ``k``. Missing or NaN values never win.
    """
    if not rows:
        raise LayercardError("choose_boundary: no sweep rows")
    scored = [(r, _row_value(r, metric)) for r in rows]
    valid = [(r, v) for r, v in scored if v is not None]
    if not valid:
        raise LayercardError(f"choose_boundary: no row has a finite value for {metric!r}")
    sign = 1.0 if higher_is_better else -1.0
    best = max(sign * v for _, v in valid)
    tied = [r for r, v in valid if sign * v >= best - tolerance]

    def n_layers(r: dict[str, Any]) -> int:
        return int(r.get("n_adapted_layers", len(r.get("adapted_layers", ()))))

    return int(min(tied, key=lambda r: (n_layers(r), r["k"]))["k"])


def task_scorer(
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    metrics: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    max_length: int | None,
    loss: bool = True,
) -> Scorer:
    """A scorer for :func:`sweep`: greedy generation scored with ``metrics``, plus the target loss.

    Generation timing (``s_per_example``, ``tokens_per_s``) is that of the model as it is (unmerged).
    """
    from layercard.evaluate import eval_loss, generate

    names = list(dict.fromkeys(metrics))

    def score(model: nn.Module, _k: int) -> dict[str, Any]:
        texts, timing = generate(
            model, tokenizer, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
            progress=False,  # the sweep's own bar is live; rich cannot nest a second one
        )  # fmt: skip
        values = compute_metrics(names, texts, examples)
        value = None
        if loss:
            value = eval_loss(model, tokenizer, task, examples, batch_size=batch_size, max_length=max_length)
        return {
            "metrics": values,
            "loss": value if value is None or math.isfinite(value) else None,
            "s_per_example": timing["s_per_example"],
            "tokens_per_s": timing["tokens_per_s"],
            "predictions": texts,
        }

    return score


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


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


def _write_trimmed_peft(src: Path, dst: Path, keep_upto: int, layers_path: str) -> dict[str, Any]:
    from peft.utils.other import get_pattern_key

    try:
        cfg = json.loads((src / _PEFT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise LayercardError(f"{src / _PEFT_CONFIG}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if cfg.get("peft_type") != "LORA":
        raise LayercardError(
            f"{src}: peft_type={cfg.get('peft_type')!r}; trimming exports LoRA adapters only"
        )
    if cfg.get("target_parameters"):
        raise LayercardError(f"{src}: target_parameters (LoRA on raw parameters) cannot be trimmed")
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
    for f in src.iterdir():  # README, tokenizer files...: carried over unchanged
        if f.is_file() and f.name not in (_PEFT_CONFIG, _PEFT_WEIGHTS):
            shutil.copy2(f, dst / f.name)
    save_file(kept, str(dst / _PEFT_WEIGHTS), metadata={"format": "pt"})
    (dst / _PEFT_CONFIG).write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
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
    save_file(kept, str(dst / WEIGHTS_FILE), metadata={"format": "pt", "kind": str(cfg["kind"])})
    (dst / CONFIG_FILE).write_text(json.dumps({**cfg, "layers": layers}, indent=1) + "\n")
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
    src = Path(adapter_dir)
    _adapter_kind(src)
    with atomic_path(out_dir) as tmp:
        _write_trimmed(src, tmp, keep_upto, model)
    return Path(out_dir)


def export_merged(
    loaded: Any, trimmed_dir: str | Path, out_dir: str | Path, *, in_place: bool = False
) -> nn.Module:
    """Merge the (trimmed) LoRA adapter into the base and save it as safetensors plus the tokenizer.

    The folder loads with :func:`layercard.models.load_model`. ``in_place=False`` merges into a deep copy
    (twice the model's memory); ``in_place=True`` merges into ``loaded.model`` itself, which then *is* the
    merged model (for a caller that is done with the base). Returns the merged model.
    """
    from peft import PeftModel

    src = Path(trimmed_dir)
    if _adapter_kind(src) != "peft":
        raise LayercardError(
            f"{src}: bottleneck adapters (houlsby/parallel) are nonlinear and cannot be merged into weights"
        )
    base = loaded.model if in_place else copy.deepcopy(loaded.model)
    merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    merged.eval()
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
    return merged


# ---------------------------------------------------------------------------------------------------------
# Stage functions
# ---------------------------------------------------------------------------------------------------------


def _subset(task: Task, n: int | None, seed: int) -> Task:
    sub = task.subset(n, seed=seed) if n is not None else task
    if len(sub) == 0:
        raise LayercardError(f"task {task.name!r} ({task.split}): no examples")
    return sub


def _traced(
    model: nn.Module,
    loaded: Any,
    adapter: Path,
    adapter_hash: str,
    task: Task,
    sub: Task,
    cfg: TraceConfig,
    progress: bool | None,
) -> Trace:
    """:func:`trace` of ``sub`` on the adapted ``model``, stamped with provenance."""
    t0 = time.perf_counter()
    tr = trace(
        model, loaded.tokenizer, sub, sub.examples, batch_size=cfg.batch_size, max_length=cfg.max_length,
        progress=progress,
    )  # fmt: skip
    prov = Provenance.make(
        stage="trace",
        model_id=loaded.model_id,
        model_hash=loaded.model_hash,
        task=sub.name,
        data_hash=sub.data_hash,
        config={**cfg.to_dict(), "adapter": str(adapter), "adapter_hash": adapter_hash},
        seed=cfg.seed,
        wall_time_s=time.perf_counter() - t0,
    )
    task_info = {**tr.task, "examples_in_split": len(task)}
    return dataclasses.replace(tr, task=task_info, adapter=str(adapter), provenance=prov.to_dict())


def run_trace(
    loaded: Any, adapter_dir: str | Path, task: Task, cfg: TraceConfig, *, progress: bool | None = None
) -> Trace:
    """:func:`trace` of ``adapter_dir`` on ``loaded.model`` (attached for the call), with provenance."""
    adapter = Path(adapter_dir)
    _adapter_kind(adapter)
    sub = _subset(task, cfg.examples, cfg.seed)
    with attached(loaded.model, adapter) as model:
        return _traced(model, loaded, adapter, hash_folder(adapter), task, sub, cfg, progress)


def _reusable_trace(path: Path, loaded: Any, sub: Task, cfg: TraceConfig, adapter_hash: str) -> Trace | None:
    """A trace.json from an earlier run on the same model, adapter, examples and settings, if present."""
    if not path.is_file():
        return None
    try:
        tr = Trace.load(path)
    except LayercardError:
        return None
    prov = tr.provenance or {}
    conf = prov.get("config", {})
    same = (
        prov.get("model_hash") == loaded.model_hash
        and prov.get("data_hash") == sub.data_hash
        and conf.get("adapter_hash") == adapter_hash
        and all(conf.get(k) == v for k, v in cfg.to_dict().items())
    )
    return tr if same else None


def _probe_batch(tokenizer: Any, sub: Task, cfg: TrimConfig) -> dict[str, torch.Tensor]:
    encoded = encode_task(tokenizer, sub, max_length=cfg.max_length)
    return next(batches(encoded[: cfg.batch_size], cfg.batch_size, _pad_id(tokenizer)))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    dev = _device(model)
    with _eval_no_grad(model):
        out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
    return out.logits.float().cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float((a[keep] - b[keep]).abs().max()) if keep.any() else 0.0


def _summary(model: nn.Module, k: int, measured: dict[str, Any], latency: list[float]) -> dict[str, Any]:
    """A before/after row: layers and modules that run with boundary ``k``, metrics, loss, latency."""
    kept = [i for i in adapted_layers(model) if i <= k]
    return {
        "k": k,
        "adapted_layers": kept,
        "n_adapted_layers": len(kept),
        "adapted_modules": len(adapted_modules(model, k)),
        "metrics": measured["metrics"],
        "loss": measured["loss"],
        # the minimum over repeats: other load on the machine only ever adds time
        "s_per_example": min(latency),
        "s_per_example_samples": latency,
    }


def _latency(measured: dict[str, Any], repeats: int, timer: Callable[[], float]) -> list[float]:
    """``s_per_example`` of the scoring pass plus ``repeats - 1`` more timed generation passes."""
    return [measured["s_per_example"], *(timer() for _ in range(repeats - 1))]


def trim(
    loaded: Any,
    adapter_dir: str | Path,
    task: Task,
    cfg: TrimConfig,
    out_dir: str | Path,
    *,
    export_merged_dir: str | Path | None = None,
    merge_in_place: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Find the boundary layer of ``adapter_dir`` on ``task`` and export the trimmed adapter.

    Writes into ``out_dir``: ``trace.json`` + ``trace.png`` (when the candidates are needed; an existing
    trace of the same model, adapter, examples and settings is reused), ``adapter-trimmed/``,
    ``trim.png`` and, last, ``trim.json`` (returned as a dict). The export is loaded back and checked to
    give the masked model's logits before it is committed. ``export_merged_dir`` also writes the base
    with the trimmed LoRA merged (see :func:`export_merged` for ``merge_in_place``).
    """
    t_start = time.perf_counter()
    adapter = Path(adapter_dir)
    kind = _adapter_kind(adapter)
    if export_merged_dir is not None and kind != "peft":
        raise LayercardError(
            f"--export-merged: {adapter} holds bottleneck adapters (houlsby/parallel), which cannot be merged"
        )
    out = Path(out_dir)
    sub = _subset(task, cfg.examples, cfg.seed)
    examples = sub.examples
    tok = loaded.tokenizer
    metric = cfg.metric or sub.format.metrics[0]
    higher = metric != "loss"  # every task metric is higher-is-better; the loss is not
    names = list(dict.fromkeys([*([metric] if metric != "loss" else []), *sub.format.metrics]))
    names += [m for m in ("token_f1", "rouge_l") if m not in names]  # F1/ROUGE-L beside the task metric
    max_new = cfg.max_new_tokens or sub.format.max_new_tokens
    score = task_scorer(
        tok, sub, examples, metrics=names, batch_size=cfg.batch_size, max_new_tokens=max_new,
        max_length=cfg.max_length,
    )  # fmt: skip
    adapter_hash = hash_folder(adapter)
    probe = _probe_batch(tok, sub, cfg)

    def gen_timer(net: nn.Module) -> Callable[[], float]:
        from layercard.evaluate import generate

        def timed() -> float:
            _, timing = generate(
                net, tok, sub, examples, batch_size=cfg.batch_size, max_new_tokens=max_new, progress=False
            )
            return float(timing["s_per_example"])

        return timed

    tr: Trace | None = None
    timings: dict[str, float] = {}

    with attached(loaded.model, adapter) as model:
        from layercard.models import num_layers

        n_layers = num_layers(model)
        have = adapted_layers(model)
        if not have:
            raise LayercardError(
                f"{adapter}: the adapter has no modules in the decoder layers; nothing to trim"
            )
        if cfg.window is None and not cfg.all_layers:
            tcfg = cfg.trace_config()
            tr = _reusable_trace(out / TRACE_FILE, loaded, sub, tcfg, adapter_hash)
            if tr is None:
                t0 = time.perf_counter()
                tr = _traced(model, loaded, adapter, adapter_hash, task, sub, tcfg, progress)
                tr.save(out)
                timings["trace_s"] = time.perf_counter() - t0
        ks = candidate_ks(
            n_layers, have, candidates=tr.candidates.values() if tr else (), radius=cfg.radius,
            window=cfg.window, all_layers=cfg.all_layers,
        )  # fmt: skip
        t0 = time.perf_counter()
        rows = sweep(model, ks, score, progress=progress)
        timings["sweep_s"] = time.perf_counter() - t0
        chosen = choose_boundary(rows, metric, higher, tolerance=cfg.tie_tolerance)
        modules_before = adapted_modules(model)
        modules_after = adapted_modules(model, chosen)
        # Before = the sweep's last row (nothing masked); its extra latency passes run warm, after the sweep.
        full = rows[-1]
        before = _summary(model, ks[-1], full, _latency(full, cfg.latency_repeats, gen_timer(model)))
        with masked_layers(model, chosen):
            ref_logits = _logits(model, probe)

    trimmed_dir = out / TRIMMED_DIR
    with atomic_path(trimmed_dir) as tmp:
        export = _write_trimmed(adapter, tmp, chosen, loaded.model)
        with attached(loaded.model, tmp) as trimmed_model:
            got = _logits(trimmed_model, probe)
            diff = _max_diff(got, ref_logits, probe["attention_mask"])
            scale = max(1.0, float(ref_logits.abs().max()))
            if not diff <= 1e-5 * scale:  # exact on CPU; room only for kernel-level noise elsewhere
                raise LayercardError(
                    f"trimmed adapter does not reproduce the masked model (max |Δlogit| = {diff:.3g}); "
                    "nothing was written"
                )
            after_row = score(trimmed_model, chosen)
            lat = _latency(after_row, cfg.latency_repeats, gen_timer(trimmed_model))
            after = _summary(trimmed_model, chosen, after_row, lat)
    export.update({"path": str(trimmed_dir), "max_abs_logit_diff_vs_masked": diff})

    merged_info: dict[str, Any] | None = None
    if export_merged_dir is not None:
        merged = export_merged(loaded, trimmed_dir, export_merged_dir, in_place=merge_in_place)
        merged_logits = _logits(merged, probe)
        merged_info = {
            "path": str(export_merged_dir),
            "max_abs_logit_diff_vs_trimmed": _max_diff(merged_logits, got, probe["attention_mask"]),
        }

    chosen_row = next(r for r in rows if r["k"] == chosen)
    timings["total_s"] = time.perf_counter() - t_start
    prov = Provenance.make(
        stage="trim",
        model_id=loaded.model_id,
        model_hash=loaded.model_hash,
        task=sub.name,
        data_hash=sub.data_hash,
        config={**cfg.to_dict(), "adapter": str(adapter), "adapter_hash": adapter_hash},
        seed=cfg.seed,
        wall_time_s=timings["total_s"],
    )
    result: dict[str, Any] = {
        "kind": TRIM_KIND,
        "schema_version": SCHEMA_VERSION,
        "adapter": str(adapter),
        "adapter_format": kind,
        "metric": metric,
        "higher_is_better": higher,
        "tie_tolerance": cfg.tie_tolerance,
        "metrics": names,
        "metric_scales": {m: METRICS[m].scale for m in names},
        "n_layers": n_layers,
        "adapted_layers": list(have),
        "candidates": dict(tr.candidates) if tr else None,
        "trace": str(out / TRACE_FILE) if tr else None,
        "ks": ks,
        "sweep": [{k: v for k, v in r.items() if k != "predictions"} for r in rows],
        "chosen_k": chosen,
        "before": before,
        "after": after,
        # the exported adapter must generate what the masked sweep row generated
        "after_matches_sweep": after_row["predictions"] == chosen_row["predictions"],
        "adapted_modules_before": modules_before,
        "adapted_modules_after": modules_after,
        "export": export,
        "merged": merged_info,
        "task": {**sub.describe(), "examples_in_split": len(task)},
        "timings": timings,
        "provenance": prov.to_dict(),
    }
    plot_sweep(result, out / TRIM_PNG)
    write_json(out / TRIM_FILE, result)
    return result
