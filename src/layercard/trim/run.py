"""The trace and trim stage functions (docs/design.md §8): :func:`run_trace` and :func:`trim`.

:func:`trim` runs in named steps: :func:`_job` fixes what is measured before the model is touched;
:func:`_search` traces (when the candidates are needed), sweeps K and picks the boundary on the adapted
model; :func:`_export_checked` writes the trimmed adapter and proves it reproduces the masked model;
:func:`_merge_checked` optionally merges it; :func:`_result` assembles trim.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard import inference
from layercard.adapters import attached
from layercard.artifacts import SCHEMA_VERSION, Provenance, atomic_path, hash_folder, is_within, write_json
from layercard.config import TraceConfig, TrimConfig
from layercard.errors import LayercardError, expect
from layercard.models import LoadedModel, running_on
from layercard.tasks import (
    METRICS,
    Task,
    batches,
    default_metrics,
    encode_task,
    higher_is_better,
    scored_as_written,
)
from layercard.train.readme import README_FILE, trimmed_readme
from layercard.trim.export import (
    _adapter_kind,
    _write_trimmed,
    check_mergeable,
    check_merged_target,
    check_trimmable,
    export_merged,
)
from layercard.trim.figures import plot_sweep
from layercard.trim.lens import TRACE_FILE, Trace, trace
from layercard.trim.mask import adapted_layers, adapted_modules, masked_layers
from layercard.trim.sweep import (
    Scorer,
    boundary_choice,
    candidate_ks,
    loss_scorer,
    metric_is_flat,
    sweep,
    task_scorer,
)

__all__ = [
    "MERGED_DIR",
    "TRIMMED_DIR",
    "TRIM_FILE",
    "check_merged_folder",
    "latency_text",
    "run_trace",
    "trim",
]

TRIM_KIND = "trim"
# The top-level fields of trim.json (the report refuses any other: a misspelt one would be dropped).
TRIM_FIELDS = frozenset({
    "kind", "schema_version", "adapter", "adapter_format", "metric", "higher_is_better", "tie_tolerance",
    "max_new_tokens", "metrics", "metric_scales", "n_layers", "adapted_layers", "candidates", "trace", "ks",
    "sweep", "chosen_k", "chosen_by", "metric_flat", "before", "after", "after_matches_sweep",
    "adapted_modules_before", "adapted_modules_after", "export", "merged", "task", "timings", "provenance",
})  # fmt: skip
TRIM_FILE = "trim.json"
TRIM_PNG = "trim.png"
TRIMMED_DIR = "adapter-trimmed"
MERGED_DIR = "merged"


# ---------------------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------------------


def check_merged_folder(merged_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> None:
    """Refuse, before any work, a ``--export-merged`` folder whose replacement would lose the adapter, the
    trim's own outputs or anything else, or that would sit inside an adapter (whose folder hash names it)
    (:func:`~layercard.trim.export.check_merged_target`)."""
    trimmed = Path(out_dir) / TRIMMED_DIR
    check_merged_target(merged_dir, [adapter_dir, out_dir, trimmed], outside=[adapter_dir, trimmed])


def check_out_of_adapter(out_dir: str | Path, adapter_dir: str | Path, what: str = "--out") -> None:
    """Refuse an output folder that is, or lies inside, the adapter folder: the files written there would
    change the adapter measured (its hash, so every trace is made again) and be copied into its export."""
    if is_within(out_dir, adapter_dir):
        raise LayercardError(
            f"{what} {out_dir}: is the adapter folder {adapter_dir} or inside it; give a folder of its own "
            "(the default is the adapter's parent)"
        )


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
        tokenizer_hash=loaded.tokenizer_hash,
        task=sub.name,
        data_hash=sub.data_hash,
        config={**cfg.to_dict(), "adapter": str(adapter), "adapter_hash": adapter_hash, **running_on(model)},
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
    with attached(loaded.model, adapter, model_hash=loaded.model_hash, files=loaded.base_files) as model:
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
        # a trace made at another dtype or on another device is no trace of this run
        and all(conf.get(k) == v for k, v in running_on(loaded.model).items())
    )
    return tr if same else None


# ---------------------------------------------------------------------------------------------------------
# Rows and checks
# ---------------------------------------------------------------------------------------------------------


def _probe_batch(tokenizer: Any, sub: Task, cfg: TrimConfig) -> dict[str, torch.Tensor]:
    encoded = encode_task(tokenizer, sub, max_length=cfg.max_length)
    return next(batches(encoded[: cfg.batch_size], cfg.batch_size, inference.pad_id(tokenizer)))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    dev = inference.device_of(model)
    with inference.eval_mode(model):
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
        "new_tokens_per_example": measured["new_tokens_per_example"],
    }


def latency_text(before: dict[str, Any], after: dict[str, Any]) -> str:
    """``0.041 → 0.030 s/example`` of a trim's before/after rows, with the tokens each generated per
    example where those differ (a model that stops sooner is faster per example for that reason alone)."""
    text = f"{before['s_per_example']:.3f} → {after['s_per_example']:.3f} s/example"
    nb, na = before.get("new_tokens_per_example"), after.get("new_tokens_per_example")
    if nb is not None and na is not None and not math.isclose(nb, na, rel_tol=0.01):
        text += f" (generating {nb:.1f} → {na:.1f} tokens/example: not the same work)"
    return text


def _latency(measured: dict[str, Any], repeats: int, timer: Callable[[], float]) -> list[float]:
    """``s_per_example`` of the scoring pass plus ``repeats - 1`` more timed generation passes."""
    return [measured["s_per_example"], *(timer() for _ in range(repeats - 1))]


def _matches_sweep(after_row: dict[str, Any], chosen_row: dict[str, Any]) -> bool:
    """Whether the exported adapter measures what the masked sweep row measured: the same generated
    texts, or, for a loss-only sweep (no texts), the same loss up to the export check's 1e-5 noise."""
    if "predictions" in chosen_row:
        return after_row["predictions"] == chosen_row["predictions"]
    a, b = after_row["loss"], chosen_row["loss"]
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# trim, step by step
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """What one :func:`trim` call measures, fixed before the model is touched."""

    loaded: Any
    adapter: Path
    kind: str  # "peft" or "layercard"
    task: Task  # the whole split, for examples_in_split
    sub: Task  # the examples scored
    cfg: TrimConfig
    out: Path
    metric: str
    higher: bool
    names: list[str]  # text metrics of the before/after rows (and of the sweep rows when they generate)
    max_new: int
    adapter_hash: str
    probe: dict[str, torch.Tensor]
    score: Scorer  # generation, text metrics and loss: the before/after rows
    sweep_score: Scorer  # each K: ``score``, or the loss alone when the selection metric is the loss
    progress: bool | None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def _generate(self, net: nn.Module, examples: Sequence[Any]) -> dict[str, Any]:
        """Generate for ``examples`` as the scorer does; the timing of the pass."""
        _, timing = inference.generate(
            net, self.loaded.tokenizer, self.sub, examples, batch_size=self.cfg.batch_size,
            max_new_tokens=self.max_new, progress=False,
        )  # fmt: skip
        return timing

    def gen_timer(self, net: nn.Module) -> Callable[[], float]:
        """One more timed generation pass of ``net`` over the examples: its ``s_per_example``."""
        return lambda: float(self._generate(net, self.sub.examples)["s_per_example"])

    def warm_up(self, net: nn.Module) -> None:
        """One untimed generation over the first batch, so that the next timed pass is not the process's
        first (which also pays for first-call set-up and would be set against a warm 'after')."""
        self._generate(net, self.sub.examples[: self.cfg.batch_size])


