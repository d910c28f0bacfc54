"""Evaluation: greedy generation scored with the task's metrics, plus teacher-forced validation loss.

:func:`evaluate` runs a (possibly adapted) model over a task split and returns an :class:`EvalResult`,
saved as ``eval.json`` (metrics, loss, timing, provenance) and ``predictions.jsonl`` (one line per
example). Generation and loss are :func:`layercard.inference.generate` and
:func:`layercard.inference.eval_loss`: prompts are exactly the ones training used, and generation stops
at the chat template's turn-end token, which is what the targets were trained to end with.

Timing (``s_per_example``, ``tokens_per_s``) is wall time of the batched ``generate`` calls only, with
adapters unmerged: this is the inference latency the trimming stage compares before and after
(docs/design.md §8). ``s_per_example`` is amortised over a batch (wall time / examples at
``batch_size``), not the latency of a single request; compare it only between runs with the same batch
size and machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from layercard.adapters import attached
from layercard.artifacts import (
    SCHEMA_VERSION,
    Fields,
    Provenance,
    hash_folder,
    non_finite,
    read_json,
    unique_keys,
    write_json,
    write_text,
)
from layercard.config import EvalConfig
from layercard.errors import LayercardError, MissingSplit, expect, message_line
from layercard.inference import eval_example_losses, eval_loss, generate, generation_prompts, prompts_finite
from layercard.models import LoadedModel, running_on
from layercard.tasks import (
    METRICS,
    Encoded,
    Example,
    Task,
    capped_generations_text,
    check_gold,
    cut_text,
    encode_task,
    exact_match,
    held_out,
    is_file_spec,
    load_task,
    names_split,
    prompt_cut,
    scored_as_written,
    strict_match,
    token_f1,
    tool_call_match,
    tool_call_split,
)
from layercard.train.metrics import check_task_record

# generate and eval_loss live in layercard.inference; they stay importable from here for older callers.
__all__ = [
    "KIND",
    "PREDICTIONS_FILE",
    "EvalConfig",
    "EvalResult",
    "difference_standard_error",
    "eval_loss",
    "evaluate",
    "fraction_standard_error",
    "generate",
    "ratio_standard_error",
    "resolve_eval_task",
]

KIND = "eval"
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    "tool_call_match": lambda p, ex: tool_call_match(p, ex.references),
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


def _check_loss(loss: float, task: Task, adapter: Path | None) -> None:
    """A NaN or infinite loss stops the evaluation: such a model has no score worth recording."""
    if not math.isfinite(loss):
        shown = "NaN" if math.isnan(loss) else "infinite"
        which = f"the model with adapter {adapter}" if adapter is not None else "the model"
        raise LayercardError(
            f"eval: the loss on {task.name} ({task.split}) is {shown}: {which} gives non-finite outputs; "
            "no eval.json was written"
        )


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation: corpus metrics, loss, timing, per-example predictions and where it came from.

    ``task["cut"]`` counts the examples whose tokens were cut: ``prompts``, generation prompts cut to the
    format's ``max_input_tokens``; ``generations``, completions stopped at ``max_new_tokens`` before an
    end token; ``loss_to_max_length`` and ``loss_to_format_limits``, loss examples cut to ``max_length``
    and to the format's prompt and target limits (None without the loss). An eval.json from before these
    counts has no ``cut``, and one from before ``generations`` none of that.
    """

    metrics: dict[str, float]
    loss: float | None
    n: int
    timing: dict[str, float]
    predictions: list[dict[str, Any]]
    provenance: dict[str, Any]
    config: dict[str, Any]
    task: dict[str, Any]
    adapter: str | None
    # Each example's summed target loss and target-token count (when the loss was computed): what a
    # difference of two evaluations' losses, and a fraction of one, get their sampling error from.
    example_loss_sums: list[float] | None = None
    example_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        sums, tokens = self.example_loss_sums, self.example_tokens
        if (sums is None) != (tokens is None):
            raise LayercardError("eval: example_loss_sums and example_tokens come together")
        if sums is not None and tokens is not None:
            if not (len(sums) == len(tokens) == self.n):
                raise LayercardError(
                    f"eval: {len(sums)} example losses and {len(tokens)} token counts for n={self.n} examples"
                )
            if not all(math.isfinite(v) and v >= 0 for v in sums) or any(int(t) < 0 for t in tokens):
                raise LayercardError("eval: example losses must be finite and >= 0, token counts >= 0")

    @property
    def primary_metric(self) -> str:
        return next(iter(self.metrics))

    def cut_note(self) -> str | None:
        """Lines (each ``note: ...``) saying how many examples' tokens were cut (``task["cut"]``), or None
        where none were or the result predates the counts."""
        cut = self.task.get("cut")
        fmt = self.task.get("format") or {}
        if not cut:
            return None
        lines = []
        if cut.get("prompts"):
            lines.append(
                f"note: {cut['prompts']} of {self.n} eval prompts are longer than the task format's limit of "
                f"{fmt.get('max_input_tokens')} prompt tokens and were cut to it for generation, as training "
                "cuts them (from the input's start first)"
            )
        if cut.get("generations"):
            limit = self.config.get("max_new_tokens")
            lines.append("note: " + capped_generations_text(cut["generations"], self.n, limit))
        limits = (fmt.get("max_input_tokens"), fmt.get("max_target_tokens"))
        loss = cut_text(
            cut.get("loss_to_max_length") or 0,
            self.n,
            self.config.get("max_length"),
            "eval loss",
            cut.get("loss_to_format_limits") or 0,
            limits if None not in limits else None,
        )
        if loss:
            lines.append(loss)
        return "\n".join(lines) or None

    def tool_call_note(self) -> str | None:
        """A line saying what ``tool_call_match`` is made of where the references mix calls and answers
        (:func:`~layercard.tasks.tool_call_split`), or None: there a conversation due an answer counts
        right whenever no call is made, and the mean alone does not say how the calls fared."""
        if "tool_call_match" not in self.metrics or not self.predictions:
            return None
        split = tool_call_split(
            [r["prediction"] for r in self.predictions], [r["references"] for r in self.predictions]
        )
        if split is None:
            return None
        due = split["calls_right"] + split["calls_other"] + split["calls_missing"]
        answers = split["answers_right"] + split["answers_called"]
        return (
            f"note: tool_call_match mixes two counts here: of {due} conversations due a call, "
            f"{split['calls_right']} made the right one ({split['calls_other']} another, "
            f"{split['calls_missing']} none); of {answers} due an answer, {split['answers_right']} made no "
            f"call ({split['answers_called']} called)"
        )

    def to_dict(self, *, include_predictions: bool = True) -> dict[str, Any]:
        """Every field, as eval.json holds it without ``include_predictions`` (predictions.jsonl)."""
        d = dataclasses.asdict(self)
        if not include_predictions:
            d.pop("predictions")
            d["predictions_file"] = PREDICTIONS_FILE
        scales = {m: METRICS[m].scale for m in self.metrics if m in METRICS}
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, "metric_scales": scales, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, predictions: list[dict[str, Any]] | None = None) -> EvalResult:
        """The result :meth:`to_dict` gave, with ``predictions`` (predictions.jsonl's rows) where given."""
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if predictions is not None:
            kw["predictions"] = predictions
        kw.setdefault("predictions", [])
        return cls(**kw)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/predictions.jsonl`` then ``out_dir/eval.json`` (each atomic); returns eval.json.

        eval.json goes last so its presence means the evaluation finished, and an earlier eval.json goes
        first, so that a write cut between the two never pairs it with these predictions.
        """
        out = Path(out_dir)
        if (out / EVAL_FILE).is_file():  # a folder in its place is refused by the write, as before
            (out / EVAL_FILE).unlink()
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.predictions)
        write_text(out / PREDICTIONS_FILE, lines)
        return write_json(out / EVAL_FILE, self.to_dict(include_predictions=False))

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read an eval folder (or its eval.json) with the predictions.jsonl beside it, when present; every
        field is checked (:func:`check_eval`)."""
        p = Path(path)
        # a folder named eval.json in place of the file is refused as such, not looked into
        file = p / EVAL_FILE if p.is_dir() and (p.name != EVAL_FILE or (p / EVAL_FILE).exists()) else p
        d = read_json(file, kind=KIND)
        check_eval(d, str(file))
        preds_path = file.parent / PREDICTIONS_FILE
        preds: list[dict[str, Any]] | None = None
        if "predictions" not in d and preds_path.is_file():
            preds = _read_predictions(preds_path, d["n"])
        try:
            return cls.from_dict(d, predictions=preds)
        except (TypeError, LayercardError) as e:
            raise LayercardError(f"{file}: malformed eval artifact ({e})") from None


