"""A plan in the form each training tool reads: PEFT, TRL, axolotl and LLaMA-Factory.

:func:`export_plan` turns a LoRA plan into one text per tool:

============  =================================================================================
target        what is written
============  =================================================================================
peft          the plan's ``LoraConfig`` as adapter_config-style JSON, and a Python snippet that
              builds it and calls ``get_peft_model`` (exact: per-module ranks as ``rank_pattern``)
trl           a script fragment: that ``LoraConfig`` passed to TRL's ``SFTTrainer`` as
              ``peft_config``, with layercard's Trainer callback (exact)
axolotl       a YAML block: ``adapter``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
              ``lora_target_modules`` and ``peft_layers_to_transform``; per-module ranks as
              ``lora_rank_pattern`` and ``lora_alpha_pattern`` (exact)
llamafactory  a YAML block: ``finetuning_type``, ``lora_target``, ``lora_rank``, ``lora_alpha``,
              ``lora_dropout``
============  =================================================================================

What a tool cannot express is said in :attr:`Export.notes` and in the text itself (a YAML comment):
LLaMA-Factory takes one rank for every module, so per-module ranks (``rank: auto``) become the plan's
commonest rank there; both YAML tools take whole-number alphas, so a fractional one is rounded and said.
Layers are always exact: axolotl's ``peft_layers_to_transform``
takes any list of layers with the same modules in each (otherwise the modules are listed by full
path), and LLaMA-Factory, which has no layer setting for LoRA, gets the planned modules by full path
(PEFT matches a full path only to itself).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError
from layercard.plan import Plan

__all__ = ["TARGETS", "Export", "export_plan"]

TARGETS = ("peft", "trl", "axolotl", "llamafactory")
# Layer containers PEFT finds on its own; another one must be named for layers_to_transform.
_PEFT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


@dataclasses.dataclass(frozen=True)
class Export:
    """One export: the file's ``text`` (``filename`` is its usual name), what could not be expressed
    (``notes``) and, for PEFT, the Python ``snippet`` that builds the model from it."""

    target: str
    filename: str
    text: str
    notes: tuple[str, ...] = ()
    snippet: str | None = None

    @property
    def exact(self) -> bool:
        """Whether the tool trains exactly the planned modules at exactly the planned ranks."""
        return not self.notes


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The planned modules as layers × in-layer module paths, when they are such a product."""

    layers: list[int]
    suffixes: list[str]  # the module path inside a layer: self_attn.q_proj
    pattern: str  # the name of the layer container: layers
    product: bool  # every chosen layer adapts the same modules
    all_layers: bool  # every layer of the model is chosen


def _layout(plan: Plan) -> _Layout:
    cells: dict[tuple[int, str], None] = {}  # ordered: the plan's module order
    patterns = set()
    for u in plan.units:
        parts = u.name.split(".")
        idx = next((i for i in range(1, len(parts)) if parts[i] == str(u.layer)), None)
        if idx is None:
            raise LayercardError(f"plan: module {u.name!r} does not name its layer {u.layer}")
        patterns.add(".".join(parts[:idx]))
        cells[(u.layer, ".".join(parts[idx + 1 :]))] = None
    layers = sorted({layer for layer, _ in cells})
    suffixes = list(dict.fromkeys(s for _, s in cells))  # the plan's role order: q, k, v, o, ...
    product = len(patterns) == 1 and set(cells) == {(x, s) for x in layers for s in suffixes}
    container = next(iter(patterns)).rsplit(".", 1)[-1] if len(patterns) == 1 else ""
    n_layers = plan.card.get("n_layers")
    return _Layout(layers, suffixes, container, product, bool(n_layers) and len(layers) == n_layers)


def _lora(plan: Plan) -> dict[str, Any]:
    if plan.kind != "lora" or not plan.lora_config:
        raise LayercardError(
            f"plan: adapter kind {plan.kind!r} is not LoRA; PEFT, TRL, axolotl and LLaMA-Factory train LoRA "
            "(re-plan with --kind lora)"
        )
    plan.peft_config()  # a plan whose LoraConfig PEFT refuses is an error here, not in the user's tool
    return dict(plan.lora_config)


