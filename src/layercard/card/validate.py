"""Field-by-field checks of an artifact read from disk, and those of card.json (docs/design.md §1).

A hand-edited or damaged artifact must fail where it is read, with one line naming the file and the field
(``card.json: units[3].grad_norm: must be a finite number >= 0, got NaN``), never deep inside a later
stage. :func:`check_card` applies :class:`layercard.artifacts.Fields`, the checks every artifact shares,
to a card.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from layercard.artifacts import Fields
from layercard.models.roles import CANONICAL_ROLES, FUSED_ROLES

# ---------------------------------------------------------------------------------------------------------
# card.json
# ---------------------------------------------------------------------------------------------------------

_UNIT_NONNEG = ("grad_norm", "resnorm")
_UNIT_SIGNED = ("rate", "rate_linear", "rate_quadratic")
_GROUP_NONNEG = ("energy", "kappa", "effective_rank", "noise_amplification")


def check_card(d: Mapping[str, Any], source: str, scores: Sequence[str]) -> None:
    """Check a card.json dict field by field: types, finite numbers, signs, layers within the model."""
    f = Fields(source)
    f.mapping(f.get(d, "provenance"), "provenance")
    model = f.mapping(f.get(d, "model"), "model")
    f.text(f.get(model, "id", "model"), "model.id")
    f.text(f.get(model, "hash", "model"), "model.hash")
    n_layers = f.integer(f.get(model, "n_layers", "model"), "model.n_layers", minimum=1)
    _check_task(f, f.mapping(f.get(d, "task"), "task"))
    config = f.mapping(f.get(d, "config"), "config")
    f.number(f.get(config, "delta", "config"), "config.delta", minimum=0, above=True)
    # What the card's summary and scores read back: the LoRA the rate assumed, the saturating horizon.
    f.integer(f.get(config, "lora_rank", "config"), "config.lora_rank", minimum=1)
    for key in ("lora_alpha", "lr"):
        f.number(f.get(config, key, "config"), f"config.{key}", minimum=0, above=True)
    if "horizon_steps" in config:  # cards written before the saturating score have none
        f.integer(config["horizon_steps"], "config.horizon_steps", minimum=1)
    for i, role in enumerate(f.items(f.get(d, "roles"), "roles")):
        _role(f, role, f"roles[{i}]")
    for key in ("n_positions", "n_target_tokens"):
        f.integer(f.get(d, key), key, minimum=0)
    f.number(f.get(d, "loss"), "loss", minimum=0)
    groups = _check_groups(f, f.items(f.get(d, "groups"), "groups"), n_layers)
    _check_units(f, f.items(f.get(d, "units"), "units"), n_layers, groups)
    if d.get("coupling") is not None:
        _check_coupling(f, f.mapping(d["coupling"], "coupling"), n_layers)
    if d.get("cost") is not None:
        _check_cost(f, f.mapping(d["cost"], "cost"), n_layers)
    timings = f.mapping(d.get("timings", {}), "timings")
    for k, v in timings.items():
        f.number(v, f"timings.{k}", minimum=0)
    if "default_score" in d and d["default_score"] not in scores:
        f.fail("default_score", f"must be one of {', '.join(scores)}", d["default_score"])
    f.finite_everywhere(d, "")  # whatever the checks above do not name (cost, provenance)


# A cost model's terms are fitted non-negative (each is a time or a size); the rest are counts, widths and
# shares. Keys a card made before the term was measured lacks are optional.
_COST_TERMS = ("intercept_s", "per_layer_backward_s", "per_module_s")
_COST_OPTIONAL_TERMS = (
    "per_mparam_s", "memory_resident_mib", "memory_base_mib", "memory_per_layer_mib", "memory_per_module_mib",
    "memory_per_mparam_mib", "memory_resident_before_mib", "forward_base_s", "forward_per_module_s",
)  # fmt: skip
_COST_WIDTHS = ("memory_module_width", "step_module_width", "batch_positions", "memory_positions")
_COST_SHARES = ("step_position_share", "memory_position_share", "forward_position_share")


def _check_cost(f: Fields, cost: Mapping[str, Any], n_layers: int) -> None:
    """The card's cost model: what every price reads is present, and no term, width or share a price would
    turn negative, infinite or a division by zero."""
    for key in _COST_TERMS:
        f.number(f.get(cost, key, "cost"), f"cost.{key}", minimum=0)
    for key in _COST_OPTIONAL_TERMS:
        f.optional(cost.get(key), f"cost.{key}", lambda v, w: f.number(v, w, minimum=0))
    f.integer(f.get(cost, "n_layers", "cost"), "cost.n_layers", minimum=1)
    if cost["n_layers"] != n_layers:
        f.fail("cost.n_layers", f"must be the card's {n_layers} layers", cost["n_layers"])
    f.integer(f.get(cost, "batch_size", "cost"), "cost.batch_size", minimum=1)
    f.integer(f.get(cost, "batch_tokens", "cost"), "cost.batch_tokens", minimum=1)
    f.items(f.get(cost, "measured", "cost"), "cost.measured")
    f.text(f.get(cost, "device", "cost"), "cost.device")
    for key in _COST_WIDTHS:
        f.optional(cost.get(key), f"cost.{key}", lambda v, w: f.number(v, w, minimum=0, above=True))
    for key in _COST_SHARES:
        if cost.get(key) is not None and not (0 <= f.number(cost[key], f"cost.{key}") <= 1):
            f.fail(f"cost.{key}", "must be a share in [0, 1]", cost[key])
    if "step_micro_batches" in cost:
        f.integer(cost["step_micro_batches"], "cost.step_micro_batches", minimum=1)
    if "dropout" in cost and not (0 <= f.number(cost["dropout"], "cost.dropout") < 1):
        f.fail("cost.dropout", "must be in [0, 1)", cost["dropout"])
    if "checkpointing" in cost:
        f.flag(cost["checkpointing"], "cost.checkpointing")
    f.optional(cost.get("dtype"), "cost.dtype", f.text)  # cards from before it was recorded: none
    first = cost.get("memory_first_step")
    if first is not None:
        for key, v in f.mapping(first, "cost.memory_first_step").items():
            check = (lambda v, w: f.number(v, w, minimum=0)) if key != "memory_position_share" else f.number
            f.optional(v, f"cost.memory_first_step.{key}", check)


def _check_task(f: Fields, task: Mapping[str, Any]) -> None:
    f.text(f.get(task, "name", "task"), "task.name")
    for key in ("source", "data_hash"):
        f.text(f.get(task, key, "task"), f"task.{key}")
    f.optional(f.get(task, "split", "task"), "task.split", f.text)
    n = f.integer(f.get(task, "n_examples", "task"), "task.n_examples", minimum=1)
    if task.get("target_entropy") is not None:  # cards written before it was measured have none
        f.number(task["target_entropy"], "task.target_entropy", minimum=0)
        f.integer(f.get(task, "target_entropy_tokens", "task"), "task.target_entropy_tokens", minimum=1)
    # Cards written before the probe recorded its cuts have none of these.
    f.optional(task.get("max_length"), "task.max_length", lambda v, at: f.integer(v, at, minimum=2))
    for key in ("examples_cut", "examples_clipped"):
        f.optional(task.get(key), f"task.{key}", lambda v, at: f.integer(v, at, minimum=0, below=n + 1))


def _role(f: Fields, value: Any, where: str) -> str:
    """A role the card can hold: canonical or fused; any other would select no unit of any plan."""
    role = f.text(value, where)
    if role not in CANONICAL_ROLES and role not in FUSED_ROLES:
        f.fail(where, f"must be a role ({', '.join([*CANONICAL_ROLES, *FUSED_ROLES])})", role)
    return role


def _module_kind(f: Fields) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in ("linear", "conv1d"):
            f.fail(where, "must be linear or conv1d", value)
        return value

    return check


def _check_groups(f: Fields, rows: Sequence[Any], n_layers: int) -> dict[str, tuple[int, int]]:
    """Each group row's fields; returns each group key's layer and number of eigenvalues."""
    sizes: dict[str, tuple[int, int]] = {}
    for i, raw in enumerate(rows):
        w = f"groups[{i}]"
        g = f.mapping(raw, w)
        key = f.text(f.get(g, "key", w), f"{w}.key")
        if key in sizes:
            f.fail(f"{w}.key", "is used twice", key)
        layer = f.integer(f.get(g, "layer", w), f"{w}.layer", minimum=0, below=n_layers)
        f.text(f.get(g, "input_group", w), f"{w}.input_group")
        f.integer(f.get(g, "d_in", w), f"{w}.d_in", minimum=1)
        f.integer(f.get(g, "n", w), f"{w}.n", minimum=1)  # resnorm divides by it
        f.optional(f.get(g, "sketched", w), f"{w}.sketched", lambda v, at: f.integer(v, at, minimum=1))
        sizes[key] = (layer, len(f.numbers(f.get(g, "eigenvalues", w), f"{w}.eigenvalues", minimum=0)))
        for k in _GROUP_NONNEG:
            f.number(f.get(g, k, w), f"{w}.{k}", minimum=0)
    return sizes


def _check_units(f: Fields, rows: Sequence[Any], n_layers: int, groups: dict[str, tuple[int, int]]) -> None:
    # A unit listed twice would be counted twice by every per-layer score and budget.
    seen: dict[str, set[str]] = {"key": set(), "name": set()}
    for i, raw in enumerate(rows):
        w = f"units[{i}]"
        u = f.mapping(raw, w)
        for k in ("key", "name"):
            f.text(f.get(u, k, w), f"{w}.{k}")
        _role(f, f.get(u, "role", w), f"{w}.role")
        for k, values in seen.items():
            if u[k] in values:
                f.fail(f"{w}.{k}", "is used twice", u[k])
            values.add(u[k])
        layer = f.integer(f.get(u, "layer", w), f"{w}.layer", minimum=0, below=n_layers)
        for k in ("d_in", "d_out"):
            f.integer(f.get(u, k, w), f"{w}.{k}", minimum=1)
        group = f.text(f.get(u, "group", w), f"{w}.group")
        if group not in groups:
            f.fail(f"{w}.group", "names no group of the card", group)
        # A unit reads the input of its own layer; another layer's statistics would score it wrongly.
        if groups[group][0] != layer:
            f.fail(f"{w}.layer", f"must be its group {group}'s layer {groups[group][0]}", layer)
        for k in _UNIT_NONNEG:
            f.number(f.get(u, k, w), f"{w}.{k}", minimum=0)
        for k in _UNIT_SIGNED:
            f.number(f.get(u, k, w), f"{w}.{k}")
        f.integer(f.get(u, "lora_params", w), f"{w}.lora_params", minimum=0)
        captured = f.mapping(f.get(u, "captured", w), f"{w}.captured")
        for k, v in captured.items():
            if not (isinstance(k, str) and k.isascii() and k.isdigit() and int(k) >= 1):
                f.fail(f"{w}.captured", "keys must be ranks (whole numbers >= 1)", k)
            f.number(v, f"{w}.captured.{k}", minimum=0)
        # Optional: cards written before weight_snr was measured lack it, and still load.
        f.optional(u.get("weight_snr"), f"{w}.weight_snr", lambda v, at: f.number(v, at, minimum=0))
        f.optional(u.get("module_kind"), f"{w}.module_kind", _module_kind(f))
        energy = f.numbers(f.get(u, "grad_eig_energy", w), f"{w}.grad_eig_energy", minimum=0)
        if len(energy) != groups[group][1]:
            f.fail(
                f"{w}.grad_eig_energy",
                f"has {len(energy)} values, its group {group} has {groups[group][1]} eigenvalues",
            )


def _check_coupling(f: Fields, c: Mapping[str, Any], n_layers: int) -> None:
    layers = f.items(f.get(c, "layers", "coupling"), "coupling.layers")
    for i, x in enumerate(layers):
        f.integer(x, f"coupling.layers[{i}]", minimum=0, below=n_layers)
    matrix = f.items(f.get(c, "matrix", "coupling"), "coupling.matrix")
    if len(matrix) != len(layers):
        f.fail("coupling.matrix", f"must have one row per layer ({len(layers)})", matrix)
    for i, row in enumerate(matrix):
        if len(f.numbers(row, f"coupling.matrix[{i}]")) != len(layers):
            f.fail(f"coupling.matrix[{i}]", f"must have {len(layers)} values", row)
