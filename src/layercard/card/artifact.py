"""The Layer Card artifact: typed, JSON round-trip, scores re-evaluable without a new pass."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layercard.artifacts import SCHEMA_VERSION, Fields, artifact_hash, load_artifact, write_json
from layercard.card import stats
from layercard.card.validate import check_card
from layercard.config.card import SCORES
from layercard.errors import LayercardError

KIND = "card"
CARD_FILE = "card.json"

# Chosen by the placement benchmark (benchmarks/results/placement.md): the best mean Spearman with
# measured single-layer gains on the selection tasks, then reported unchanged on the confirmation tasks.
DEFAULT_SCORE = "gradnorm_energy"
DEFAULT_SCORE_BASIS = (
    "chosen by layercard's placement benchmark (smollm2, LoRA r=8 on q,v, 36 steps): Spearman with the "
    "measured single-layer test-loss drop 0.98 on e2e_nlg and 0.07 on sst2 (selection tasks), then "
    "unchanged 0.76 on gsm8k and 0.98 on samsum (confirmation tasks); see benchmarks/results/placement.md "
    "in the layercard source tree"
)


def _r(x: float) -> float:
    """Round for storage: 8 significant digits is far below the card's sampling noise."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.8g}")


def _rl(a: Sequence[float] | np.ndarray) -> list[float]:
    return [_r(float(v)) for v in a]


@dataclasses.dataclass(frozen=True)
class UnitRow:
    key: str
    layer: int
    role: str
    name: str
    d_in: int
    d_out: int
    group: str  # "{layer}.{input_group}"
    grad_norm: float
    resnorm: float  # at the card's δ
    captured: dict[str, float]  # rank → captured@r at the card's δ
    rate: float
    rate_linear: float
    rate_quadratic: float
    lora_params: int  # r·(d_in + d_out) at the card's LoRA rank
    grad_eig_energy: list[float]  # eⱼ = ‖∇W uⱼ‖² along Σ's eigenvectors (ascending λ)
    # Marchenko–Pastur SNR of the frozen weight (stats.weight_snr); None in cards written before it existed.
    weight_snr: float | None = None
    # "linear" or "conv1d" (GPT-2 stores its weight transposed); None in cards written before it was kept.
    module_kind: str | None = None


@dataclasses.dataclass(frozen=True)
class GroupRow:
    key: str
    layer: int
    input_group: str
    d_in: int
    n: int
    sketched: int | None  # sketch size k, or None when exact
    eigenvalues: list[float]  # of Σ (or of the sketched RᵀΣR), ascending
    energy: float
    kappa: float
    effective_rank: float
    noise_amplification: float