def _job(
    loaded: Any,
    adapter_dir: str | Path,
    task: Task,
    cfg: TrimConfig,
    out_dir: str | Path,
    export_merged_dir: str | Path | None,
    progress: bool | None,
) -> _Job:
    """Check the inputs, pick the examples and metrics, and build the scorers."""
    expect("trim", "loaded", loaded, LoadedModel, "load it with layercard.load_model")
    expect("trim", "task", task, Task, "read it with layercard.load_task")
    expect("trim", "cfg", cfg, TrimConfig, "such as TrimConfig(examples=32)")
    adapter = Path(adapter_dir)
    check_out_of_adapter(out_dir, adapter)
    kind = _adapter_kind(adapter)
    if export_merged_dir is not None and kind != "peft":
        raise LayercardError(
            f"--export-merged: {adapter} holds bottleneck adapters (houlsby/parallel), which cannot be merged"
        )
    if export_merged_dir is not None:
        check_merged_folder(export_merged_dir, adapter, out_dir)
    if kind == "peft":
        check_trimmable(adapter)
        if export_merged_dir is not None:
            check_mergeable(adapter, loaded.model)
    sub = _subset(task, cfg.examples, cfg.seed)
    tok = loaded.tokenizer
    scored = [scored_as_written(tok, sub.format, ex) for ex in sub.examples]  # as the sweep scores them
    metrics = default_metrics(sub.format.name, sub.format.metrics, scored)
    metric = cfg.metric or metrics[0]
    higher = higher_is_better(metric)  # each metric declares its direction; the loss is lower-is-better
    names = list(dict.fromkeys([*([metric] if metric != "loss" else []), *metrics]))
    names += [m for m in ("token_f1", "rouge_l") if m not in names]  # F1/ROUGE-L beside the task metric
    max_new = cfg.max_new_tokens or sub.format.max_new_tokens
    score = task_scorer(
        tok, sub, sub.examples, metrics=names, batch_size=cfg.batch_size, max_new_tokens=max_new,
        max_length=cfg.max_length, scored=scored,
    )  # fmt: skip
    # Selecting by loss needs no text: generating at every K would cost most of the sweep for nothing.
    sweep_score = (
        loss_scorer(tok, sub, sub.examples, batch_size=cfg.batch_size, max_length=cfg.max_length)
        if metric == "loss"
        else score
    )
    return _Job(
        loaded=loaded, adapter=adapter, kind=kind, task=task, sub=sub, cfg=cfg, out=Path(out_dir),
        metric=metric, higher=higher, names=names, max_new=max_new, adapter_hash=hash_folder(adapter),
        probe=_probe_batch(tok, sub, cfg), score=score, sweep_score=sweep_score, progress=progress,
    )  # fmt: skip


