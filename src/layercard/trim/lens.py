"""Logit lens and boundary candidates (docs/design.md §8).

Teacher forced on validation examples, each decoder layer's output hidden state goes through the final
norm and the LM head (:func:`layercard.models.logits_from_hidden`, the logit lens); ``P(ℓ)`` is the mean
over target tokens of the probability of the gold next token, with the adapter on and off. Layer outputs
are taken with forward hooks on the decoder layers, not with ``output_hidden_states`` (whose last entry
is already after the final norm in transformers 5).

Candidates (:func:`boundary_candidates`): ``sharpest_rise`` is the layer ``j ≥ 1`` maximising
``P(j) − P(j−1)`` (the layer whose own computation raises P most, i.e. ``ℓ+1`` for the argmax of
``P(ℓ+1) − P(ℓ)``; none where no layer raises P); ``half_final`` is the first layer with
``P(ℓ) ≥ P(L−1)/2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.artifacts import SCHEMA_VERSION, load_artifact, write_json
from layercard.errors import LayercardError
from layercard.inference import as_float64, device_of, eval_mode, pad_id
from layercard.progress import track
from layercard.tasks import Example, Task, batches, encode_task, target_mask
from layercard.trim.figures import plot_trace
from layercard.trim.mask import _is_int, adapted_layers, adapters_off

__all__ = ["TRACE_FILE", "TRACE_PNG", "Trace", "boundary_candidates", "lens_logits", "trace"]

TRACE_KIND = "trace"
TRACE_FILE = "trace.json"
TRACE_PNG = "trace.png"
# Logit-lens rows per chunk: bounds the (rows × vocab) float32 logits to about 256 MB for any vocabulary.
_LENS_ELEMS = 1 << 26


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
    hiddens = [h for h in store if h is not None]
    want = tuple(input_ids.shape)
    odd = next((i for i, h in enumerate(hiddens) if h.dim() != 3 or tuple(h.shape[:2]) != want), None)
    if odd is not None:
        # e.g. Gemma 3n's layers carry several streams (AltUp), which only its last step merges into one
        raise LayercardError(
            f"decoder layer {odd}'s output has shape {tuple(hiddens[odd].shape)}, not (batch, positions, "
            f"hidden) = ({want[0]}, {want[1]}, …): not one residual stream the logit lens can read; trace "
            "and trim's lens cannot run on this model"
        )
    return hiddens, out.logits


def lens_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logit lens at every position, ``(L, batch, seq, vocab)``: final norm + head of each layer's output.

    For small inputs (tests, inspection); :func:`trace` keeps only the gold-token probabilities.
    """
    from layercard.models import logits_from_hidden

    dev = device_of(model)
    ids = input_ids.to(dev)
    mask = attention_mask.to(dev) if attention_mask is not None else None
    with eval_mode(model):
        hiddens, _ = _forward_layers(model, ids, mask)
        return torch.stack([logits_from_hidden(model, h).float() for h in hiddens])


def _gold_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the lens probability of each target token's gold next token: ``(L, n_targets)``.

    Also returns the model's own probabilities of the same tokens (``n_targets``), for the self-check
    that the last layer's lens is the model's output.
    """
    from layercard.models import logits_from_hidden

    dev = device_of(model)
    ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
    hiddens, logits = _forward_layers(model, ids, mask)
    # Position t predicts token t+1: the hidden state at t is scored against labels[t+1].
    gold_mask = target_mask(labels)
    gold = labels[:, 1:][gold_mask]
    out = torch.empty((len(hiddens), gold.numel()), dtype=torch.float64)
    chunk = max(1, _LENS_ELEMS // max(1, int(logits.shape[-1])))
    for i, h in enumerate(hiddens):
        rows = h[:, :-1][gold_mask]
        for s in range(0, rows.shape[0], chunk):
            lp = logits_from_hidden(model, rows[s : s + chunk]).float().log_softmax(-1)
            out[i, s : s + chunk] = as_float64(lp.gather(-1, gold[s : s + chunk, None])[:, 0].exp()).cpu()
    own = logits[:, :-1][gold_mask].float().log_softmax(-1).gather(-1, gold[:, None])[:, 0].exp()
    return out, as_float64(own).cpu()


def _sub_task(task: Task, examples: Sequence[Example]) -> Task:
    return dataclasses.replace(task, examples=tuple(examples))


def _curve(
    model: nn.Module, encoded: Sequence[Any], pad: int, batch_size: int, desc: str, progress: bool | None
) -> tuple[list[float], float, int]:
    """Mean gold-token lens probability per layer, the model's own mean, and the number of targets."""
    total: torch.Tensor | None = None
    own_total, count = 0.0, 0
    groups = list(batches(encoded, batch_size, pad, sort_by_length=True))
    with eval_mode(model):
        for batch in track(groups, desc, total=len(groups), enabled=progress):
            probs, own = _gold_probs(model, batch)
            total = probs.sum(1) if total is None else total + probs.sum(1)
            own_total += float(own.sum())
            count += probs.shape[1]
    if total is None or count == 0:
        raise LayercardError("trace: no target tokens to score")
    return [float(v) / count for v in total], own_total / count, count


