"""The boundary sweep and the choice of K (docs/design.md §8).

For each boundary ``K`` the adapters of decoder layers ``> K`` are switched off
(:func:`layercard.trim.mask.masked_layers`) and the validation set is scored: by generation metrics and
loss (:func:`task_scorer`) or, when the selection metric is the loss, by the teacher-forced loss alone
(:func:`loss_scorer`, no generation). :func:`choose_boundary` takes the best; rows within
``tie_tolerance`` (absolute, on the metric's own scale; default 1e-9, i.e. exact ties up to float noise)
of the best count as tied, and a tie goes to fewer adapted layers, then the smaller ``K``. Where the
metric ties at every K (:func:`metric_is_flat`), it says nothing about where to cut, so the rows' held-out
loss chooses instead (:func:`boundary_choice`).

``K`` always names a decoder layer that carries an adapter: boundaries that keep the same adapted layers
give identical models, so a window is mapped to the highest adapted layer ``≤ K`` and deduplicated
(:func:`candidate_ks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from layercard import inference
from layercard.errors import LayercardError, setting_name
from layercard.progress import track
from layercard.tasks import (
    Example,
    Task,
    capped_generations_text,
    check_gold,
    compute_metrics,
    scored_as_written,
)
from layercard.trim.mask import adapted_modules, masked_layers

__all__ = [
    "Scorer",
    "boundary_choice",
    "candidate_ks",
    "capped_text",
    "choose_boundary",
    "flat_metric_text",
    "metric_is_flat",
    "loss_scorer",
    "row_value",
    "sweep",
    "task_scorer",
]

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
            raise LayercardError(f"{setting_name('window')} {a}:{b}: the model has layers 0..{n_layers - 1}")
        if b < min(adapted):  # every boundary in it would keep no adapter: only "no trimming" would be left
            raise LayercardError(
                f"{setting_name('window')} {a}:{b}: lies below every adapted layer (the lowest is "
                f"{min(adapted)}), so no boundary in it keeps an adapter; give a window that reaches them"
            )
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


def row_value(row: dict[str, Any], metric: str) -> float | None:
    """A sweep row's value of ``metric`` (``"loss"`` or a text metric); None when missing or not finite."""
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
    scored = [(r, row_value(r, metric)) for r in rows]
    valid = [(r, v) for r, v in scored if v is not None]
    if not valid:
        raise LayercardError(f"choose_boundary: no row has a finite value for {metric!r}")
    sign = 1.0 if higher_is_better else -1.0
    best = max(sign * v for _, v in valid)
    tied = [r for r, v in valid if sign * v >= best - tolerance]

    def n_layers(r: dict[str, Any]) -> int:
        return int(r.get("n_adapted_layers", len(r.get("adapted_layers", ()))))

    return int(min(tied, key=lambda r: (n_layers(r), r["k"]))["k"])


def metric_is_flat(rows: Sequence[dict[str, Any]], metric: str, *, tolerance: float = 1e-9) -> bool:
    """Whether every row with a value of ``metric`` ties with the best (more than one such row): the
    metric did not tell the boundaries apart."""
    values = [v for v in (row_value(r, metric) for r in rows) if v is not None]
    return len(values) > 1 and max(values) - min(values) <= tolerance


def boundary_choice(
    rows: Sequence[dict[str, Any]], metric: str, higher_is_better: bool = True, *, tolerance: float = 1e-9
) -> tuple[int, str]:
    """The chosen ``k`` and what chose it: ``metric`` (:func:`choose_boundary`), or ``"loss"`` where the
    metric ties at every K and every row has a finite loss.

    A flat metric holds no evidence about any boundary, and the tie rule alone would then drop every
    adapter it may; the held-out loss, measured on the same examples, still tells the boundaries apart.
    Loss ties (up to 1e-9) go to fewer adapted layers too.
    """
    if (
        metric != "loss"
        and metric_is_flat(rows, metric, tolerance=tolerance)
        and all(row_value(r, "loss") is not None for r in rows)
    ):
        return choose_boundary(rows, "loss", higher_is_better=False), "loss"
    return choose_boundary(rows, metric, higher_is_better, tolerance=tolerance), metric


