"""The adapter folder's README.md: what was trained, on what, and what the run measured.

PEFT's ``save_pretrained`` leaves a model card of empty placeholders; a trained adapter's folder instead
says what it holds and how to load it, from the run's own :class:`TrainMetrics` and plan. Pure text
functions: the caller writes the file.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layercard.cost import memory_kind_text
from layercard.plan.artifact import Plan
from layercard.progress import count
from layercard.train.metrics import TrainMetrics

README_FILE = "README.md"
MARKER = "layercard"  # a tag in the front matter: the README is layercard's, not a placeholder

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def layer_spans(layers: Sequence[int]) -> str:
    """Layers as runs: ``0–3, 7, 9–29``."""
    out: list[str] = []
    ordered = sorted(set(layers))
    start = prev = ordered[0] if ordered else None
    for layer in [*ordered[1:], None]:
        if layer is not None and prev is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            out.append(f"{start}–{prev}" if prev != start else f"{start}")
        start = prev = layer
    return ", ".join(out)


def front_matter(model_id: str, source: str, extra_tags: Sequence[str] = (), *, kind: str = "lora") -> str:
    """YAML front matter; ``base_model`` only where the model was named by a hub id and read from its
    snapshot (a local folder or a built-in name means nothing to a hub). A bottleneck adapter (``kind``
    houlsby or parallel) is layercard's own format, which PEFT cannot load: no peft library or lora tag."""
    own = ["library_name: peft", "tags:", "- lora"] if kind == "lora" else ["tags:", f"- {kind}"]
    lines = ["---", *own, f"- {MARKER}", *(f"- {t}" for t in extra_tags)]
    if _HUB_ID.fullmatch(model_id) and model_id.replace("/", "--") in source:
        lines.append(f"base_model: {model_id}")
    return "\n".join([*lines, "---", ""])


def _rank_text(ranks: Sequence[int]) -> str:
    counts = Counter(ranks)
    if len(counts) == 1:
        return f"rank {next(iter(counts))}"
    return "ranks " + ", ".join(f"{r} ({count(n, 'module')})" for r, n in sorted(counts.items()))


def _planned(plan: Plan) -> str:
    """The plan's LoRA placement in words: roles, layers, ranks, lora_alpha."""
    roles = list(dict.fromkeys(u.role for u in plan.units))
    layers = sorted({u.layer for u in plan.units})
    lora = plan.lora_config or {}
    alpha = lora.get("lora_alpha")
    alpha_text = ""
    if alpha is not None:
        alpha_text = f", lora_alpha {alpha}" + (
            " with a per-module alpha_pattern" if lora.get("alpha_pattern") else ""
        )
    return (
        f"{len(plan.units)} LoRA modules: {', '.join(roles)} of layers {layer_spans(layers)} "
        f"({len(layers)} layers), {_rank_text([u.rank for u in plan.units])}{alpha_text}"
    )


def _trained_lora(adapted: dict[str, Any], plan: Plan) -> str:
    """The LoRA modules as trained (``TrainMetrics.adapted``), in the words of :func:`_planned`."""
    ranks, alphas = adapted["ranks"], adapted.get("lora_alpha") or {}
    role = {u.name: u.role for u in plan.units}
    roles = list(dict.fromkeys(role[n] for n in ranks if n in role))
    layers = adapted["layers"]
    scales = {alphas[n] / r for n, r in ranks.items() if n in alphas and r}
    if len(set(alphas.values())) == 1:
        alpha_text = f", lora_alpha {next(iter(alphas.values())):g}"
    elif len(scales) == 1:
        alpha_text = f", lora_alpha {next(iter(scales)):g} × rank"
    else:
        alpha_text = ", lora_alpha per module" if alphas else ""
    return (
        f"{len(ranks)} LoRA modules: {', '.join(roles)} of layers {layer_spans(layers)} "
        f"({len(layers)} layers), {_rank_text(list(ranks.values()))}{alpha_text}"
    )