def _boundary_trace(job: _Job, model: nn.Module) -> Trace | None:
    """The trace whose candidates the sweep centres on (reused when an identical one is on disk), or
    None when the sweep's K values are given (window or all layers)."""
    cfg = job.cfg
    if cfg.window is not None or cfg.all_layers:
        return None
    tcfg = cfg.trace_config()
    tr = _reusable_trace(job.out / TRACE_FILE, job.loaded, job.sub, tcfg, job.adapter_hash)
    if tr is None:
        t0 = time.perf_counter()
        tr = _traced(model, job.loaded, job.adapter, job.adapter_hash, job.task, job.sub, tcfg, job.progress)
        tr.save(job.out)
        job.timings["trace_s"] = time.perf_counter() - t0
    return tr


@dataclasses.dataclass
class _Found:
    """What the sweep on the adapted model found."""

    n_layers: int
    have: tuple[int, ...]  # adapted decoder layers
    tr: Trace | None
    ks: list[int]
    rows: list[dict[str, Any]]
    chosen: int
    chosen_by: str  # the selection metric, or "loss" where the metric tied at every K
    modules_before: list[str]
    modules_after: list[str]
    before: dict[str, Any]
    ref_logits: torch.Tensor  # the masked model's logits on the probe batch, for the export check


def _search(job: _Job, model: nn.Module) -> _Found:
    """Trace (if needed), sweep K, choose the boundary and measure the 'before' row on ``model``."""
    from layercard.models import num_layers

    n_layers = num_layers(model)
    have = adapted_layers(model)
    if not have:
        raise LayercardError(
            f"{job.adapter}: the adapter has no modules in the decoder layers; nothing to trim"
        )
    tr = _boundary_trace(job, model)
    cfg = job.cfg
    ks = candidate_ks(
        n_layers, have, candidates=tr.candidates.values() if tr else (), radius=cfg.radius,
        window=cfg.window, all_layers=cfg.all_layers,
    )  # fmt: skip
    if job.sweep_score is job.score and len(ks) == 1:
        job.warm_up(model)  # the sweep's one pass is the 'before' one and would be the first generation
    t0 = time.perf_counter()
    rows = sweep(model, ks, job.sweep_score, progress=job.progress)
    job.timings["sweep_s"] = time.perf_counter() - t0
    chosen, chosen_by = boundary_choice(rows, job.metric, job.higher, tolerance=cfg.tie_tolerance)
    # Before = nothing masked (K = the last adapted layer). A generating sweep has measured it already (its
    # last row); a loss-only sweep has no texts, so it is measured here, after a warm-up generation, since
    # it is then the process's first. Either way its extra latency passes run warm, after the sweep.
    if job.sweep_score is job.score:
        full = rows[-1]
    else:
        job.warm_up(model)
        full = job.score(model, ks[-1])
    before = _summary(model, ks[-1], full, _latency(full, cfg.latency_repeats, job.gen_timer(model)))
    with masked_layers(model, chosen):
        ref_logits = _logits(model, job.probe)
    return _Found(
        n_layers=n_layers, have=have, tr=tr, ks=ks, rows=rows, chosen=chosen, chosen_by=chosen_by,
        modules_before=adapted_modules(model), modules_after=adapted_modules(model, chosen), before=before,
        ref_logits=ref_logits,
    )  # fmt: skip