def _header(plan: Plan, source: str, target: str) -> list[str]:
    pred = plan.predicted
    return [
        f"layercard plan {source} exported for {target}",
        f"model {plan.card.get('model_id')} ({plan.card.get('n_layers')} layers), "
        f"task {plan.card.get('task')}, policy {plan.config.get('policy')}",
        f"layers {plan.layers}; {len({u.name for u in plan.units})} modules; "
        f"{pred.get('params')} trainable parameters planned",
    ]


def _rank_note(lora: dict[str, Any], target: str, key: str) -> list[str]:
    """The note for a tool with one rank for all modules, when the plan has several."""
    pattern = lora.get("rank_pattern") or {}
    if not pattern:
        return []
    ranks = Counter(pattern.values())
    others = ", ".join(f"{n} at rank {r}" for r, n in sorted(ranks.items()))
    return [
        f"{target} takes one rank for every module ({key}); the plan gives modules their own ranks "
        f"({others}, the rest at {lora['r']}): all train at rank {lora['r']} here, the plan's commonest (the "
        "largest where counts tie), "
        "so the trainable parameter count differs from the plan's. The PEFT, TRL and axolotl exports keep "
        "every rank."
    ]


def _py(value: Any, indent: int) -> str:
    """Python source of a JSON value: one list item or dict entry per line, strings in double quotes."""
    pad, end = " " * (indent + 4), " " * indent
    if isinstance(value, list) and value:
        return "[\n" + "".join(f"{pad}{_py(x, indent + 4)},\n" for x in value) + end + "]"
    if isinstance(value, dict) and value:
        items = "".join(f"{pad}{json.dumps(k)}: {_py(x, indent + 4)},\n" for k, x in value.items())
        return "{\n" + items + end + "}"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _lora_code(lora: dict[str, Any]) -> str:
    args = "".join(f"    {k}={_py(v, 4)},\n" for k, v in lora.items() if v not in ({}, None))
    return f"peft_config = LoraConfig(\n{args})\n"