def flat_metric_text(metric: str, chosen_by: str | None = None) -> str:
    """What a sweep whose ``metric`` tied at every K (:func:`metric_is_flat`) means for its choice;
    ``chosen_by`` is what chose K (trim.json's ``chosen_by``; absent in a trim.json written before it)."""
    head = f"every K scored the same {metric}: it did not tell the boundaries apart, so "
    if chosen_by == "loss":
        return head + "K was chosen by the held-out loss of each K on the same examples"
    return head + (
        f"the tie rule kept the fewest adapted layers ({setting_name('metric')} loss scores each K by its "
        "held-out loss)"
    )


def capped_text(rows: Sequence[dict[str, Any]], n: int, max_new_tokens: int | None) -> str | None:
    """What the sweep rows' ``capped`` counts (generations that reached ``max_new_tokens`` before an end
    token, out of ``n`` examples) mean for their scores; None where no generation was stopped so."""
    hit = [(int(r["k"]), int(r["capped"])) for r in rows if r.get("capped")]
    if not hit:
        return None
    most = max(c for _, c in hit)
    said = capped_generations_text(f"up to {most}", n, max_new_tokens)
    return f"at K = {', '.join(str(k) for k, _ in hit)}, {said}"


def _checked_loss(value: float, k: int) -> float:
    """``value``, the loss of boundary ``k``; a NaN or infinite loss stops the trim stage."""
    if not math.isfinite(value):
        shown = "NaN" if math.isnan(value) else "infinite"
        raise LayercardError(
            f"trim: the loss with adapters kept in layers <= {k} is {shown}: the adapted model gives "
            "non-finite outputs on the trim examples; no trim.json or trimmed adapter was written"
        )
    return float(value)


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
    scored: Sequence[Example] | None = None,
) -> Scorer:
    """A scorer for :func:`sweep`: greedy generation scored with ``metrics``, plus the target loss.

    ``scored``: ``examples`` as their generations are scored (:func:`layercard.tasks.scored_as_written`,
    as evaluate scores them), where the caller has them already. Generation timing (``s_per_example``,
    ``tokens_per_s``) is that of the model as it is (unmerged).
    """
    names = list(dict.fromkeys(metrics))
    if scored is None:
        scored = [scored_as_written(tokenizer, task.format, ex) for ex in examples]
    check_gold(names, scored)  # before any K is generated for

    def score(model: nn.Module, k: int) -> dict[str, Any]:
        texts, timing = inference.generate(
            model, tokenizer, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
            progress=False,  # the sweep's own bar is live; rich cannot nest a second one
        )  # fmt: skip
        values = compute_metrics(names, texts, scored)
        value = None
        if loss:
            value = inference.eval_loss(
                model, tokenizer, task, examples, batch_size=batch_size, max_length=max_length
            )
            value = _checked_loss(value, k)
        return {
            "metrics": values,
            "loss": value,
            "s_per_example": timing["s_per_example"],
            "tokens_per_s": timing["tokens_per_s"],
            # latency rows compare only at equal lengths: a model that stops sooner is faster per example
            "new_tokens_per_example": timing["new_tokens"] / len(examples),
            "capped": timing["capped"],  # generations stopped at max_new_tokens, scored as cut there
            "predictions": texts,
        }

    return score


def loss_scorer(
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int | None,
) -> Scorer:
    """A scorer for :func:`sweep` that measures the teacher-forced target loss only and generates nothing.

    What a sweep selecting by ``loss`` needs: its rows have a ``loss`` and no text metrics or timings.
    """

    def score(model: nn.Module, k: int) -> dict[str, Any]:
        value = inference.eval_loss(
            model, tokenizer, task, examples, batch_size=batch_size, max_length=max_length
        )
        return {"loss": _checked_loss(value, k)}

    return score
