"""Reading a run folder: the artifacts the report uses, and one row per compared model.

Every stage artifact is read through its typed loader (``Card.load``, ``Plan.load``, ``EvalResult.load``,
``Trace.load``) and trim.json, which has none, through :func:`read_trim`; the run's own files (run.json,
stage records) are read as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from layercard.artifacts import content_hash, hash_file, hash_folder, read_json
from layercard.errors import LayercardError
from layercard.run_layout import BASE_EVAL, TRIMMED_EVAL, RunLayout

# One number format per quantity wherever results are shown (the report's tables and sentences, the demo's
# overview, `layercard run`'s comparison): losses and their drops, task metrics, seconds per training step.
LOSS, METRIC, STEP = ".4f", ".3f", ".3f"

if TYPE_CHECKING:
    from layercard.artifacts import Fields
    from layercard.train import TrainMetrics

__all__ = [
    "collect_results",
    "load_optional",
    "measured_leads_sentence",
    "eval_loss_sentence",
    "measured_step_text",
    "placement_names",
    "planning_sentence",
    "planning_share",
    "predicted_forward_s",
    "predicted_peak_mib",
    "predicted_s_per_step",
    "read_train_metrics",
    "read_trim",
    "report_inputs",
    "run_config",
    "stages_active",
    "trim_target",
]

T = TypeVar("T")


def load_optional(load: Callable[[Path], T], path: Path) -> T | None:
    """``load(path)`` when the artifact exists, else None: a stage that did not run leaves no artifact. A
    folder in its place is the loader's to refuse, not a stage that did not run."""
    return load(path) if path.exists() else None


