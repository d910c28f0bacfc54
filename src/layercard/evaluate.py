"""Evaluation: greedy generation scored with the task's metrics, plus teacher-forced validation loss.

:func:`evaluate` runs a (possibly adapted) model over a task split and returns an :class:`EvalResult`,
saved as ``eval.json`` (metrics, loss, timing, provenance) and ``predictions.jsonl`` (one line per
example). Prompts are exactly the ones training used (:func:`layercard.tasks.encode_prompt`), and
generation stops at the chat template's turn-end token, which is what the targets were trained to end with.

Timing (``s_per_example``, ``tokens_per_s``) is wall time of the batched ``generate`` calls only, with
adapters unmerged: this is the inference latency the trimming stage compares before and after (§8).
``s_per_example`` is amortised over a batch (wall time / examples at ``batch_size``), not the latency
of a single request; compare it only between runs with the same batch size and machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.adapters import attached
from layercard.artifacts import SCHEMA_VERSION, Provenance, hash_folder, read_json, write_json, write_text
from layercard.errors import LayercardError
from layercard.progress import track
from layercard.tasks import (
    METRICS,
    Example,
    Task,
    batches,
    encode_prompt,
    encode_task,
    exact_match,
    strict_match,
    token_f1,
    turn_end_token_id,
)

__all__ = ["KIND", "PREDICTIONS_FILE", "EvalConfig", "EvalResult", "eval_loss", "evaluate", "generate"]

KIND = "eval"
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how. ``None`` means the task format's default. Errors name the field."""

    examples: int | None = None  # seeded subset of the split (Task.subset); None = all
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: task.format.max_new_tokens
    metrics: tuple[str, ...] | None = None  # None: task.format.metrics (first = primary)
    loss: bool = True  # also compute teacher-forced loss over the targets
    max_length: int | None = None  # cap on prompt + target tokens for the loss; None: format limits only
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("examples", 1), ("max_new_tokens", 1), ("max_length", 2)):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < minimum):
                raise LayercardError(f"eval config: {name}={v!r} must be an integer >= {minimum} or null")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise LayercardError(f"eval config: batch_size={self.batch_size!r} must be a positive integer")
        if not _is_int(self.seed):
            raise LayercardError(f"eval config: seed={self.seed!r} must be an integer")
        if not isinstance(self.loss, bool):
            raise LayercardError(f"eval config: loss={self.loss!r} must be true or false")
        if self.metrics is not None:
            names = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
            names = tuple(str(n).strip() for n in names)
            if not names:
                raise LayercardError(
                    "eval config: metrics is empty; name at least one, or null for the default"
                )
            for n in names:
                if n not in METRICS:
                    valid = ", ".join(METRICS)
                    raise LayercardError(f"eval config: metrics: unknown metric {n!r}; valid: {valid}")
            # duplicates would be scored twice and shown twice; keep the first occurrence
            object.__setattr__(self, "metrics", tuple(dict.fromkeys(names)))

    def resolved(self, task: Task) -> EvalConfig:
        """This config with the task-format defaults filled in (what actually runs)."""
        return dataclasses.replace(
            self,
            metrics=self.metrics if self.metrics is not None else tuple(task.format.metrics),
            max_new_tokens=self.max_new_tokens or task.format.max_new_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["metrics"] = list(self.metrics) if self.metrics is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if kw.get("metrics") is not None:
            kw["metrics"] = tuple(kw["metrics"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Generation and loss
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: greedy outputs must be deterministic), restoring the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``: every row's last prompt token lines up at the end,
    where generation continues. Done here rather than by flipping ``tokenizer.padding_side``, so the
    shared tokenizer (right-padded for training) is never mutated and no pad token is required."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[k, width - len(r) :] = 1
    return ids, mask


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _stop_ids(tokenizer: Any) -> list[int]:
    """Turn-end token first (what targets end with), then the tokenizer's eos if different."""
    ids = [turn_end_token_id(tokenizer)]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return ids


def _pad_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(stop_ids[-1])


def _generation_config(max_new_tokens: int, stop_ids: Sequence[int], pad_id: int) -> Any:
    from transformers import GenerationConfig

    # Greedy. The sampling knobs are set to their neutral values explicitly: left as None, generate()
    # fills them from the checkpoint's generation_config.json (e.g. temperature=0.2), and some
    # transformers versions then warn that do_sample=False ignores them.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
    )


def generate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Greedy completions for ``examples`` (in their order) and the timing of the generate calls.

    Prompts are batched longest-first to cut padding, left-padded, and decoded up to the first stop
    token (turn-end or eos), special tokens skipped, outer whitespace stripped. Timing:
    ``gen_s`` (wall time in ``generate``), ``new_tokens`` (generated tokens up to and including the stop
    token), ``s_per_example`` and ``tokens_per_s``.
    """
    if batch_size < 1:
        raise LayercardError(f"batch_size: must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise LayercardError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not examples:
        raise LayercardError(f"task {task.name!r}: no examples to generate for")
    stops = _stop_ids(tokenizer)
    stop_set = set(stops)
    pad_id = _pad_id(tokenizer, stops)
    gen_cfg = _generation_config(max_new_tokens, stops, pad_id)
    prompts = [encode_prompt(tokenizer, task.format, ex.input) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties keep source order
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    texts: list[str] = [""] * len(prompts)
    new_tokens = 0
    gen_s = 0.0
    device = _device(model)
    with _eval_mode(model), torch.no_grad():
        for group in track(groups, "generate", total=len(groups), enabled=progress):
            input_ids, attention = _left_pad([prompts[i] for i in group], pad_id)
            input_ids, attention = input_ids.to(device), attention.to(device)
            t0 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
            gen_s += time.perf_counter() - t0
            width = input_ids.shape[1]
            for row, i in enumerate(group):
                ids = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(ids) if t in stop_set), None)
                # finished rows are padded with pad_id after their stop token: count only real tokens
                new_tokens += len(ids) if cut is None else cut + 1
                kept = ids if cut is None else ids[:cut]
                texts[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()
    timing = {
        "gen_s": gen_s,
        "new_tokens": new_tokens,
        "s_per_example": gen_s / len(prompts),
        "tokens_per_s": new_tokens / gen_s if gen_s > 0 else 0.0,  # JSON has no NaN
    }
    return texts, timing


def eval_loss(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int | None,
) -> float:
    """Mean cross-entropy per target token (teacher forced, prompt masked), as training measures it."""
    from layercard.card.probe import loss_sum

    if not examples:
        raise LayercardError(f"task {task.name!r}: no examples to score")
    sub = Task(task.name, task.source, task.split, task.format, tuple(examples))
    encoded = encode_task(tokenizer, sub, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model), torch.no_grad():
        for batch in batches(encoded, batch_size, pad, sort_by_length=True):
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            loss, n = loss_sum(logits, batch["labels"].to(device))
            total += float(loss)
            count += n
    return total / count


# ---------------------------------------------------------------------------------------------------------
# Per-example scores
# ---------------------------------------------------------------------------------------------------------

# Metrics whose corpus value is the mean of a per-example score, so a per-example value is both cheap and
# consistent with the total. exact_match and token_f1 are always recorded (they show where an answer is
# close but not exact); the others only when requested.
_PER_EXAMPLE: dict[str, Callable[[str, Example], float]] = {
    "exact_match": lambda p, ex: exact_match(p, ex.references),
    "token_f1": lambda p, ex: token_f1(p, ex.references),
    "strict_match": lambda p, ex: strict_match(p, ex.references),
    "gsm8k_accuracy": lambda p, ex: METRICS["gsm8k_accuracy"]([p], [ex]),
}
_ALWAYS = ("exact_match", "token_f1")


def _prediction_rows(
    examples: Sequence[Example], texts: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    names = [*_ALWAYS, *(m for m in metrics if m in _PER_EXAMPLE and m not in _ALWAYS)]
    return [
        {
            "id": ex.id,
            "input": ex.input,
            "prediction": text,
            "references": list(ex.references),
            "scores": {n: _PER_EXAMPLE[n](text, ex) for n in names},
        }
        for ex, text in zip(examples, texts, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------
# Result artifact
# ---------------------------------------------------------------------------------------------------------


def _finite_or_none(x: float | None) -> float | None:
    # JSON has no NaN/Infinity; a loss of NaN (e.g. a diverged adapter) is recorded as null
    return None if x is None or not math.isfinite(x) else float(x)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation: corpus metrics, loss, timing, per-example predictions and where it came from."""

    metrics: dict[str, float]
    loss: float | None
    n: int
    timing: dict[str, float]
    predictions: list[dict[str, Any]]
    provenance: dict[str, Any]
    config: dict[str, Any]
    task: dict[str, Any]
    adapter: str | None

    @property
    def primary_metric(self) -> str:
        return next(iter(self.metrics))

    def to_dict(self, *, include_predictions: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not include_predictions:
            d.pop("predictions")
            d["predictions_file"] = PREDICTIONS_FILE
        scales = {m: METRICS[m].scale for m in self.metrics if m in METRICS}
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, "metric_scales": scales, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, predictions: list[dict[str, Any]] | None = None) -> EvalResult:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if predictions is not None:
            kw["predictions"] = predictions
        kw.setdefault("predictions", [])
        return cls(**kw)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/predictions.jsonl`` then ``out_dir/eval.json`` (each atomic); returns eval.json.

        eval.json goes last so its presence means the evaluation finished.
        """
        out = Path(out_dir)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.predictions)
        write_text(out / PREDICTIONS_FILE, lines)
        return write_json(out / EVAL_FILE, self.to_dict(include_predictions=False))

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read an eval folder (or its eval.json) with the predictions.jsonl beside it, when present."""
        p = Path(path)
        file = p / EVAL_FILE if p.is_dir() else p
        d = read_json(file, kind=KIND)
        preds_path = file.parent / str(d.get("predictions_file", PREDICTIONS_FILE))
        preds: list[dict[str, Any]] | None = None
        if "predictions" not in d and preds_path.is_file():
            try:
                preds = [json.loads(line) for line in preds_path.read_text().splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise LayercardError(f"{preds_path}: not valid JSON lines ({e.msg})") from None
        try:
            return cls.from_dict(d, predictions=preds)
        except TypeError as e:
            raise LayercardError(f"{file}: malformed eval artifact ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------


def evaluate(
    loaded: Any,
    task: Task,
    cfg: EvalConfig,
    *,
    adapter: str | Path | None = None,
    model: nn.Module | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Generate for (a seeded subset of) ``task``, score it, and optionally compute the target loss.

    ``model`` evaluates an already-adapted model the caller owns (e.g. a trimmed or masked adapter) and
    is left as it is; ``adapter`` is then only recorded (path and content hash). Without ``model``,
    ``adapter`` (a PEFT or layercard adapter folder) is attached to ``loaded.model`` for the evaluation
    and removed afterwards; with neither, the base is evaluated.
    """
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise LayercardError(f"adapter {adapter_dir}: no such folder")
    t_start = time.perf_counter()
    sub = task.subset(cfg.examples, seed=cfg.seed) if cfg.examples is not None else task
    if len(sub) == 0:
        raise LayercardError(f"task {task.name!r} ({task.split}): no examples to evaluate")
    run = cfg.resolved(sub)
    examples = sub.examples
    tok = loaded.tokenizer

    attach = adapter_dir is not None and model is None
    ctx = attached(loaded.model, adapter_dir) if attach else contextlib.nullcontext()
    with ctx as adapted:
        net = model if model is not None else (adapted if adapted is not None else loaded.model)
        texts, timing = generate(
            net,
            tok,
            sub,
            examples,
            batch_size=run.batch_size,
            max_new_tokens=run.max_new_tokens,
            progress=progress,
        )
        loss: float | None = None
        if run.loss:
            t0 = time.perf_counter()
            loss = eval_loss(net, tok, sub, examples, batch_size=run.batch_size, max_length=run.max_length)
            timing["loss_s"] = time.perf_counter() - t0

    assert run.metrics is not None  # resolved() filled it
    metrics = {name: METRICS[name](texts, examples) for name in run.metrics}
    timing["total_s"] = time.perf_counter() - t_start
    config = run.to_dict()
    prov_config = {**config, "model_override": model is not None}
    if adapter_dir is not None:
        prov_config["adapter"] = str(adapter_dir)
        prov_config["adapter_hash"] = hash_folder(adapter_dir)
    provenance = Provenance.make(
        stage="eval",
        model_id=loaded.model_id,
        model_hash=loaded.model_hash,
        task=sub.name,
        data_hash=sub.data_hash,
        config=prov_config,
        seed=run.seed,
        wall_time_s=timing["total_s"],
    )
    task_info = {**sub.describe(), "examples_in_split": len(task)}
    return EvalResult(
        metrics=metrics,
        loss=_finite_or_none(loss),
        n=len(examples),
        timing=timing,
        predictions=_prediction_rows(examples, texts, run.metrics),
        provenance=provenance.to_dict(),
        config=config,
        task=task_info,
        adapter=str(adapter_dir) if adapter_dir is not None else None,
    )
