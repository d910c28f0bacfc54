"""A plan in the form each training tool reads: PEFT, TRL, axolotl and LLaMA-Factory.

:func:`export_plan` turns a LoRA plan into one text per tool:

============  =================================================================================
target        what is written
============  =================================================================================
peft          the plan's ``LoraConfig`` as adapter_config-style JSON, and a Python snippet that
              builds it and calls ``get_peft_model`` (exact: per-module ranks as ``rank_pattern``)
trl           a script fragment: that ``LoraConfig`` passed to TRL's ``SFTTrainer`` as
              ``peft_config``, with layercard's Trainer callback reading the plan file by its
              absolute path (exact), and an ``SFTConfig`` without gradient checkpointing (the
              plan's prices assume none) that logs every step's loss
axolotl       a YAML block: ``adapter``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
              ``lora_target_modules``, and where needed ``peft_layers_to_transform`` and
              ``peft_layers_pattern``; per-module ranks as ``lora_rank_pattern`` and
              ``lora_alpha_pattern`` (exact); ``lora_fan_in_fan_out`` for Conv1D modules (GPT-2)
llamafactory  a YAML block: ``finetuning_type``, ``lora_target``, ``lora_rank``, ``lora_alpha``,
              ``lora_dropout``
============  =================================================================================

What a tool cannot express is said in :attr:`Export.notes` and in the text itself (a YAML comment):
LLaMA-Factory takes one rank for every module, so per-module ranks (``rank: auto``) become the plan's
commonest rank there; both YAML tools take whole-number alphas, so a fractional one is rounded and said.

Layers are always exact. PEFT matches a short module name (``self_attn.q_proj``) in every layer list
of the model, so the short form is written only where the plan's layers are the model's top-level
stack (``model.layers``, ``transformer.h``). A stack nested deeper, such as a multimodal model's
``model.language_model.layers`` beside its vision tower's ``layers``, is named in the layer pattern.
The export reads the plan only, not the model: that no other layer list of a model whose layers are its
top-level stack holds modules of the same names is assumed. axolotl gets:

- every layer planned, same modules in each, top-level stack: the short names, no layer list;
- some layers, same modules in each: the short names with ``peft_layers_to_transform``, and
  ``peft_layers_pattern`` (the stack's path below its root module) for a nested stack, which then
  always lists the layers (PEFT reads the pattern only with a layer list);
- layers adapting different modules: every planned module by full path (and a note).

LLaMA-Factory, which has no layer setting for LoRA, gets the short names where every layer of a
top-level stack is planned with the same modules, and every planned module by full path otherwise
(PEFT matches a full path only to itself). Each short form is checked against the module names it
could reach in the plan's stack, under PEFT's layer-index rules; one that would select anything but
the planned modules is replaced by full paths.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError
from layercard.plan import Plan
from layercard.progress import layers_text

__all__ = ["FILENAMES", "TARGETS", "Export", "export_plan"]

TARGETS = ("peft", "trl", "axolotl", "llamafactory")
# The usual name of each target's file (its suffix says its format).
FILENAMES = {
    "peft": "adapter_config.json",
    "trl": "train_trl.py",
    "axolotl": "axolotl.yaml",
    "llamafactory": "llamafactory.yaml",
}
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
    container: str  # the layer list's path: model.layers ("" when the units name several)
    product: bool  # every chosen layer adapts the same modules
    all_layers: bool  # every layer of the model is chosen
    n_layers: int | None  # the model's layer count, as the plan's card recorded it

    @property
    def pattern(self) -> str | None:
        """PEFT's ``layers_pattern`` for the layer list: its path below the root module
        (``language_model.layers``), which PEFT finds after a dot; None for a list at the root."""
        return self.container.partition(".")[2] or None

    @property
    def top_level(self) -> bool:
        """Whether the layer list is the model's top-level stack under a name PEFT finds by itself, so the
        short module names need no pattern."""
        return self.pattern in _PEFT_LAYER_PATTERNS


def _layout(plan: Plan) -> _Layout:
    cells: dict[tuple[int, str], None] = {}  # ordered: the plan's module order
    containers = set()
    for u in plan.units:
        parts = u.name.split(".")
        idx = next((i for i in range(1, len(parts)) if parts[i] == str(u.layer)), None)
        if idx is None:
            raise LayercardError(f"plan: module {u.name!r} does not name its layer {u.layer}")
        containers.add(".".join(parts[:idx]))
        cells[(u.layer, ".".join(parts[idx + 1 :]))] = None
    layers = sorted({layer for layer, _ in cells})
    suffixes = list(dict.fromkeys(s for _, s in cells))  # the plan's role order: q, k, v, o, ...
    product = len(containers) == 1 and set(cells) == {(x, s) for x in layers for s in suffixes}
    container = next(iter(containers)) if len(containers) == 1 else ""
    n_layers = plan.card.get("n_layers")
    n = int(n_layers) if n_layers else None
    return _Layout(layers, suffixes, container, product, n is not None and len(layers) == n, n)


def _layer_index(name: str, pattern: str | None) -> int | None:
    """The layer index PEFT reads from a module name for ``layers_to_transform``, or None where PEFT
    versions read different ones (older ones match greedily and need a dot before the pattern)."""
    if pattern is None:
        forms = [r".*\.[^.]*\.(\d+)\.", r".*?\.[^.]*\.(\d+)\."]
    else:
        forms = [rf".*\.{pattern}\.(\d+)\.", rf".*?\.{pattern}\.(\d+)\.", rf"(?:^|.*?\.){pattern}\.(\d+)\."]
    found = {m.group(1) if m else None for m in (re.match(f, name) for f in forms)}
    return int(next(iter(found))) if len(found) == 1 and None not in found else None


def _selects(
    lay: _Layout, targets: list[str], layers: list[int] | None, pattern: str | None, planned: set[str]
) -> bool:
    """Whether PEFT, given ``targets`` (names or suffixes) and the layer list and pattern, would adapt
    exactly ``planned`` among the modules the plan's layer list holds under those names."""
    n = lay.n_layers if lay.n_layers else max(lay.layers) + 1
    reachable = planned | {f"{lay.container}.{i}.{s}" for i in range(n) for s in lay.suffixes}
    chosen = set()
    for name in reachable:
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if layers is not None:
            idx = _layer_index(name, pattern)
            if idx is None:
                return False
            if idx not in layers:
                continue
        chosen.add(name)
    return chosen == planned