def _check_curve(curve: Sequence[float], adapter: str) -> None:
    """A lens curve must be finite: NaN means the model's outputs are, and no boundary can be read."""
    bad = next((i for i, v in enumerate(curve) if not math.isfinite(v)), None)
    if bad is not None:
        shown = "NaN" if math.isnan(curve[bad]) else "infinite"
        raise LayercardError(
            f"trace: the lens probability with the adapter {adapter} is {shown} at layer {bad}: the "
            "model gives non-finite outputs on these examples; no trace was written"
        )


def _check_lens(last: float, own: float) -> None:
    """The lens at the last layer must be the model's own output: where it is not, the architecture turns
    its last hidden state into logits in a way :func:`layercard.models.logits_from_hidden` does not apply,
    and no layer's reading can be trusted."""
    if abs(last - own) > 1e-6 + 1e-3 * abs(own):
        raise LayercardError(
            f"trace: the logit lens at the last layer gives a mean gold-token probability of {last:.6g}, "
            f"the model's own output {own:.6g}: this architecture makes its logits in a way the lens does "
            "not reproduce, so no trace was written"
        )


def boundary_candidates(curve: Sequence[float]) -> dict[str, int]:
    """Boundary candidates of a lens curve ``P(0..L-1)``.

    ``sharpest_rise``: the layer ``j ≥ 1`` with the largest ``P(j) − P(j−1)`` (the first of
    rises equal up to 1e-12; 0 for a one-layer curve); left out where no layer raises P (a flat or
    falling curve has no rise to name). ``half_final``: the first layer with ``P(ℓ) ≥ P(L−1) / 2``.
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
    half = p[-1] / 2
    first_half = next(i for i, v in enumerate(p) if v >= half)  # the last layer always qualifies
    if top <= 1e-12:
        return {"half_final": first_half}
    # equal rises up to float rounding (1e-12) count as a tie, which goes to the earlier layer
    sharpest = 1 + next(k for k, r in enumerate(rises) if r >= top - 1e-12)
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
        """Write ``trace.png`` then ``trace.json`` (each atomic); returns both paths. An earlier trace.json
        goes first, so that a write cut between the two never pairs it with this trace's figure."""
        out = Path(out_dir)
        if (out / TRACE_FILE).is_file():  # a folder in its place is refused by the write, as before
            (out / TRACE_FILE).unlink()
        png = plot_trace(self, out / TRACE_PNG)
        return write_json(out / TRACE_FILE, self.to_dict()), png

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        return load_artifact(
            path, kind=TRACE_KIND, what="trace", file_name=TRACE_FILE, build=lambda d, _: cls.from_dict(d)
        )


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
    pad = pad_id(tokenizer)
    on, own, n_tok = _curve(model_with_adapter, encoded, pad, batch_size, "lens (adapter on)", progress)
    _check_curve(on, "on")
    _check_lens(on[-1], own)
    with adapters_off(model_with_adapter):
        off, _, _ = _curve(model_with_adapter, encoded, pad, batch_size, "lens (adapter off)", progress)
    _check_curve(off, "off")
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