def check_metric_scores(f: Fields, value: Any, where: str) -> Mapping[str, float]:
    """A mapping of metric names to scores: finite numbers, within ``[0, scale]`` for a metric layercard
    scores (:data:`layercard.tasks.METRICS`; any other has no known range)."""
    scores = f.mapping(value, where)
    for name, x in scores.items():
        at = f"{where}.{name}"
        f.number(x, at)
        metric = METRICS.get(str(name))
        # a score computed in floating point may sit a rounding past its scale (sacrebleu's perfect BLEU
        # is exp(log 100) = 100.00000000000004)
        if metric is not None and not -1e-9 * metric.scale <= x <= metric.scale * (1 + 1e-9):
            f.fail(at, f"must be a score in [0, {metric.scale:g}]", x)
    return scores


def check_eval(d: Mapping[str, Any], source: str) -> None:
    """Check an eval.json dict field by field: its scores and loss, its examples and what each records."""
    f = Fields(source)
    extra = {"kind", "schema_version", "metric_scales", "predictions_file"}  # what to_dict adds
    f.known(d, {x.name for x in dataclasses.fields(EvalResult)} | extra)
    n = f.integer(f.get(d, "n"), "n", minimum=1)  # an evaluation of no examples is refused, not written
    if not check_metric_scores(f, f.get(d, "metrics"), "metrics"):
        f.fail("metrics", "must hold at least one metric (the first is the primary), got none")
    loss = f.optional(f.get(d, "loss"), "loss", lambda v, w: f.number(v, w, minimum=0))
    for key, x in f.mapping(f.get(d, "timing"), "timing").items():  # seconds, tokens and their rates
        f.optional(x, f"timing.{key}", lambda v, w: f.number(v, w, minimum=0))
    for key in ("provenance", "config"):
        f.mapping(f.get(d, key), key)
    task = check_task_record(f, f.get(d, "task"), "task")
    if f.get(task, "n_examples", "task") != n:
        f.fail("task.n_examples", f"must be the {n} examples evaluated (n)", task["n_examples"])
    cut = f.optional(task.get("cut"), "task.cut", f.mapping) or {}
    for key, x in cut.items():
        f.optional(x, f"task.cut.{key}", lambda v, w: f.integer(v, w, minimum=0, below=n + 1))
    f.optional(task.get("format"), "task.format", f.mapping)
    f.optional(f.get(d, "adapter"), "adapter", f.text)
    # always the file beside eval.json: a path elsewhere would have a report read outside the run folder
    if f.optional(d.get("predictions_file"), "predictions_file", f.text) not in (None, PREDICTIONS_FILE):
        f.fail("predictions_file", f"must be {PREDICTIONS_FILE!r}, the file beside it", d["predictions_file"])
    if "predictions" in d:
        for i, row in enumerate(f.items(d["predictions"], "predictions")):
            f.mapping(row, f"predictions[{i}]")
    _check_example_losses(f, d, n, loss)