def _lora(plan: Plan) -> dict[str, Any]:
    if plan.kind != "lora" or not plan.lora_config:
        raise LayercardError(
            f"plan: adapter kind {plan.kind!r} is not LoRA; PEFT, TRL, axolotl and LLaMA-Factory train LoRA "
            "(re-plan with --kind lora)"
        )
    plan.peft_config()  # a plan whose LoraConfig PEFT refuses is an error here, not in the user's tool
    return dict(plan.lora_config)


def _header(plan: Plan, source: str | None, target: str) -> list[str]:
    pred = plan.predicted
    return [
        f"layercard plan {source} exported for {target}"
        if source
        else f"layercard plan exported for {target}",
        f"model {plan.card.get('model_id')} ({plan.card.get('n_layers')} layers), "
        f"task {plan.card.get('task')}, policy {plan.config.get('policy')}",
        f"layers {layers_text(plan.layers)}; {len({u.name for u in plan.units})} modules; "
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
    """Comment lines, each one line whatever it holds: text read from an artifact (a model id, a task
    name) with a line break in it would otherwise end the comment and become code or a setting of the
    exported file (YAML and Python also break lines at ``\r``, ``\x85``, ``\u2028`` and ``\u2029``)."""
    flat = (" ".join(str(line).splitlines()) for line in lines)
    return "".join(f"# {line}\n" if line else "#\n" for line in flat)


def _yaml(header: list[str], notes: list[str], body: dict[str, Any]) -> str:
    """The header and notes as comments, then one ``key: value`` line per setting (lists in flow style)."""
    import yaml

    def value(v: Any) -> str:
        text = yaml.safe_dump(v, default_flow_style=True, width=float("inf")).strip()
        return text.removesuffix("\n...").removesuffix("...").strip()

    lines = header + ([""] + [f"note: {n}" for n in notes] if notes else [])
    return _comment(lines) + "".join(f"{k}: {value(v)}\n" for k, v in body.items())


def _peft(plan: Plan, lora: dict[str, Any], source: str | None, plan_file: str | None) -> Export:
    config = {"peft_type": "LORA", **lora}
    snippet = (
        _comment([*_header(plan, source, "PEFT"), "expects `model`: the plan's base model, loaded"])
        + "from peft import LoraConfig, get_peft_model\n\n"
        + _lora_code(lora)
        + "model = get_peft_model(model, peft_config)\n"
    )
    text = json.dumps(config, indent=2) + "\n"
    return Export("peft", FILENAMES["peft"], text, (), snippet)


def _trl(plan: Plan, lora: dict[str, Any], source: str | None, plan_file: str | None) -> Export:
    out_dir = "trl-output"
    lines = [
        *_header(plan, source, "TRL's SFTTrainer"),
        "expects `model` (the plan's base model) and `train_dataset`; LayercardCallback records",
        f"step time, memory and loss against the plan in {out_dir}/train_metrics.json",
    ]
    if plan_file is None:  # exported from a Plan in memory: no file to point the callback at
        lines.append("set the path of the plan's plan.json in LayercardCallback below: this export was not")
        lines.append("made from a plan file, so it does not know where the plan is saved")
    callback = json.dumps(plan_file or "plan.json")
    checkpointing = bool(plan.predicted.get("calibration_checkpointing", False))
    priced = "with" if checkpointing else "no"
    if checkpointing:
        lines.append("the Trainer's checkpointing also turns on gradients at the embeddings' output, which")
        lines.append("layercard's does not: every backward then runs down to the embeddings, and a placement")
        lines.append("that leaves the lower layers out steps slower than priced (the callback says so)")
    text = (
        _comment(lines)
        + "from peft import LoraConfig\n"
        + "from trl import SFTConfig, SFTTrainer\n\n"
        + "from layercard.integrations import LayercardCallback\n\n"
        + _lora_code(lora)
        + "trainer = SFTTrainer(\n"
        + "    model=model,\n"
        + f"    # as the plan priced its steps: {priced} gradient checkpointing; every step's loss logged\n"
        + "    # for the callback's loss curve\n"
        + f"    args=SFTConfig(output_dir={json.dumps(out_dir)}, gradient_checkpointing={checkpointing},\n"
        + "                   logging_steps=1),\n"
        + "    train_dataset=train_dataset,\n"
        + "    peft_config=peft_config,\n"
        + f"    callbacks=[LayercardCallback({callback}, {json.dumps(out_dir)})],\n"
        + ")\n"
        + "trainer.train()\n"
    )
    return Export("trl", FILENAMES["trl"], text)


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


def _axolotl(plan: Plan, lora: dict[str, Any], source: str | None, plan_file: str | None) -> Export:
    lay = _layout(plan)
    alpha, notes = _whole_alpha(lora, "axolotl", "lora_alpha")
    body: dict[str, Any] = {
        "adapter": "lora",
        "lora_r": lora["r"],
        "lora_alpha": alpha,
        "lora_dropout": lora["lora_dropout"],
    }
    planned = {u.name for u in plan.units}
    layers: list[int] | None = None
    pattern = None if lay.top_level else lay.pattern
    if pattern is not None or not lay.all_layers:
        layers = lay.layers  # PEFT reads a layers pattern only beside a layer list
    short = (
        lay.product
        and (lay.top_level or pattern is not None)
        and _selects(lay, lay.suffixes, layers, pattern, planned)
    )
    if short:
        body["lora_target_modules"] = lay.suffixes
        if layers is not None:
            body["peft_layers_to_transform"] = layers
        if pattern is not None:
            body["peft_layers_pattern"] = [pattern]
    else:  # full paths name each planned module where the short names cannot
        body["lora_target_modules"] = list(lora["target_modules"])
        if not lay.product:
            notes.append(
                "the chosen layers adapt different modules, which lora_target_modules with "
                "peft_layers_to_transform cannot say: lora_target_modules lists every planned module by "
                "full path"
            )
    if lora.get("fan_in_fan_out"):  # Conv1D modules (GPT-2) store their weight as d_in × d_out
        body["lora_fan_in_fan_out"] = True
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
    return Export("axolotl", FILENAMES["axolotl"], text, tuple(notes))


def _llamafactory(plan: Plan, lora: dict[str, Any], source: str | None, plan_file: str | None) -> Export:
    lay = _layout(plan)
    notes = _rank_note(lora, "LLaMA-Factory", "lora_rank")
    alpha, rounded = _whole_alpha(lora, "LLaMA-Factory", "lora_alpha")
    notes += rounded
    planned = {u.name for u in plan.units}
    short = (
        lay.product and lay.all_layers and lay.top_level and _selects(lay, lay.suffixes, None, None, planned)
    )
    modules = lay.suffixes if short else list(lora["target_modules"])
    body = {
        "finetuning_type": "lora",
        "lora_target": ",".join(modules),
        "lora_rank": lora["r"],
        "lora_alpha": alpha,
        "lora_dropout": lora["lora_dropout"],
    }
    header = _header(plan, source, "LLaMA-Factory")
    if not short:  # not a shortcoming: full paths select exactly the planned modules
        header.append("LoRA in LLaMA-Factory has no layer setting: lora_target names each planned module")
    if lora.get("fan_in_fan_out"):
        header.append(
            "the planned modules are Conv1D (fan_in_fan_out): PEFT sets that for them itself, with a warning"
        )
    return Export("llamafactory", FILENAMES["llamafactory"], _yaml(header, notes, body), tuple(notes))


def export_plan(plan: Plan | str | Path, to: str) -> Export:
    """The plan (a :class:`Plan` or a plan.json path) exported for the tool ``to`` (see :data:`TARGETS`)."""
    if to not in TARGETS:
        raise LayercardError(f"--to {to!r}: not a target; valid: {', '.join(TARGETS)}")
    # the path as given names the plan in comments; code that reads the file gets it absolute, so the
    # export works from any working directory
    source = None if isinstance(plan, Plan) else str(plan)
    plan_file = None if isinstance(plan, Plan) else str(Path(plan).resolve())
    p = plan if isinstance(plan, Plan) else Plan.load(plan)
    lora = _lora(p)
    build = {"peft": _peft, "trl": _trl, "axolotl": _axolotl, "llamafactory": _llamafactory}[to]
    return build(p, lora, source, plan_file)