@dataclasses.dataclass
class _Exported:
    """The trimmed adapter written and checked, and its 'after' measurements."""

    export: dict[str, Any]
    logits: torch.Tensor  # the trimmed adapter's logits on the probe batch
    after_row: dict[str, Any]  # the scorer's row (with predictions)
    after: dict[str, Any]  # the summary row of trim.json


def _export_checked(job: _Job, found: _Found) -> _Exported:
    """Write adapter-trimmed/ and measure it; nothing is written unless it reproduces the masked model."""
    trimmed_dir = job.out / TRIMMED_DIR
    probe, chosen = job.probe, found.chosen
    with atomic_path(trimmed_dir) as tmp:
        export = _write_trimmed(job.adapter, tmp, chosen, job.loaded.model)
        with attached(job.loaded.model, tmp) as trimmed_model:
            got = _logits(trimmed_model, probe)
            diff = _max_diff(got, found.ref_logits, probe["attention_mask"])
            scale = max(1.0, float(found.ref_logits.abs().max()))
            if not diff <= 1e-5 * scale:  # exact on CPU; room only for kernel-level noise elsewhere
                raise LayercardError(
                    f"trimmed adapter does not reproduce the masked model (max |Δlogit| = {diff:.3g}); "
                    "nothing was written"
                )
            after_row = job.score(trimmed_model, chosen)
            lat = _latency(after_row, job.cfg.latency_repeats, job.gen_timer(trimmed_model))
            after = _summary(trimmed_model, chosen, after_row, lat)
        (tmp / README_FILE).write_text(_readme(job, found, after, trimmed_dir), encoding="utf-8")
    export.update({"path": str(trimmed_dir), "max_abs_logit_diff_vs_masked": diff})
    return _Exported(export=export, logits=got, after_row=after_row, after=after)


def _readme(job: _Job, found: _Found, after: dict[str, Any], trimmed_dir: Path) -> str:
    parent = job.adapter / README_FILE
    return trimmed_readme(
        model_id=job.loaded.model_id,
        base_source=job.loaded.source,
        parent=str(job.adapter),
        parent_readme=parent.read_text(errors="replace", encoding="utf-8") if parent.is_file() else None,
        keep_upto=found.chosen,
        kept_layers=after["adapted_layers"],
        metric=job.metric,
        before=found.before,
        after=after,
        examples=f"{len(job.sub)} examples of {job.sub.name}",
        adapter_dir=str(trimmed_dir),
    )


def _merge_checked(job: _Job, exported: _Exported, out_dir: str | Path, in_place: bool) -> dict[str, Any]:
    """Merge the trimmed LoRA into the base (see :func:`export_merged`); nothing is written unless the
    merged model gives the trimmed adapter's logits up to the rounding of the weights' dtype."""

    found: dict[str, Any] = {}  # what the check measured, for trim.json as for the folder's mark

    def check(merged: nn.Module) -> dict[str, Any]:
        diff = _max_diff(_logits(merged, job.probe), exported.logits, job.probe["attention_mask"])
        scale = max(1.0, float(exported.logits.abs().max()))
        # Merging rounds W + BA once in the weights' dtype: about 1e-6 of the logits' scale in float32,
        # up to 4% in bfloat16 (smollm2, every linear module merged); a merge that is wrong, not rounded
        # (a LoRA on a tied lm_head), moves the logits by more than their scale.
        exact = next(merged.parameters()).dtype == torch.float32
        if not diff <= (1e-3 if exact else 0.2) * scale:
            raise LayercardError(
                f"--export-merged: the merged model does not give the trimmed adapter's logits (max "
                f"|Δlogit| = {diff:.3g}, the logits' scale {scale:.3g}); it was not written (the checked "
                "adapter-trimmed/ was, trim.json not)"
            )
        found["max_abs_logit_diff_vs_trimmed"] = diff
        return found

    export_merged(job.loaded, job.out / TRIMMED_DIR, out_dir, in_place=in_place, check=check)
    return {"path": str(out_dir), **found}