def _check_example_losses(f: Fields, d: Mapping[str, Any], n: int, loss: float | None) -> None:
    """Each example's summed loss and target tokens: both or neither, one per example, and the loss their
    ratio (as :func:`evaluate` computes it)."""
    sums, tokens = d.get("example_loss_sums"), d.get("example_tokens")
    if sums is None and tokens is None:
        return
    if sums is None or tokens is None:
        missing = "example_loss_sums" if sums is None else "example_tokens"
        f.fail(missing, "missing; example_loss_sums and example_tokens come together")
    f.numbers(sums, "example_loss_sums", minimum=0)
    for i, t in enumerate(f.items(tokens, "example_tokens")):
        f.integer(t, f"example_tokens[{i}]", minimum=1)  # a target of no tokens is refused when encoded
    for key, values in (("example_loss_sums", sums), ("example_tokens", tokens)):
        if len(values) != n:
            f.fail(key, f"must hold one value per example (n = {n})", values)
    ratio = math.fsum(sums) / sum(tokens)
    if loss is None or not math.isclose(loss, ratio, rel_tol=1e-9, abs_tol=1e-12):
        f.fail("loss", f"must be the examples' summed loss over their tokens ({ratio!r})", loss)


def _read_predictions(path: Path, n: int) -> list[dict[str, Any]]:
    """predictions.jsonl's rows: one JSON object per evaluated example."""
    if path.is_dir():
        raise LayercardError(f"{path}: is a folder, not a JSON lines file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LayercardError(f"{path}: not UTF-8 text (byte {e.start})") from None
    f = Fields(str(path))
    rows = []
    # split("\n"), not splitlines(): JSON keeps U+2028 and U+0085 raw inside its strings
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as e:
            raise LayercardError(f"{path}: line {i}: not valid JSON ({e.msg}, column {e.colno})") from None
        except ValueError as e:  # a key written twice, an integer past Python's digits
            raise LayercardError(f"{path}: line {i}: not valid JSON ({message_line(e)})") from None
        f.mapping(row, f"line {i}")
        found = non_finite(row)
        if found is not None:
            f.fail(f"line {i}: {found[0]}", "must be a finite number", found[1])
        rows.append(row)
    if rows and len(rows) != n:  # none: a result saved without its predictions
        raise LayercardError(f"{path}: holds {len(rows)} predictions, the evaluation's n is {n}")
    return rows


def ratio_standard_error(num: Sequence[float], den: Sequence[float]) -> float | None:
    """The sampling standard error of R = Σnumᵢ / Σdenᵢ over the same examples, treating them as drawn at
    random from the task: √(n/(n−1)·Σ(numᵢ − R·denᵢ)²) / Σdenᵢ, the first-order error of a ratio of two
    sums. None under two examples, when the lengths differ or Σden is not positive."""
    n = len(num)
    if n < 2 or len(den) != n:
        return None
    total = math.fsum(den)
    if not (math.isfinite(total) and total > 0):
        return None
    r = math.fsum(num) / total
    se = math.sqrt(n / (n - 1) * math.fsum((a - r * b) ** 2 for a, b in zip(num, den, strict=True))) / total
    return se if math.isfinite(se) else None


def fraction_standard_error(
    base_sums: Sequence[float], ref_sums: Sequence[float], run_sums: Sequence[float]
) -> float | None:
    """The sampling error of a run's fraction of the reference's loss drop, f = Σ(b − x) / Σ(b − r) over the
    same examples (each example's summed target loss: base b, reference r, run x); see
    :func:`ratio_standard_error`, None where that is or the three lengths differ."""
    if not (len(base_sums) == len(ref_sums) == len(run_sums)):
        return None
    return ratio_standard_error(
        [b - x for b, x in zip(base_sums, run_sums, strict=True)],
        [b - r for b, r in zip(base_sums, ref_sums, strict=True)],
    )


def difference_standard_error(
    base_sums: Sequence[float], ref_sums: Sequence[float], a_sums: Sequence[float], b_sums: Sequence[float]
) -> float | None:
    """The sampling error of the difference of two runs' fractions, f_a − f_b = Σ(x_b − x_a) / Σ(b − r),
    paired over the same examples: an example both find hard moves both fractions and cancels here."""
    if not (len(base_sums) == len(ref_sums) == len(a_sums) == len(b_sums)):
        return None
    return ratio_standard_error(
        [xb - xa for xa, xb in zip(a_sums, b_sums, strict=True)],
        [b - r for b, r in zip(base_sums, ref_sums, strict=True)],
    )


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------


def resolve_eval_task(
    spec: str, *, split: str | None = None, seed: int = 0, **load_kwargs: Any
) -> tuple[Task, str | None]:
    """The task an evaluation of ``spec`` scores, and a line to show when it is not a held-out split.

    ``split`` when given (a split in ``spec`` likewise); else a file as it is; else the test split, then
    the validation split: a task's default split is its training one, which an evaluation should not score
    unasked. An ``hf:`` task gets its validation split (a hub dataset's test labels may be hidden, as
    GLUE's are -1), else its test split, with a line saying so. A task with neither split falls back to
    its default split, with the line saying so. ``load_kwargs`` go to :func:`layercard.tasks.load_task`.
    """
    spec = str(spec)
    if split is None and spec.startswith("hf:"):
        try:
            return load_task(spec, split="validation", seed=seed, **load_kwargs), None
        except MissingSplit:  # train and test only (as gsm8k on the hub): its test split, said
            said = f"task {spec} has no validation split: scoring its test split (check its labels are there)"
            return load_task(spec, split="test", seed=seed, **load_kwargs), said
    said = None
    if split is None and not is_file_spec(spec) and not names_split(spec):
        task = held_out(spec, seed=seed, order=("test", "validation"), **load_kwargs)
        if task is not None:
            return task, None
        said = f"task {spec} has no test or validation split: scoring its default split"
    return load_task(spec, split=split, seed=seed, **load_kwargs), said


def _cut_counts(
    tok: Any, task: Task, max_length: int | None, loss: bool
) -> tuple[dict[str, int | None], list[Encoded] | None]:
    """``EvalResult.task["cut"]`` and, where the loss is computed, the examples encoded for it: encoded
    before generation, so the loss encoding's own errors (a target of no tokens) come before it too."""
    counts: dict[str, int | None] = {
        "prompts": sum(prompt_cut(tok, task.format, ex) for ex in task.examples),
        "loss_to_max_length": None,
        "loss_to_format_limits": None,
    }
    encoded = None
    if loss:
        encoded = encode_task(tok, task, max_length=max_length)
        counts["loss_to_max_length"] = sum(e.cut for e in encoded)
        counts["loss_to_format_limits"] = sum(e.clipped for e in encoded)
    return counts, encoded


def _evaluated(task: Task, cfg: EvalConfig, tok: Any) -> tuple[Task, EvalConfig, list[Example]]:
    """The examples :func:`evaluate` generates for, its settings as they run, and the examples as their
    generations are scored (a final turn of tool calls as the chat template writes it, as the model
    learned it), whose gold answers are checked."""
    sub = task.subset(cfg.examples, seed=cfg.seed) if cfg.examples is not None else task
    if len(sub) == 0:
        raise LayercardError(f"task {task.name!r} ({task.split}): no examples to evaluate")
    scored = [scored_as_written(tok, sub.format, ex) for ex in sub.examples]
    run = cfg.resolved(sub, scored)
    assert run.metrics is not None  # resolved() filled it
    check_gold(run.metrics, scored)  # a bad gold answer fails now, not after hours of generation
    return sub, run, scored


def check_evaluable(loaded: LoadedModel, task: Task, cfg: EvalConfig) -> None:
    """Refuse, before any work that precedes an evaluation (a run's training), what :func:`evaluate` of
    ``task`` would refuse before generating: no examples, a bad gold answer, or prompts that with
    ``max_new_tokens`` outgrow the model's context."""
    expect("check_evaluable", "loaded", loaded, LoadedModel, "load it with layercard.load_model")
    sub, run, _ = _evaluated(task, cfg, loaded.tokenizer)
    assert run.max_new_tokens is not None  # resolved() filled it
    generation_prompts(loaded.model, loaded.tokenizer, sub, sub.examples, run.max_new_tokens)


def evaluate(
    loaded: LoadedModel,
    task: Task | str | Path,
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
    ``task`` may be a task spec, read as ``layercard eval`` reads it (:func:`resolve_eval_task`, with
    ``cfg.seed``): its test split, else its validation split, never its training split unasked.
    The gold data is checked for every metric before anything is generated.
    """
    expect("evaluate", "loaded", loaded, LoadedModel, "load it with layercard.load_model")
    expect("evaluate", "cfg", cfg, EvalConfig, "such as EvalConfig(examples=64)")
    if isinstance(task, (str, Path)):
        task = resolve_eval_task(str(task), seed=cfg.seed)[0]
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise LayercardError(f"adapter {adapter_dir}: no such folder")
    t_start = time.perf_counter()
    sub, run, scored = _evaluated(task, cfg, loaded.tokenizer)
    examples = sub.examples
    tok = loaded.tokenizer
    cut, encoded = _cut_counts(tok, sub, run.max_length, run.loss)

    attach = adapter_dir is not None and model is None
    ctx = (
        attached(loaded.model, adapter_dir, model_hash=loaded.model_hash, files=loaded.base_files)
        if attach
        else contextlib.nullcontext()
    )
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
        cut["generations"] = int(timing.pop("capped"))
        loss: float | None = None
        sums: list[float] | None = None
        tokens: list[int] | None = None
        if run.loss:
            t0 = time.perf_counter()
            sums, tokens = eval_example_losses(
                net, tok, sub, examples, batch_size=run.batch_size, max_length=run.max_length, encoded=encoded
            )
            loss = math.fsum(sums) / sum(tokens)
            timing["loss_s"] = time.perf_counter() - t0
            _check_loss(loss, sub, adapter_dir)
        elif not prompts_finite(net, tok, sub, examples[: run.batch_size]):
            which = f"the model with adapter {adapter_dir}" if adapter_dir is not None else "the model"
            raise LayercardError(
                f"eval: {which} gives non-finite logits on the prompts of {sub.name} ({sub.split}); "
                "no eval.json was written"
            )

    metrics = {name: METRICS[name](texts, scored) for name in run.metrics}
    timing["total_s"] = time.perf_counter() - t_start
    config = run.to_dict()
    prov_config = {**config, "model_override": model is not None, **running_on(loaded.model)}
    if adapter_dir is not None:
        prov_config["adapter"] = str(adapter_dir)
        prov_config["adapter_hash"] = hash_folder(adapter_dir)
    provenance = Provenance.make(
        stage="eval",
        model_id=loaded.model_id,
        model_hash=loaded.model_hash,
        tokenizer_hash=loaded.tokenizer_hash,
        task=sub.name,
        data_hash=sub.data_hash,
        config=prov_config,
        seed=run.seed,
        wall_time_s=timing["total_s"],
    )
    task_info = {**sub.describe(), "examples_in_split": len(task), "cut": cut}
    return EvalResult(
        metrics=metrics,
        loss=None if loss is None else float(loss),
        n=len(examples),
        timing=timing,
        predictions=_prediction_rows(scored, texts, run.metrics),
        provenance=provenance.to_dict(),
        config=config,
        task=task_info,
        adapter=str(adapter_dir) if adapter_dir is not None else None,
        example_loss_sums=sums,
        example_tokens=tokens,
    )