def _placement(plan: Plan, metrics: TrainMetrics | None = None) -> str:
    """The placement as trained, in words: roles, layers, ranks (or bottleneck width), and what the plan
    placed where the run trained something else (``--kind``, EVA's ranks)."""
    adapted = metrics.adapted if metrics is not None else None
    if adapted is None:  # metrics from before they recorded what was trained
        if plan.kind != "lora":
            return f"{plan.kind} bottleneck adapters on layers {layer_spans(plan.layers)}"
        return _planned(plan)
    kind = adapted["kind"]
    if kind != "lora":
        text = (
            f"{kind} bottleneck adapters of width {adapted['bottleneck']} on layers "
            f"{layer_spans(adapted['layers'])} ({len(adapted['layers'])} layers)"
        )
        return text + (f", on the layers the plan placed {plan.kind} on" if plan.kind != kind else "")
    text = _trained_lora(adapted, plan)
    eva = metrics.eva_ranks if metrics is not None else None
    if eva:
        dropped = sum(1 for r in eva.values() if not r)
        text += f"; EVA set these ranks from the plan's {_planned(plan)}" + (
            f" ({dropped} of its modules dropped at rank 0)" if dropped else ""
        )
    return text


def _num(x: float | None, fmt: str) -> str:
    return "not measured" if x is None else format(x, fmt)


def _predicted(measured: float | None, predicted: float | None, fmt: str, unit: str, what: str) -> str:
    text = f"{_num(measured, fmt)}{unit}" + (f", {what}" if measured is not None else "")
    if measured is not None and predicted is not None:
        text += f" (the plan predicted {format(predicted, fmt)}{unit})"
    return text


def _task_text(task: dict[str, Any] | None) -> str:
    if not task:
        return "none"
    split = task.get("split") or "all"
    return f"{task['name']} ({task['source']}, {split} split, {task['n_examples']} examples)"


def load_snippet(model_id: str, adapter_dir: str) -> str:
    """Python that loads the base and attaches this adapter (its folder by its whole path, so the lines
    run from anywhere)."""
    adapter_dir = str(Path(adapter_dir).resolve())
    return "\n".join(
        [
            "```python",
            "import layercard",
            "",
            f"base = layercard.load_model({model_id!r})",
            f"model = layercard.load_adapter(base.model, {adapter_dir!r})",
            "```",
        ]
    )


def adapter_readme(
    metrics: TrainMetrics, plan: Plan, base_source: str, description: str | None = None
) -> str:
    """README.md for a trained adapter folder, from the run's metrics and its plan.

    ``base_source``: the folder the base weights were read from; ``description``: a built-in model's
    description, if any.
    """
    m = metrics
    model_id, model_hash = str(m.model["id"]), str(m.model["hash"])
    cfg = m.config
    batch = f"{m.batch_size}" + (
        f" ({cfg['batch_size']} × {cfg['grad_accum']} accumulated)" if cfg.get("grad_accum", 1) > 1 else ""
    )
    schedule = f"lr {cfg['lr']:g} ({cfg['scheduler']}"
    schedule += f", {cfg['warmup_steps']} warm-up steps)" if cfg.get("warmup_steps") else ")"
    rows = [
        ("task", _task_text(m.task)),
        ("steps", f"{m.steps} of batch {batch}, {m.epochs:.2f} epochs, {schedule}, seed {cfg['seed']}"),
        ("trainable parameters", f"{m.trainable_params:,} of {m.total_params:,}"),
        (
            "train loss",
            f"{_num(m.first_train_loss, '.4f')} at the first step, "
            f"{_num(m.final_train_loss, '.4f')} at the last",
        ),
        (
            "held-out loss",
            f"{_num(m.final_val_loss, '.4f')} on {_task_text(m.val_task)}" if m.val_task else "not measured",
        ),
        *([("these weights", kept)] if (kept := m.kept_text()) else []),
        (
            "step time",
            _predicted(m.s_per_step, m.predicted_step_time_scaled_s, ".3f", " s", f"median on {m.device}"),
        ),
        (
            "peak memory",
            _predicted(
                m.peak_memory_mib,
                m.predicted_peak_memory_scaled_mib,
                ",.0f",
                " MiB",
                memory_kind_text(m.peak_memory_kind),
            ),
        ),
    ]
    if m.world_size > 1:
        rows.append(("processes", f"{m.world_size} data-parallel"))
    if m.predicted_quality is not None:
        rows.append(
            (
                "predicted quality",
                f"{m.predicted_quality:.2f} of the reference placement's loss drop (a prediction; "
                "`layercard eval` measures it)",
            )
        )
    base = f"`{model_id}`" + (f": {description}" if description else "")
    kind = m.adapter_kind
    lines = [
        front_matter(model_id, base_source, kind=kind),
        f"# LoRA adapter for {model_id}: {m.task['name']}"
        if kind == "lora"
        else f"# {kind.capitalize()} bottleneck adapter for {model_id}: {m.task['name']}",
        "",
        f"Trained by layercard from the plan `{plan.config.get('policy')}`"
        + (f" under the budget `{plan.config['budget']}`" if plan.config.get("budget") else "")
        + f". The placement: {_placement(plan, m)}.",
        "",
        "## Base model",
        "",
        f"{base}; weights sha256 `{model_hash}`, read from `{base_source}`. The adapter fits these weights:"
        " load the base the same way.",
        "",
        "## Training, as measured",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "The run's full record is `train_metrics.json` beside this folder.",
        "",
        "## Use",
        "",
        load_snippet(model_id, m.adapter_dir),
        "",
    ]
    return "\n".join(lines)