def _comment(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _yaml(header: list[str], notes: list[str], body: dict[str, Any]) -> str:
    """The header and notes as comments, then one ``key: value`` line per setting (lists in flow style)."""
    import yaml

    def value(v: Any) -> str:
        text = yaml.safe_dump(v, default_flow_style=True, width=float("inf")).strip()
        return text.removesuffix("\n...").removesuffix("...").strip()

    lines = header + ([""] + [f"note: {n}" for n in notes] if notes else [])
    return _comment(lines) + "".join(f"{k}: {value(v)}\n" for k, v in body.items())


def _peft(plan: Plan, lora: dict[str, Any], source: str) -> Export:
    config = {"peft_type": "LORA", **lora}
    snippet = (
        _comment([*_header(plan, source, "PEFT"), "expects `model`: the plan's base model, loaded"])
        + "from peft import LoraConfig, get_peft_model\n\n"
        + _lora_code(lora)
        + "model = get_peft_model(model, peft_config)\n"
    )
    text = json.dumps(config, indent=2) + "\n"
    return Export("peft", "adapter_config.json", text, (), snippet)


def _trl(plan: Plan, lora: dict[str, Any], source: str) -> Export:
    out_dir = "trl-output"
    text = (
        _comment(
            [
                *_header(plan, source, "TRL's SFTTrainer"),
                "expects `model` (the plan's base model) and `train_dataset`; LayercardCallback records",
                f"step time, memory and loss against the plan in {out_dir}/train_metrics.json",
            ]
        )
        + "from peft import LoraConfig\n"
        + "from trl import SFTConfig, SFTTrainer\n\n"
        + "from layercard.integrations import LayercardCallback\n\n"
        + _lora_code(lora)
        + "trainer = SFTTrainer(\n"
        + "    model=model,\n"
        + f"    args=SFTConfig(output_dir={json.dumps(out_dir)}),\n"
        + "    train_dataset=train_dataset,\n"
        + "    peft_config=peft_config,\n"
        + f"    callbacks=[LayercardCallback({json.dumps(source)}, {json.dumps(out_dir)})],\n"
        + ")\n"
        + "trainer.train()\n"
    )
    return Export("trl", "train_trl.py", text)


def _whole(alpha: float) -> int:
    """An alpha as a YAML tool declares it: the nearest whole number, at least 1."""
    return max(1, round(alpha))


def _whole_alpha(lora: dict[str, Any], target: str, key: str) -> tuple[int, list[str]]:
    """The plan's alpha as the whole number ``target`` declares it, and a note where it was rounded."""
    alpha = lora["lora_alpha"]
    whole = _whole(alpha)
    if whole == alpha:
        return int(whole), []
    return whole, [
        f"{target} takes a whole-number {key}: the plan's {alpha:g} is written as {whole}, which scales "
        f"the adapter's update by {whole / lora['r']:g} instead of {alpha / lora['r']:g}"
    ]


def _axolotl(plan: Plan, lora: dict[str, Any], source: str) -> Export:
    lay = _layout(plan)
    alpha, notes = _whole_alpha(lora, "axolotl", "lora_alpha")
    body: dict[str, Any] = {
        "adapter": "lora",
        "lora_r": lora["r"],
        "lora_alpha": alpha,
        "lora_dropout": lora["lora_dropout"],
    }
    if lay.product:
        body["lora_target_modules"] = lay.suffixes
        if not lay.all_layers:
            body["peft_layers_to_transform"] = lay.layers
            if lay.pattern not in _PEFT_LAYER_PATTERNS:
                body["peft_layers_pattern"] = [lay.pattern]
    else:
        # chosen layers adapt different modules: only the full paths say which
        body["lora_target_modules"] = list(lora["target_modules"])
        notes.append(
            "the chosen layers adapt different modules, which lora_target_modules with "
            "peft_layers_to_transform cannot say: lora_target_modules lists every planned module by full path"
        )
    header = _header(plan, source, "axolotl")
    if lora.get("rank_pattern"):  # handed to PEFT's rank_pattern / alpha_pattern as they are
        body["lora_rank_pattern"] = dict(lora["rank_pattern"])
        alphas = {k: _whole(v) for k, v in (lora.get("alpha_pattern") or {}).items()}
        if any(alphas[k] != v for k, v in (lora.get("alpha_pattern") or {}).items()):
            notes.append("lora_alpha_pattern holds whole numbers in axolotl: the plan's were rounded")
        if alphas:
            body["lora_alpha_pattern"] = alphas
        header.append("per-module ranks: lora_rank_pattern and lora_alpha_pattern (axolotl 0.18 and later)")
    text = _yaml(header, notes, body)
    return Export("axolotl", "axolotl.yaml", text, tuple(notes))


def _llamafactory(plan: Plan, lora: dict[str, Any], source: str) -> Export:
    lay = _layout(plan)
    notes = _rank_note(lora, "LLaMA-Factory", "lora_rank")
    alpha, rounded = _whole_alpha(lora, "LLaMA-Factory", "lora_alpha")
    notes += rounded
    by_path = not (lay.product and lay.all_layers)
    modules = list(lora["target_modules"]) if by_path else lay.suffixes
    body = {
        "finetuning_type": "lora",
        "lora_target": ",".join(modules),
        "lora_rank": lora["r"],
        "lora_alpha": alpha,
        "lora_dropout": lora["lora_dropout"],
    }
    header = _header(plan, source, "LLaMA-Factory")
    if by_path:  # not a shortcoming: full paths select exactly the planned modules
        header.append("LoRA in LLaMA-Factory has no layer setting: lora_target names each planned module")
    return Export("llamafactory", "llamafactory.yaml", _yaml(header, notes, body), tuple(notes))


def export_plan(plan: Plan | str | Path, to: str) -> Export:
    """The plan (a :class:`Plan` or a plan.json path) exported for the tool ``to`` (see :data:`TARGETS`)."""
    if to not in TARGETS:
        raise LayercardError(f"--to {to!r}: not a target; valid: {', '.join(TARGETS)}")
    source = str(plan) if not isinstance(plan, Plan) else "plan.json"
    p = plan if isinstance(plan, Plan) else Plan.load(plan)
    lora = _lora(p)
    build = {"peft": _peft, "trl": _trl, "axolotl": _axolotl, "llamafactory": _llamafactory}[to]
    return build(p, lora, source)