def _maybe(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def read_train_metrics(path: Path) -> TrainMetrics:
    """A train_metrics.json, typed: the one place the report and the pipeline read training metrics."""
    from layercard.train import TrainMetrics

    return TrainMetrics.load(path)


def read_trim(path: Path) -> dict[str, Any]:
    """A trim.json, checked (:func:`check_trim`): the one place the report and the pipeline read it."""
    from layercard.trim.run import TRIM_KIND

    d = read_json(path, kind=TRIM_KIND)
    check_trim(d, str(path))
    return d


def check_trim(d: Mapping[str, Any], source: str) -> None:
    """Check a trim.json dict for what is read of it: the boundaries swept and chosen (layers of the model),
    the before, after and sweep rows, the data it was measured on."""
    from layercard.artifacts import Fields
    from layercard.train.metrics import check_task_record
    from layercard.trim.run import TRIM_FIELDS

    f = Fields(source)
    f.known(d, set(TRIM_FIELDS))
    f.mapping(f.get(d, "provenance"), "provenance")
    f.text(f.get(d, "adapter"), "adapter")
    f.text(f.get(d, "metric"), "metric")
    for i, name in enumerate(f.items(d.get("metrics", []), "metrics")):
        f.text(name, f"metrics[{i}]")
    n_layers = f.optional(d.get("n_layers"), "n_layers", lambda v, w: f.integer(v, w, minimum=1))

    def layer(value: Any, where: str) -> int:
        return f.integer(value, where, minimum=0, below=n_layers)

    ks = f.items(f.get(d, "ks"), "ks")
    for i, k in enumerate(ks):
        layer(k, f"ks[{i}]")
    chosen = layer(f.get(d, "chosen_k"), "chosen_k")
    if chosen not in ks:
        f.fail("chosen_k", f"must be one of the swept ks {ks}", chosen)
    for name, k in (f.optional(d.get("candidates"), "candidates", f.mapping) or {}).items():
        layer(k, f"candidates.{name}")
    f.optional(d.get("trace"), "trace", f.text)
    f.optional(d.get("max_new_tokens"), "max_new_tokens", lambda v, w: f.integer(v, w, minimum=1))
    chosen_by = f.optional(d.get("chosen_by"), "chosen_by", f.text)  # absent before it was recorded
    if chosen_by is not None and chosen_by not in (d["metric"], "loss"):
        f.fail("chosen_by", f"must be the metric {d['metric']!r} or 'loss'", chosen_by)
    for key in ("higher_is_better", "metric_flat", "after_matches_sweep"):
        f.optional(d.get(key), key, f.flag)
    check_task_record(f, f.get(d, "task"), "task")
    for key in ("before", "after"):
        _trim_row(f, f.get(d, key), key, layer, measured=True)
    if d["after"]["k"] != chosen:
        f.fail("after.k", f"must be the chosen K {chosen}", d["after"]["k"])
    for i, row in enumerate(f.items(f.get(d, "sweep"), "sweep")):
        _trim_row(f, row, f"sweep[{i}]", layer, measured=False)
    for key, x in (f.optional(d.get("timings"), "timings", f.mapping) or {}).items():
        f.number(x, f"timings.{key}", minimum=0)


def _trim_row(f: Fields, value: Any, where: str, layer: Callable[[Any, str], int], *, measured: bool) -> None:
    """A row of trim.json at one boundary K: the layers and modules kept, the scores and the latency (which
    the before and after rows always have, a sweep's row where it generated)."""
    from layercard.evaluate import check_metric_scores

    def amount(v: Any, w: str) -> float:
        return f.number(v, w, minimum=0)

    row = f.mapping(value, where)
    layer(f.get(row, "k", where), f"{where}.k")
    for i, x in enumerate(f.items(f.get(row, "adapted_layers", where), f"{where}.adapted_layers")):
        layer(x, f"{where}.adapted_layers[{i}]")
    for key in ("n_adapted_layers", "adapted_modules"):
        f.integer(f.get(row, key, where), f"{where}.{key}", minimum=0)
    check_metric_scores(
        f, f.get(row, "metrics", where) if measured else row.get("metrics", {}), f"{where}.metrics"
    )
    for key in ("loss", "new_tokens_per_example"):
        f.optional(row.get(key), f"{where}.{key}", amount)
    if measured:
        amount(f.get(row, "s_per_example", where), f"{where}.s_per_example")
    else:
        f.optional(row.get("s_per_example"), f"{where}.s_per_example", amount)
    f.optional(row.get("s_per_example_samples"), f"{where}.s_per_example_samples",
               lambda v, w: f.numbers(v, w, minimum=0))  # fmt: skip


def predicted_s_per_step(m: TrainMetrics) -> float | None:
    """The cost model's s/step for a training run: rescaled to its tokens per step when it could be."""
    return m.predicted_step_time_scaled_s or m.predicted_step_time_s


def predicted_peak_mib(m: TrainMetrics) -> float | None:
    """The plan's peak memory for a training run: rescaled to its positions per step when it could be."""
    return m.predicted_peak_memory_scaled_mib or m.predicted_peak_memory_mib


def memory_figure_note(figure: str | None) -> str:
    """What priced a run's peak, where it is not the figure a plan prints: a run in a process that ran no
    calibration is priced by the calibration placements' first steps (design §5, "Where a run trains")."""
    return " (the first steps' figure: no calibration in this process)" if figure == "first_step" else ""


def measured_step_text(s_per_step: float | None, spread: dict[str, float] | None) -> str:
    """A run's median s/step with its steps' 10th–90th percentile, "0.740 (0.695–0.758)"; the median
    alone for metrics written before the spread was recorded, and where it is one timed step ("0.740,
    one step"), "—" without a median."""
    if s_per_step is None:
        return "—"
    if not spread:
        return format(s_per_step, STEP)
    if spread.get("steps", 2) < 2:
        return f"{s_per_step:{STEP}}, one step"
    return f"{s_per_step:{STEP}} ({spread['p10']:{STEP}}–{spread['p90']:{STEP}})"


def predicted_forward_s(m: TrainMetrics) -> float | None:
    """The plan's unmerged forward time at the positions the run timed it on, else as planned."""
    return m.predicted_forward_scaled_s or m.predicted_forward_s


def planning_share(
    card_s: float, train_s: float, s_per_step: float | None, share: float = 0.10
) -> tuple[float, int | None]:
    """The card's wall time as a fraction of one training run's, and the fewest training steps (at that
    run's s/step) for which the card would be at most ``share`` of the run; None without a step time."""
    if not (math.isfinite(card_s) and math.isfinite(train_s)) or card_s < 0 or train_s <= 0:
        raise ValueError(f"planning share: card {card_s} s, training {train_s} s")
    steps = None
    if s_per_step is not None and math.isfinite(s_per_step) and s_per_step > 0:
        steps = math.ceil(card_s / (share * s_per_step))
    return card_s / train_s, steps


def planning_sentence(card: Any, metrics: Mapping[str, TrainMetrics], guided: str | None) -> str | None:
    """One sentence: the card's wall time against the training it guided (``guided``'s when it trained,
    else the first placement's), and the run length at which the card is a tenth of it."""
    total = (card.timings or {}).get("total_s")
    if total is None or not metrics:
        return None
    name = guided if guided in metrics else next(iter(metrics))
    m = metrics[name]
    frac, steps = planning_share(float(total), m.wall_time_s, m.s_per_step)
    text = (
        f"Planning cost: the card (probe pass, statistics and, when asked, cost calibration) took "
        f"{total:.0f} s, {100 * frac:.0f}% of the {m.wall_time_s:.0f} s that training {name} took "
        f"({m.steps} steps)."
    )
    if steps is not None:
        text += (
            f" At {name}'s {m.s_per_step:{STEP}} s/step, the card costs 10% or less of any run of {steps:,} "
            "steps or more."
        )
    return text


def _run_json(root: Path) -> dict[str, Any] | None:
    """run.json, checked for what the report reads of it: a config with named placements."""
    path = RunLayout(root).run_json
    run = _maybe(path)
    if run is None:
        return None
    cfg = run.get("config") if isinstance(run, dict) else None
    places = cfg.get("placements") if isinstance(cfg, dict) else None
    if not isinstance(places, list) or not all(isinstance(p, dict) and "name" in p for p in places):
        raise LayercardError(f"{path}: not a run record (config.placements: a list of named placements)")
    for i, p in enumerate(places):  # each names folders the report reads: none may lead out of the run
        _placement_name(p["name"], f"{path}: config.placements[{i}].name")
    if not isinstance(run.get("inputs", {}), dict):
        raise LayercardError(f"{path}: inputs: not a mapping")
    return run


def placement_names(root: Path) -> list[str]:
    """Placements in config order (run.json), else every plan folder in name order."""
    lay = RunLayout(root)
    run = _run_json(root)
    if run is not None:
        return [p["name"] for p in run["config"]["placements"]]
    plans = lay.plans_dir
    return (
        sorted(p.name for p in plans.iterdir() if lay.plan_json(p.name).is_file()) if plans.is_dir() else []
    )


def run_inputs(root: Path) -> dict[str, Any]:
    """The hashes of the model and tasks the run read when it last ran (run.json), if it recorded them."""
    run = _run_json(root)
    return dict(run.get("inputs") or {}) if run is not None else {}


def run_config(root: Path) -> dict[str, Any] | None:
    """The resolved config the run recorded in run.json, if any."""
    run = _run_json(root)
    return run["config"] if run is not None else None


def stages_active(root: Path) -> tuple[bool, bool]:
    """(trim, base eval) as the run's config has them: a stage switched off may have left an old folder."""
    cfg = run_config(root)
    if cfg is None:
        return True, True
    return bool(cfg.get("trim", {}).get("enabled", True)), bool(cfg.get("eval", {}).get("base", True))


def trim_target(root: Path, trim: dict[str, Any]) -> str:
    """The placement the trim stage trimmed (its record says; else the adapter path does)."""
    record = RunLayout.stage_record(RunLayout(root).trim_dir)
    rec = _maybe(record)
    if rec is not None and rec.get("config", {}).get("placement"):
        return _placement_name(rec["config"]["placement"], f"{record}: config.placement")
    # .../train/<placement>/adapter
    return _placement_name(Path(trim["adapter"]).parent.name, "trim.json: adapter's placement")


def _placement_name(name: Any, where: str) -> str:
    """``name`` where it is one a run gives a placement (a plain folder name), else an error at ``where``."""
    from layercard.config.run import NAME_RE

    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LayercardError(f"{where}: {name!r} is not a placement name (letters, digits, '_', '.', '-')")
    return name


def report_inputs(root: str | Path) -> list[Path]:
    """Every artifact file the report reads (their hashes fingerprint the report stage)."""
    root = Path(root)
    lay = RunLayout(root)
    names = placement_names(root)
    trim_on, base_on = stages_active(root)
    cands = [lay.run_json, lay.card_json]
    cands += [lay.plan_json(n) for n in names] + [lay.train_metrics(n) for n in names]
    cands += [lay.eval_json(n) for n in names]
    if trim_on:
        cands += [lay.trim_json, lay.trace_json, lay.eval_json(TRIMMED_EVAL)]
    if base_on:
        cands.append(lay.eval_json(BASE_EVAL))
    return [p for p in cands if p.is_file()]


def _safetensors_params(folder: Path) -> int | None:
    """Parameter count of an adapter folder's safetensors files (read from the headers only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def _primary(ev: Any) -> tuple[str | None, float | None]:
    if ev is None or not ev.metrics:
        return None, None
    name = next(iter(ev.metrics))
    return name, ev.metrics[name]


class _Rows:
    """The rows of :func:`collect_results`; the primary metric is the first evaluation's first metric."""

    def __init__(self, base_ev: Any, now: Mapping[str, Any], root: Path) -> None:
        self.root = root
        self.base_loss = base_ev.loss if base_ev is not None else None
        self.primary = _primary(base_ev)[0]
        self.now = now  # the run's input hashes (run.json), which each stage record must name
        self.rows: list[dict[str, Any]] = []
        # stages whose artifacts are left out: they failed, or were made from inputs the run has since
        # replaced (a placement planned again under --until plan, say)
        self.left_out: list[str] = []
        # stages whose last attempt failed, leaving no artifact (each with its error)
        self.failed: dict[str, str] = {}
        # per compared model: its examples' summed losses and the hash of the examples they are of
        self.example_losses: dict[str, tuple[list[float], Any]] = {}
        self._hashes: dict[Path, str] = {}

    def content_hash(self, path: Path) -> str:
        """:func:`content_hash` of ``path``, read once per report: every placement's plan was made from the
        one card, whose file runs to megabytes."""
        if path not in self._hashes:
            self._hashes[path] = content_hash(path)
        return self._hashes[path]

    def inputs(self, **keys: str) -> dict[str, Callable[[], Any]]:
        """The :func:`fresh` checks of a stage record's inputs ``keys`` (record key -> run.json key)
        against the run's, for those the run recorded."""
        return {k: (lambda v=self.now[n]: v) for k, n in keys.items() if n in self.now}

    def model_inputs(self, **keys: str) -> dict[str, Callable[[], Any]]:
        """:meth:`inputs` of a stage that runs the model: its weights, its tokenizer's files and the dtype
        and device type it ran at, besides ``keys``."""
        return self.inputs(model="model", tokenizer="tokenizer", dtype="dtype", device="device", **keys)

    def keep_examples(self, name: str, ev: Any) -> None:
        if ev is not None and ev.example_loss_sums is not None:
            self.example_losses[name] = (ev.example_loss_sums, (ev.provenance or {}).get("data_hash"))

    def _same_examples(self, names: list[str | None]) -> list[list[float]] | None:
        got = [self.example_losses.get(n) if n is not None else None for n in names]
        if any(g is None for g in got) or len({g[1] for g in got if g}) != 1:
            return None
        return [g[0] for g in got if g]

    def fraction_se(self, name: str, reference: str | None) -> float | None:
        """The sampling error of ``name``'s measured fraction, where the base, the reference and it were
        evaluated per example on the same examples."""
        from layercard.evaluate import fraction_standard_error

        got = self._same_examples([BASE_EVAL, reference, name])
        return None if name == reference or got is None else fraction_standard_error(*got)

    def difference_se(self, a: str, b: str, reference: str | None) -> float | None:
        """The paired sampling error of ``a``'s measured fraction minus ``b``'s (same examples)."""
        from layercard.evaluate import difference_standard_error

        got = self._same_examples([BASE_EVAL, reference, a, b])
        return None if got is None else difference_standard_error(*got)

    def eval_fields(self, ev: Any) -> dict[str, Any]:
        if ev is None:
            return {"eval_loss": None, "metrics": {}, "primary_value": None, "s_per_example": None,
                    "new_tokens_per_example": None, "eval_examples": None, "eval_data": None}  # fmt: skip
        name, value = _primary(ev)
        self.primary = self.primary or name
        loss, base = ev.loss, self.base_loss
        new = ev.timing.get("new_tokens")
        return {
            "eval_loss": loss,
            "measured_gain": (base - loss) if base is not None and loss is not None else None,
            "metrics": ev.metrics,
            "primary_value": ev.metrics.get(self.primary) if self.primary else value,
            "s_per_example": ev.timing.get("s_per_example"),
            # what the generation's s/example bought: a model that generates more tokens takes longer
            "new_tokens_per_example": new / ev.n if new is not None and ev.n else None,
            "eval_examples": ev.n,
            # which data it was measured on, as the report's provenance names it
            "eval_data": {k: ev.task.get(k) for k in ("name", "split", "n_examples", "data_hash")},
        }


def fresh(
    rec: Mapping[str, Any] | None, settings: Mapping[str, Any] | None = None, **inputs: Callable[[], str]
) -> bool:
    """Whether the stage whose record ``rec`` is finished, from the inputs the run has now (each given as
    the function that hashes it) and with the ``settings`` the run's config gives it now (a setting the
    config leaves to the run, null there, is not compared). A folder without a record (None) counts as
    fresh."""
    if rec is None:
        return True
    if rec.get("status") != "done":
        return False
    had = rec.get("inputs") or {}
    used = rec.get("config") or {}
    if any(v is not None and k in used and used[k] != v for k, v in (settings or {}).items()):
        return False
    return all(key not in had or had[key] == now() for key, now in inputs.items())


def _kept(
    rows: _Rows,
    stage: str,
    artifact: Path,
    settings: Mapping[str, Any] | None = None,
    *,
    upstream: bool = True,
    **inputs: Callable[[], str],
) -> bool:
    """Whether ``artifact`` is there, what it was made from is kept (``upstream``) and the stage that owns
    its folder is :func:`fresh`; one that is there but not kept is noted as left out."""
    rec = _maybe(RunLayout.stage_record(artifact.parent))
    if not artifact.exists():
        if rec is not None and rec.get("status") == "failed":
            rows.failed[stage] = str(rec.get("error") or "")
        return False
    if upstream and fresh(rec, settings, **inputs) and _as_recorded(rec, artifact, rows.root):
        return True
    rows.left_out.append(stage)
    return False


def _as_recorded(rec: Mapping[str, Any] | None, artifact: Path, root: Path) -> bool:
    """Whether ``artifact`` holds what its stage wrote, by the hash the stage's record ``rec`` keeps: a
    command run into the run's folder since (an eval of another adapter, say) wrote another run's figures
    there. Records of an older layercard keep no hashes. One that is not as recorded is still read, so
    that a damaged file is refused in one line as anywhere else, rather than passed over."""
    hashes = (rec or {}).get("output_hashes")
    key = str(artifact.relative_to(root))
    if not isinstance(hashes, dict) or key not in hashes:
        return True
    if artifact.is_file() and hashes[key] == hash_file(artifact):
        return True
    _read_artifact(artifact)
    return False


def _read_artifact(path: Path) -> Any:
    """``path`` read by the loader of its kind (each checks its fields), by file name."""
    from layercard.card import Card
    from layercard.evaluate import EvalResult
    from layercard.plan import Plan

    loaders: dict[str, Callable[[Path], Any]] = {
        "card.json": Card.load, "plan.json": Plan.load, "train_metrics.json": read_train_metrics,
        "eval.json": EvalResult.load, "trim.json": read_trim,
    }  # fmt: skip
    return loaders.get(path.name, read_json)(path)


def _placement_row(
    rows: _Rows, lay: RunLayout, name: str, cfg: Mapping[str, Any], card_ok: bool
) -> dict[str, Any]:
    from layercard.cost import peak_of
    from layercard.evaluate import EvalResult
    from layercard.plan import Plan

    plan_file, metrics_file, eval_file = lay.plan_json(name), lay.train_metrics(name), lay.eval_json(name)
    adapter = lay.adapter_dir(name)
    plan_ok = _kept(
        rows,
        f"plan:{name}",
        plan_file,
        upstream=card_ok,
        card=lambda: rows.content_hash(lay.card_json) if lay.card_json.is_file() else None,
        **rows.inputs(train_data="train_data"),
    )
    train_ok = _kept(
        rows,
        f"train:{name}",
        metrics_file,
        cfg.get("train"),
        upstream=plan_ok,
        plan=lambda: content_hash(plan_file),
        **rows.model_inputs(train_data="train_data", val_data="val_data"),
    )
    eval_ok = _kept(
        rows,
        f"eval:{name}",
        eval_file,
        cfg.get("eval"),
        upstream=train_ok,
        adapter=lambda: hash_folder(adapter),
        **rows.model_inputs(data="eval_data"),
    )
    plan = load_optional(Plan.load, plan_file) if plan_ok else None
    tm = load_optional(read_train_metrics, metrics_file) if train_ok else None
    ev = load_optional(EvalResult.load, eval_file) if eval_ok else None
    rows.keep_examples(name, ev)
    pr = plan.predicted if plan else {}
    return {
        "name": name,
        "kind": "placement",
        "policy": plan.config["policy"] if plan else None,
        "layers": plan.layers if plan else [],
        "modules": pr.get("modules"),
        "trainable_params": tm.trainable_params if tm else pr.get("params"),
        "predicted_gain": pr.get("gain"),
        "predicted_fraction": pr.get("fraction"),
        # search plans: the quality model's fraction of the reference's loss drop
        "predicted_quality": (pr.get("quality") or {}).get("fraction"),
        "predicted_s_per_step": pr.get("step_time_s"),
        # by the memory figure the plan priced its peak by
        "predicted_peak_memory_mib": peak_of(pr.get("memory"), pr.get("memory_figure")),
        "s_per_step": tm.s_per_step if tm else None,
        "peak_memory_mib": tm.peak_memory_mib if tm else None,
        "peak_memory_kind": tm.peak_memory_kind if tm else None,
        "steps": tm.steps if tm else None,
        "final_train_loss": tm.final_train_loss if tm else None,
        "final_val_loss": tm.final_val_loss if tm else None,
        **rows.eval_fields(ev),
    }


def _trimmed_row(
    rows: _Rows, lay: RunLayout, trim: dict[str, Any], cfg: Mapping[str, Any]
) -> dict[str, Any] | None:
    from layercard.evaluate import EvalResult

    target = trim_target(lay.root, trim)
    parent = next((r for r in rows.rows if r["name"] == target), {})
    parent_adapter = lay.adapter_dir(target)
    trim_ok = _kept(
        rows,
        "trim",
        lay.trim_json,
        cfg.get("trim"),
        upstream=parent.get("s_per_step") is not None,  # its parent's training is the run's now
        adapter=lambda: hash_folder(parent_adapter),
        **rows.model_inputs(data="trim_data"),
    )
    eval_file = lay.eval_json(TRIMMED_EVAL)
    eval_ok = _kept(
        rows,
        f"eval:{TRIMMED_EVAL}",
        eval_file,
        cfg.get("eval"),
        upstream=trim_ok,
        adapter=lambda: hash_folder(lay.trimmed_adapter),
        **rows.model_inputs(data="eval_data"),
    )
    if not trim_ok:
        return None
    after = trim["after"]
    ev = load_optional(EvalResult.load, eval_file) if eval_ok else None
    rows.keep_examples(f"{target}-trimmed", ev)
    return {
        "name": f"{target}-trimmed",
        "kind": "trimmed",
        "parent": target,
        "chosen_k": trim["chosen_k"],
        "layers": after["adapted_layers"],
        "modules": after["adapted_modules"],
        "trainable_params": _safetensors_params(lay.trimmed_adapter),
        # trained as its parent: the training cost is the parent's
        "s_per_step": parent.get("s_per_step"),
        "peak_memory_mib": parent.get("peak_memory_mib"),
        "peak_memory_kind": parent.get("peak_memory_kind"),
        **rows.eval_fields(ev),
    }


def collect_results(root: str | Path) -> dict[str, Any]:
    """One row per compared model (base, each placement, the trimmed adapter) from the artifacts.

    ``measured_gain`` is the base eval loss minus the row's eval loss (the loss drop the adapter bought);
    ``predicted_gain`` is the plan's set gain in the card score's units (a ranking, not a loss);
    ``measured_fraction`` is ``measured_gain`` over the reference placement's, and ``measured_fraction_se``
    its sampling error over the evaluated examples (:func:`layercard.evaluate.fraction_standard_error`);
    ``measured_lead_of_recommend`` the recommended placement's measured fraction minus the row's, with
    ``measured_lead_se`` its paired sampling error.
    """
    from layercard.evaluate import EvalResult

    root = Path(root)
    lay = RunLayout(root)
    trim_on, base_on = stages_active(root)
    cfg = run_config(root) or {}  # the settings each stage's artifacts must have been made under
    now = run_inputs(root)
    probe = _Rows(None, now, root)  # the base row's checks, before the rows exist
    base_ok = base_on and _kept(
        probe, f"eval:{BASE_EVAL}", lay.eval_json(BASE_EVAL), cfg.get("eval"),
        **probe.model_inputs(data="eval_data"),
    )  # fmt: skip
    base_ev = load_optional(EvalResult.load, lay.eval_json(BASE_EVAL)) if base_ok else None
    rows = _Rows(base_ev, now, root)
    rows.left_out += probe.left_out
    rows.failed |= probe.failed
    card_ok = _kept(rows, "card", lay.card_json, **rows.model_inputs(data="train_data"))
    rows.keep_examples(BASE_EVAL, base_ev)
    if base_ev is not None:
        base = {"name": BASE_EVAL, "kind": "base", "layers": [], "modules": 0, "trainable_params": 0}
        rows.rows.append({**base, **rows.eval_fields(base_ev), "measured_gain": 0.0})
    for name in placement_names(root):
        rows.rows.append(_placement_row(rows, lay, name, cfg, card_ok or not lay.card_json.exists()))
    trim = load_optional(read_trim, lay.trim_json) if trim_on else None
    if trim_on and trim is None:
        _kept(rows, "trim", lay.trim_json)  # no trim.json: a failed trim's record says why
    trimmed = _trimmed_row(rows, lay, trim, cfg) if trim is not None else None
    if trimmed is not None:
        rows.rows.append(trimmed)
    for r in rows.rows:
        r.setdefault("measured_gain", None)
    ref = reference_placement(lay, placement_names(root))
    ref_gain = next((r["measured_gain"] for r in rows.rows if r["name"] == ref), None)
    for r in rows.rows:
        r["is_reference"] = r["name"] == ref
        gain = r.get("measured_gain")
        ok = r["kind"] != "base" and ref_gain is not None and ref_gain > 0 and gain is not None
        r["measured_fraction"] = gain / ref_gain if ok else None
        r["measured_fraction_se"] = rows.fraction_se(r["name"], ref) if ok else None
    _leads(rows, ref)
    return {
        "primary_metric": rows.primary,
        "base_loss": rows.base_loss,
        "reference": ref,
        "rows": rows.rows,
        "left_out": rows.left_out,
        "failed": rows.failed,
    }


def _leads(rows: _Rows, ref: str | None) -> None:
    """Each other placement's row gets the recommended placement's measured fraction minus its own, with
    the paired sampling error of that difference (``measured_lead_of_recommend``, ``measured_lead_se``)."""
    rec = next((r for r in rows.rows if r.get("policy") == "recommend"), None)
    for r in rows.rows:
        r["measured_lead_of_recommend"] = r["measured_lead_se"] = None
        if rec is None or r is rec or r["kind"] != "placement" or r["name"] == ref:
            continue
        if rec.get("measured_fraction") is None or r.get("measured_fraction") is None:
            continue
        r["measured_lead_of_recommend"] = rec["measured_fraction"] - r["measured_fraction"]
        r["measured_lead_se"] = rows.difference_se(rec["name"], r["name"], ref)


def measured_leads_sentence(rows: list[dict[str, Any]]) -> str | None:
    """One sentence: the recommended placement's measured fraction against every other trained
    placement's, each difference with its paired sampling error; None where none was measured."""
    rec = next((r for r in rows if r.get("policy") == "recommend"), None)
    parts = []
    for r in rows:
        lead, se = r.get("measured_lead_of_recommend"), r.get("measured_lead_se")
        if lead is None or rec is None:
            continue
        err = "" if se is None else f" ± {se:.3f}"
        if lead == 0:  # the same loss on every example: a tie, not a lead (the same placement, often)
            parts.append(f"equal to {r['name']}'s")
            continue
        where = "above" if lead > 0 else "below"
        parts.append(f"{abs(lead):.3f}{err} {where} {r['name']}'s")
    if not parts or rec is None:
        return None
    n = rec.get("eval_examples")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    examples = f"the {n} evaluated examples" if n else "the evaluated examples"
    return (
        f"Measured on {examples}, one training run each: {rec['name']}'s "
        f"fraction of the reference's drop was {listed} (± the paired sampling error over those examples, "
        "one standard error; it does not cover the training seed)."
    )


def eval_loss_sentence(rows: list[dict[str, Any]]) -> str | None:
    """Where :func:`measured_leads_sentence` has nothing (no reference drop to scale by, or no rule measured
    beside the recommendation), one sentence setting the recommended placement's eval loss against every
    other trained placement's, after its measured fraction where the reference's drop gives one."""
    rec = next((r for r in rows if r.get("policy") == "recommend" and r.get("eval_loss") is not None), None)
    others = [
        r for r in rows
        if r["kind"] == "placement" and r is not rec and r.get("eval_loss") is not None
    ]  # fmt: skip
    if rec is None or not others:
        return None
    lower = [r["name"] for r in others if r["eval_loss"] < rec["eval_loss"]]
    level = [r["name"] for r in others if r["eval_loss"] == rec["eval_loss"]]
    listed = ", ".join(f"{r['name']}'s {r['eval_loss']:.4f}" for r in others)
    n = rec.get("eval_examples")
    if lower:
        verdict = f"{' and '.join(lower)} measured lower than the recommendation"
    elif level:
        verdict = f"the recommendation measured lowest, level with {' and '.join(level)}"
    else:
        verdict = "the recommendation measured lowest"
    losses = (
        f"{rec['name']}'s eval loss was {rec['eval_loss']:.4f} against {listed} (lower is better; "
        f"{n or 'the'} evaluated examples, one training run each): {verdict}."
    )
    ref = next((r for r in rows if r.get("kind") == "placement" and r.get("is_reference")), None)
    gain = None if ref is None else ref.get("measured_gain")
    if ref is None or gain is None:
        return f"Measured without a reference to scale the drops: {losses}"
    if gain <= 0:
        return (
            f"Measured without a drop to scale by (the reference, {ref['name']}, changed the base's eval "
            f"loss by {-gain:+.4f}): {losses}"
        )
    if rec.get("measured_fraction") is None:
        return f"Measured: {losses}"
    # the reference's drop scales the measured ones: only a rule to set the recommendation against is
    # missing (the reference is the scale, not a rival)
    rules = [r for r in others if not r.get("is_reference") and r.get("measured_fraction") is not None]
    against = (
        " against " + ", ".join(f"{r['name']}'s {_with_se(r)}" for r in rules)
        if rules
        else ", with no rule to compare it with"
    )
    fraction = f"{rec['name']}'s fraction of the reference's drop was {_with_se(rec)}{against}"
    return f"Measured: {fraction}; {losses}"


def _with_se(row: dict[str, Any]) -> str:
    """A row's measured fraction with its sampling error, as the report's tables give it: "0.39 ± 0.02"."""
    se = row.get("measured_fraction_se")
    return f"{row['measured_fraction']:.2f}" + ("" if se is None else f" ± {se:.2f}")


def reference_placement(lay: RunLayout, names: list[str]) -> str | None:
    """The placement that is the quality model's reference (LoRA on every linear role of every layer at
    the reference rank, with the default alpha and dropout), whose loss drop measured fractions are of;
    None if the run trained none."""
    import dataclasses

    from layercard.config.plan import PlanConfig
    from layercard.plan import Plan
    from layercard.plan.frontier import MATRICES
    from layercard.plan.quality import REFERENCE_RANK

    default = {f.name: f.default for f in dataclasses.fields(PlanConfig)}
    for name in names:
        plan = load_optional(Plan.load, lay.plan_json(name))
        if plan is None or not plan.units:
            continue
        n_layers = plan.card.get("n_layers")
        alpha = plan.config.get("alpha")
        if (
            plan.kind == default["kind"]
            and alpha in (default["alpha"], 2.0 * REFERENCE_RANK)  # null: 2·rank, the same alpha
            and plan.config.get("dropout", default["dropout"]) == default["dropout"]
            and {u.role for u in plan.units} == set(MATRICES["all-linear"])
            and plan.layers == list(range(int(n_layers or -1)))
            and {u.rank for u in plan.units} == {REFERENCE_RANK}
            and len(plan.units) == len(MATRICES["all-linear"]) * len(plan.layers)
        ):
            return name
    return None