@dataclasses.dataclass(frozen=True)
class Card:
    """A Layer Card; see docs/design.md §3. Built by :func:`layercard.card.compute_card`."""

    provenance: dict[str, Any]
    config: dict[str, Any]
    model: dict[str, Any]  # id, hash, family, n_layers, d_model
    task: dict[str, Any]  # name, source, split, n_examples, data_hash
    roles: list[str]
    n_positions: int
    n_target_tokens: int
    loss: float
    units: list[UnitRow]
    groups: list[GroupRow]
    coupling: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    default_score: str = DEFAULT_SCORE
    default_score_basis: str = DEFAULT_SCORE_BASIS

    # ---- derived quantities -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    @property
    def delta(self) -> float:
        return float(self.config["delta"])

    def group_of(self, unit: UnitRow) -> GroupRow:
        """The input group (the statistics of the input) that ``unit`` reads."""
        return self._groups_by_key[unit.group]

    @functools.cached_property
    def _groups_by_key(self) -> dict[str, GroupRow]:
        # built once: the planner asks for a unit's group hundreds of thousands of times on a large model
        return {g.key: g for g in self.groups}

    def resnorm_sq(self, unit: UnitRow, delta: float | None = None) -> float:
        """resnorm² at any damping δ, from the stored spectra (no new pass)."""
        g = self.group_of(unit)
        return stats.resnorm_sq_from_energy(
            np.asarray(unit.grad_eig_energy),
            np.asarray(g.eigenvalues),
            g.n,
            self.delta if delta is None else delta,
        )

    def unit_score(
        self, unit: UnitRow, score: str, *, delta: float | None = None, horizon: int | None = None
    ) -> float:
        """``unit``'s predicted-gain score ``score`` (one of :data:`SCORES`), with resnorm read at damping
        ``delta`` and the saturating score at ``horizon`` steps where given (else the card's own)."""
        g = self.group_of(unit)
        if score == "capacity":
            return 0.5 * self.n_target_tokens * self.resnorm_sq(unit, delta)
        if score == "capacity_energy":
            return self.resnorm_sq(unit, delta) * g.energy
        if score == "gradnorm":
            return unit.grad_norm
        if score == "gradnorm_energy":
            return unit.grad_norm * math.sqrt(g.energy)
        if score == "rate":
            return unit.rate
        if score == "rate_linear":
            return unit.rate_linear
        if score == "saturating":
            c = 0.5 * self.n_target_tokens * self.resnorm_sq(unit, delta)
            rho = max(unit.rate, 0.0)
            t = horizon if horizon is not None else int(self.config.get("horizon_steps", 100))
            return c * (1.0 - math.exp(-rho * t / c)) if c > 0 else 0.0
        raise LayercardError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")

    def covered_roles(self) -> set[str]:
        """The canonical roles the card's units cover (a fused unit covers each role it fuses)."""
        return {r for u in self.units for r in _covers(u.role)} | set(self.roles)

    def selected_units(self, roles: Sequence[str] | None = None) -> list[UnitRow]:
        """The card's units of ``roles`` (all of them for None), in the card's order."""
        if roles is None:
            return list(self.units)
        want = set(roles)
        return [u for u in self.units if u.role in want or bool(set(_covers(u.role)) & want)]

    def layer_scores(
        self,
        score: str | None = None,
        *,
        roles: Sequence[str] | None = None,
        delta: float | None = None,
        horizon: int | None = None,
    ) -> np.ndarray:
        """Per-layer predicted gain for ``score`` over the chosen roles (default: the card's)."""
        score = score or self.default_score
        out = np.zeros(self.n_layers)
        sq = score in ("gradnorm", "gradnorm_energy")
        for u in self.selected_units(roles):
            v = self.unit_score(u, score, delta=delta, horizon=horizon)
            out[u.layer] += v * v if sq else v
        return np.sqrt(out) if sq else out

    def layer_table(self, roles: Sequence[str] | None = None) -> list[dict[str, float]]:
        """One row per layer: every score plus the input statistics (mean over the layer's inputs)."""
        rows = []
        per_score = {s: self.layer_scores(s, roles=roles) for s in SCORES}
        resn = np.zeros(self.n_layers)
        params = np.zeros(self.n_layers)
        for u in self.selected_units(roles):
            resn[u.layer] += u.resnorm**2
            params[u.layer] += u.lora_params
        for layer in range(self.n_layers):
            gs = [g for g in self.groups if g.layer == layer]
            row: dict[str, float] = {"layer": layer, "resnorm": float(math.sqrt(resn[layer]))}
            row.update({s: float(per_score[s][layer]) for s in SCORES})
            if gs:
                row["energy"] = float(np.mean([g.energy for g in gs]))
                row["kappa"] = float(np.max([g.kappa for g in gs]))
                row["effective_rank"] = float(np.mean([g.effective_rank for g in gs]))
                row["noise_amplification"] = float(np.mean([g.noise_amplification for g in gs]))
            row["lora_params"] = float(params[layer])
            rows.append(row)
        return rows

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The card as card.json holds it: kind, schema version and every field."""
        d = dataclasses.asdict(self)
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, "scores": SCORES, **d}

    @functools.cached_property
    def content_hash(self) -> str:
        """The content hash of the card.json this card writes (:func:`layercard.artifacts.content_hash`):
        which card exactly, its timings and provenance aside. A card.json of an earlier version, whose
        missing fields load with their defaults, hashes otherwise as a file. Computed once (a card is
        frozen)."""
        return artifact_hash(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "card") -> Card:
        """A card from its card.json form, checked field by field (errors start with ``source``)."""
        if not isinstance(d, dict):
            raise LayercardError(f"{source}: must be a mapping of fields, got {type(d).__name__}")
        check_card(d, source, list(SCORES))
        fields = {f.name for f in dataclasses.fields(cls)}
        Fields(source).known(d, fields | {"kind", "schema_version", "scores"})
        kw = {k: v for k, v in d.items() if k in fields}
        kw["units"] = [UnitRow(**_row(UnitRow, u, f"{source}: units[{i}]")) for i, u in enumerate(d["units"])]
        kw["groups"] = [
            GroupRow(**_row(GroupRow, g, f"{source}: groups[{i}]")) for i, g in enumerate(d["groups"])
        ]
        card = cls(**kw)
        card._check_scores(source)
        return card

    def _check_scores(self, source: str) -> None:
        """Every score of every unit finite, squares included: finite fields can still overflow one
        (a grad_norm of 1e308), and a plan would then rank layers by infinity."""
        for i, u in enumerate(self.units):
            for s in SCORES:
                v = self.unit_score(u, s)
                if not math.isfinite(v) or not math.isfinite(v * v):
                    raise LayercardError(
                        f"{source}: units[{i}]: its {s} score is not finite (a field too large to score)"
                    )

    def save(self, path: str | Path) -> Path:
        """Write card.json to ``path`` (atomically; :func:`layercard.card.write_card_folder` adds the
        figures and card.md); returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Card:
        """Read a card.json (or the folder holding one), checking every field; errors name file and field."""
        return load_artifact(
            path,
            kind=KIND,
            what="card",
            file_name=CARD_FILE,  # `--card card/`: the folder `layercard card` wrote
            build=lambda d, file: cls.from_dict(d, source=str(file)),
        )


def _row(row: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    """``d`` once every key is checked to be a field of ``row`` (a dataclass)."""
    names = {f.name for f in dataclasses.fields(row)}
    extra = next((k for k in d if k not in names), None)
    if extra is not None:
        raise LayercardError(f"{where}.{extra}: unknown field")
    return d


def _covers(role: str) -> tuple[str, ...]:
    from layercard.models import FUSED_ROLES

    return FUSED_ROLES.get(role, (role,))