def _layers_word(layers: Sequence[int]) -> str:
    if not layers:
        return "no layer"
    return ("layer " if len(layers) == 1 else "layers ") + layer_spans(layers)


def is_layercard_readme(text: str) -> bool:
    """Whether a README's front matter carries layercard's tag (PEFT's placeholder card does not)."""
    if not text.startswith("---\n"):
        return False
    return f"\n- {MARKER}\n" in text.split("\n---\n", 1)[0] + "\n"


def _body(readme: str) -> str:
    """A README's text without its front matter, its headings one level down."""
    text = readme
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        text = text[end + 5 :] if end >= 0 else text
    text = text.split("\n## Use\n", 1)[0]  # the parent's own loading lines would load the parent
    return "\n".join("#" + line if line.startswith("#") else line for line in text.strip().splitlines())


def trimmed_readme(
    *,
    model_id: str,
    base_source: str,
    parent: str,
    parent_readme: str | None,
    keep_upto: int,
    kept_layers: Sequence[int],
    metric: str,
    before: dict[str, Any],
    after: dict[str, Any],
    examples: str,
    adapter_dir: str,
    kind: str | None = None,
) -> str:
    """README.md for a trimmed adapter: what was dropped, what the trim measured, how to load it, and the
    parent's own README (when layercard wrote it) below. ``kind``: the adapter's (lora, houlsby, parallel);
    by default read from the parent folder (a bottleneck adapter's holds layercard's adapter config)."""
    if kind is None:
        kind = _folder_kind(Path(parent))

    def value(row: dict[str, Any]) -> str:
        v = row["loss"] if metric == "loss" else row["metrics"].get(metric)
        return "not measured" if v is None else f"{v:.4f}" if metric == "loss" else f"{v:.3f}"

    lines = [
        front_matter(model_id, base_source, ["trimmed"], kind=kind),
        f"# Trimmed adapter for {model_id}",
        "",
        f"The adapter `{parent}` without its modules above decoder layer {keep_upto} (the boundary layer "
        f"layercard trim chose). It keeps the modules of {_layers_word(kept_layers)} ({len(kept_layers)} of "
        f"the {before['n_adapted_layers']} layers the adapter adapts); above them the base model runs "
        "unadapted.",
        "",
        f"| measured on {examples} | the adapter | trimmed |",
        "|---|---:|---:|",
        f"| {metric} | {value(before)} | {value(after)} |",
        f"| adapted layers | {before['n_adapted_layers']} | {after['n_adapted_layers']} |",
        f"| adapted modules | {before['adapted_modules']} | {after['adapted_modules']} |",
        f"| s/example, fastest of the repeats | {before['s_per_example']:.4f} "
        f"| {after['s_per_example']:.4f} |",
        *_tokens_row(before, after),
        "",
        "The boundary was chosen on these same examples, so the trimmed figure is the one the choice saw; "
        "`layercard eval --adapter` on this folder measures it on other examples. The trim's full record "
        "is `trim.json` beside this folder.",
        "",
        "## Use",
        "",
        load_snippet(model_id, adapter_dir),
        "",
    ]
    if parent_readme and is_layercard_readme(parent_readme):
        lines += [f"## The adapter it was trimmed from ({parent})", "", _body(parent_readme), ""]
    return "\n".join(lines)


def _folder_kind(folder: Path) -> str:
    """An adapter folder's kind: a bottleneck adapter's from its layercard config, else lora (PEFT's)."""
    import json

    from layercard.adapters import CONFIG_FILE

    if not (folder / CONFIG_FILE).is_file():
        return "lora"
    try:
        kind = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    return kind if isinstance(kind, str) and kind != "lora" else "bottleneck"


def _tokens_row(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The generated tokens per example behind the s/example row, where the trim's record has them."""
    nb, na = before.get("new_tokens_per_example"), after.get("new_tokens_per_example")
    return [] if nb is None or na is None else [f"| generated tokens/example | {nb:.1f} | {na:.1f} |"]
