"""Field-by-field checks of plan.json as it is read (docs/design.md §1, §6).

Besides types and finite numbers, a plan must agree with itself: ``layers`` are exactly the layers of its
``units`` (training adapts the units, so an edited ``layers`` would record other layers than it trains),
a LoRA plan's ``lora_config`` targets exactly its units' modules at exactly their ranks (``r``, or the
module's ``rank_pattern`` entry), and a bottleneck plan's ``adapter_config.layers`` are its ``layers``.
The ``config`` fields a plan is rebuilt from (:meth:`Plan.restricted`) are checked as the plan stage's
settings are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layercard.artifacts import Fields
from layercard.config import ADAPTER_KINDS
from layercard.config.card import SCORES

_UNIT_FIELDS = ("key", "layer", "role", "name", "rank")


def check_plan_dict(d: Mapping[str, Any], source: str) -> None:
    """Check a plan.json dict; the first problem raises a one-line error naming ``source`` and the field."""
    f = Fields(source)
    for key in ("provenance", "card", "config", "predicted"):
        f.mapping(f.get(d, key), key)
    kind = f.get(d, "adapter_kind")
    if kind not in ADAPTER_KINDS:
        f.fail("adapter_kind", f"must be one of {', '.join(ADAPTER_KINDS)}", kind)
    card = d["card"]
    n_layers = None
    if card.get("n_layers") is not None:
        n_layers = f.integer(card["n_layers"], "card.n_layers", minimum=1)
    _check_config(f, d["config"])
    units = _check_units(f, f.items(f.get(d, "units"), "units"), n_layers)
    if not units:  # a plan that adapts nothing trains nothing
        f.fail("units", "must list at least one planned unit", d["units"])
    layers = f.items(f.get(d, "layers"), "layers")
    for i, x in enumerate(layers):
        f.integer(x, f"layers[{i}]", minimum=0, below=n_layers)
    if len(set(layers)) != len(layers):
        f.fail("layers", "lists a layer twice", layers)
    planned = sorted({u["layer"] for u in units})
    if sorted(layers) != planned:
        f.fail("layers", f"must be the layers of the plan's units {planned}", layers)
    lora = f.get(d, "lora_config")
    if lora is not None:
        _check_lora(f, f.mapping(lora, "lora_config"), units)
    adapter = d.get("adapter_config")
    if adapter is not None:
        f.mapping(adapter, "adapter_config")
        if adapter.get("bottleneck") is not None:
            f.integer(adapter["bottleneck"], "adapter_config.bottleneck", minimum=1)
        if kind != "lora" and "layers" in adapter and sorted(adapter["layers"] or []) != sorted(layers):
            f.fail("adapter_config.layers", f"must be the plan's layers {sorted(layers)}", adapter["layers"])
    for i, w in enumerate(f.items(d.get("warnings", []), "warnings")):
        f.text(w, f"warnings[{i}]")
    f.finite_everywhere(d, "")


def _check_units(f: Fields, rows: Sequence[Any], n_layers: int | None) -> list[Mapping[str, Any]]:
    out = []
    names: set[str] = set()
    for i, raw in enumerate(rows):
        w = f"units[{i}]"
        u = f.mapping(raw, w)
        extra = next((k for k in u if k not in _UNIT_FIELDS), None)
        if extra is not None:
            f.fail(f"{w}.{extra}", "unknown field")
        for k in ("key", "role", "name"):
            f.text(f.get(u, k, w), f"{w}.{k}")
        f.integer(f.get(u, "layer", w), f"{w}.layer", minimum=0, below=n_layers)
        f.integer(f.get(u, "rank", w), f"{w}.rank", minimum=1)
        if u["name"] in names:
            f.fail(f"{w}.name", "is planned twice", u["name"])
        names.add(u["name"])
        out.append(u)
    return out


def _check_config(f: Fields, config: Mapping[str, Any]) -> None:
    """The settings a plan is rebuilt from, where it records them (a plan made by hand may not)."""
    if "roles" in config:
        roles = f.items(config["roles"], "config.roles")
        if not roles:
            f.fail("config.roles", "must name at least one role", roles)
        for i, role in enumerate(roles):
            f.text(role, f"config.roles[{i}]")
    if "score" in config and f.text(config["score"], "config.score") not in SCORES:
        f.fail("config.score", f"must be one of {', '.join(SCORES)}", config["score"])
    if "rank" in config and config["rank"] != "auto":
        if not (
            isinstance(config["rank"], int) and not isinstance(config["rank"], bool) and config["rank"] >= 1
        ):
            f.fail("config.rank", "must be an integer >= 1 or 'auto'", config["rank"])
    if config.get("alpha") is not None:
        f.number(config["alpha"], "config.alpha", minimum=0, above=True)
    if "dropout" in config:
        _probability(f, config["dropout"], "config.dropout")
    if "seed" in config:
        f.integer(config["seed"], "config.seed", minimum=0)


def _probability(f: Fields, value: Any, where: str) -> None:
    f.number(value, where, minimum=0)
    if value >= 1:  # a dropout of every input leaves the LoRA nothing to learn from
        f.fail(where, "must be a probability below 1", value)


def _check_lora(f: Fields, lora: Mapping[str, Any], units: Sequence[Mapping[str, Any]]) -> None:
    targets = f.items(f.get(lora, "target_modules", "lora_config"), "lora_config.target_modules")
    for i, t in enumerate(targets):
        f.text(t, f"lora_config.target_modules[{i}]")
    want = sorted(u["name"] for u in units)
    if sorted(targets) != want:
        f.fail(
            "lora_config.target_modules",
            f"must be the modules of the plan's units ({len(want)} modules)",
            targets,
        )
    r = f.integer(f.get(lora, "r", "lora_config"), "lora_config.r", minimum=1)
    if "lora_alpha" in lora:
        f.number(lora["lora_alpha"], "lora_config.lora_alpha", minimum=0, above=True)
    if "lora_dropout" in lora:
        _probability(f, lora["lora_dropout"], "lora_config.lora_dropout")
    planned = set(want)
    patterns: dict[str, Mapping[str, Any]] = {}
    for attr in ("rank_pattern", "alpha_pattern"):
        pattern = f.mapping(lora.get(attr) or {}, f"lora_config.{attr}")
        for k, v in pattern.items():
            if k not in planned:  # PEFT would match the key against other modules, or none
                f.fail(f"lora_config.{attr}", "keys must be modules of the plan's units", k)
            if attr == "rank_pattern":
                f.integer(v, f"lora_config.{attr}.{k}", minimum=1)
            else:  # an alpha may be fractional, as lora_alpha may
                f.number(v, f"lora_config.{attr}.{k}", minimum=0, above=True)
        patterns[attr] = pattern
    # training adapts each module at lora_config's rank, so a unit's recorded rank must be that rank
    for i, u in enumerate(units):
        rank = patterns["rank_pattern"].get(u["name"], r)
        if u["rank"] != rank:
            source = "rank_pattern" if u["name"] in patterns["rank_pattern"] else "r"
            f.fail(
                f"units[{i}].rank",
                f"must be lora_config's rank of {u['name']}, {rank} (its {source})",
                u["rank"],
            )