def _result(
    job: _Job, found: _Found, exported: _Exported, merged_info: dict[str, Any] | None
) -> dict[str, Any]:
    """trim.json's content."""
    cfg, sub = job.cfg, job.sub
    chosen_row = next(r for r in found.rows if r["k"] == found.chosen)
    prov = Provenance.make(
        stage="trim",
        model_id=job.loaded.model_id,
        model_hash=job.loaded.model_hash,
        tokenizer_hash=job.loaded.tokenizer_hash,
        task=sub.name,
        data_hash=sub.data_hash,
        config={
            **cfg.to_dict(),
            "adapter": str(job.adapter),
            "adapter_hash": job.adapter_hash,
            **running_on(job.loaded.model),
        },  # fmt: skip
        seed=cfg.seed,
        wall_time_s=job.timings["total_s"],
    )
    return {
        "kind": TRIM_KIND,
        "schema_version": SCHEMA_VERSION,
        "adapter": str(job.adapter),
        "adapter_format": job.kind,
        "metric": job.metric,
        "higher_is_better": job.higher,
        "tie_tolerance": cfg.tie_tolerance,
        "max_new_tokens": job.max_new,  # the generations' limit, as resolved (the format's by default)
        "metrics": job.names,
        "metric_scales": {m: METRICS[m].scale for m in job.names},
        "n_layers": found.n_layers,
        "adapted_layers": list(found.have),
        "candidates": dict(found.tr.candidates) if found.tr else None,
        "trace": str(job.out / TRACE_FILE) if found.tr else None,
        "ks": found.ks,
        "sweep": [{k: v for k, v in r.items() if k != "predictions"} for r in found.rows],
        "chosen_k": found.chosen,
        "chosen_by": found.chosen_by,
        # every K tied on the metric: the metric did not choose
        "metric_flat": metric_is_flat(found.rows, job.metric, tolerance=cfg.tie_tolerance),
        "before": found.before,
        "after": exported.after,
        # the exported adapter must measure what the masked sweep row measured
        "after_matches_sweep": _matches_sweep(exported.after_row, chosen_row),
        "adapted_modules_before": found.modules_before,
        "adapted_modules_after": found.modules_after,
        "export": exported.export,
        "merged": merged_info,
        "task": {**sub.describe(), "examples_in_split": len(job.task)},
        "timings": job.timings,
        "provenance": prov.to_dict(),
    }


def trim(
    loaded: LoadedModel,
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
    with the trimmed LoRA merged (see :func:`export_merged` for ``merge_in_place``). With the metric
    ``loss`` the sweep scores each K by teacher-forced loss only; the before/after rows still generate.
    """
    t_start = time.perf_counter()
    job = _job(loaded, adapter_dir, task, cfg, out_dir, export_merged_dir, progress)
    # An earlier trim.json and its figure would describe another adapter-trimmed/ beside this call's
    # trace should it be cut or fail before the end: gone before anything of this call is written.
    (job.out / TRIM_FILE).unlink(missing_ok=True)
    (job.out / TRIM_PNG).unlink(missing_ok=True)
    with attached(loaded.model, job.adapter, model_hash=loaded.model_hash, files=loaded.base_files) as model:
        found = _search(job, model)
    exported = _export_checked(job, found)
    merged_info = None
    if export_merged_dir is not None:
        merged_info = _merge_checked(job, exported, export_merged_dir, merge_in_place)
    job.timings["total_s"] = time.perf_counter() - t_start
    result = _result(job, found, exported, merged_info)
    plot_sweep(result, job.out / TRIM_PNG)
    write_json(job.out / TRIM_FILE, result)
    return result
