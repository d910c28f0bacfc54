"""The plan artifact (plan.json): :class:`Plan` and its :class:`PlannedUnit` rows (docs/design.md §6)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layercard.artifacts import SCHEMA_VERSION, Fields, load_artifact, write_json
from layercard.errors import LayercardError, message_line
from layercard.plan.predict import caveats, predicted, provenance, unit_rank
from layercard.plan.ranks import captured_at, lora_config
from layercard.plan.space import build_space, priced_at
from layercard.plan.validate import check_plan_dict

if TYPE_CHECKING:
    from peft import LoraConfig

    from layercard.card.artifact import Card

KIND = "plan"


@dataclasses.dataclass(frozen=True)
class PlannedUnit:
    """One adapted module (LoRA) or one adapted layer (houlsby/parallel: ``name`` is the layer path)."""

    key: str
    layer: int
    role: str
    name: str
    rank: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A placement with its predicted gain and cost; ``lora_config`` is the JSON form of a PEFT LoraConfig."""

    provenance: dict[str, Any]
    card: dict[str, Any]
    config: dict[str, Any]
    kind: str
    units: list[PlannedUnit]
    layers: list[int]
    predicted: dict[str, Any]
    lora_config: dict[str, Any] | None
    adapter_config: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plan.json form."""
        # "kind" names the artifact (as in every layercard JSON); the adapter kind goes under "adapter_kind".
        d = dataclasses.asdict(self)
        d["adapter_kind"] = d.pop("kind")
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "plan") -> Plan:
        """A plan from its plan.json form, checked field by field (errors start with ``source``)."""
        if not isinstance(d, dict):
            raise LayercardError(f"{source}: must be a mapping of fields, got {type(d).__name__}")
        check_plan_dict(d, source)
        names = {f.name for f in dataclasses.fields(cls)} - {"kind"}
        Fields(source).known(d, names | {"kind", "schema_version", "adapter_kind"})
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "kind"}
        kw["kind"] = d["adapter_kind"]
        kw["units"] = [PlannedUnit(**u) for u in d["units"]]
        kw["layers"] = [int(x) for x in d["layers"]]
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write plan.json atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan.json, checking its kind, schema version and every field; errors name the file."""
        return load_artifact(
            path, kind=KIND, what="plan", build=lambda d, file: cls.from_dict(d, source=str(file))
        )

    def peft_config(self) -> LoraConfig:
        """The PEFT ``LoraConfig`` of the plan's ``lora_config``; a bad one is a one-line error."""
        if not self.lora_config:
            raise LayercardError(
                f"plan: kind {self.kind!r} has no lora_config (no LoraConfig); "
                "re-plan with --kind lora to train LoRA"
            )
        from peft import LoraConfig

        try:
            return LoraConfig(**self.lora_config)
        except (TypeError, ValueError) as e:
            raise LayercardError(f"plan: lora_config is not a valid LoraConfig ({message_line(e)})") from None

    def restricted(self, layers: Sequence[int], card: Card, *, policy: str = "restricted") -> Plan:
        """The same plan keeping only the units in ``layers`` (a subset of ``self.layers``).

        Units keep their ranks; ``lora_config`` (targets, rank and alpha patterns), ``adapter_config``,
        ``layers``, ``predicted``, ``warnings`` and the provenance are recomputed, with ``card`` (the card
        the plan was made from) giving module shapes, gains, coupling and the cost model exactly as
        make_plan used them. ``config.policy`` becomes ``policy``; the budget, target and bands chose the
        original layers, so they are cleared.
        """
        t0 = time.perf_counter()
        keep = self._restriction(layers, card)
        cfg = self.config
        roles, score = tuple(cfg["roles"]), cfg["score"]
        # priced as make_plan priced the plan: at its batches, with its memory figure (plans written before
        # they were recorded: the card's own batch and the default figure)
        card = priced_at(
            card,
            cfg.get("batch_size"),
            cfg.get("step_positions"),
            cfg.get("peak_positions"),
            cfg.get("grad_accum"),
        )
        space, notes = build_space(
            card,
            roles,
            score,
            kind=self.kind,
            unit_rank=unit_rank(cfg["rank"]),
            memory_figure=cfg.get("memory_figure") or "window",
        )
        units = [u for u in self.units if u.layer in keep]
        lora, adapter, captured = None, None, None
        if self.kind == "lora":
            rows = {r.key: r for layer in keep for r in space.units.get(layer, ())}
            unknown = [u.key for u in units if u.key not in rows]
            if unknown:
                raise LayercardError(
                    f"plan restricted: units {unknown[:3]} are not in the card for roles {','.join(roles)}"
                )
            kinds = [rows[u.key].module_kind for u in units]
            lora = lora_config(units, cfg["alpha"], cfg["dropout"], module_kinds=kinds)
            params = sum(u.rank * (rows[u.key].d_in + rows[u.key].d_out) for u in units)
            captured = float(sum(captured_at(rows[u.key], u.rank) for u in units))
        else:
            adapter = {**(self.adapter_config or {}), "layers": keep}
            params = int(space.cost(keep, "params"))
        pred = predicted(space, keep, score, params, captured)
        config = {**cfg, "policy": policy, "budget": None, "target": None, "bands": None}
        return dataclasses.replace(
            self,
            provenance=provenance(card, config, t0),
            card=dict(self.card),
            config=config,
            units=units,
            layers=keep,
            predicted=pred,
            lora_config=lora,
            adapter_config=adapter,
            warnings=notes + caveats(card, self.kind, float(cfg["dropout"]), pred, score),
        )

    def _restriction(self, layers: Sequence[int], card: Card) -> list[int]:
        """``layers`` sorted, once checked against the plan's layers and its card's model."""
        keep = sorted({int(x) for x in layers})
        if not keep:
            raise LayercardError("plan restricted: no layers given")
        outside = [x for x in keep if x not in self.layers]
        if outside:
            raise LayercardError(
                f"plan restricted: layers {outside} are not in the plan's layers {self.layers}"
            )
        missing = [k for k in ("roles", "score", "rank", "alpha", "dropout", "seed") if k not in self.config]
        if missing:
            raise LayercardError(
                f"plan restricted: the plan's config has no {', '.join(missing)}; "
                "restrict a plan that make_plan made"
            )
        if card.model["hash"] != self.card.get("model_hash"):
            raise LayercardError(
                f"plan restricted: the card is of model {card.model['id']} ({str(card.model['hash'])[:12]}), "
                f"the plan was made for {self.card.get('model_id')} ({str(self.card.get('model_hash'))[:12]})"
            )
        return keep
