"""The job grid (what to train and evaluate) and the card's score variants (what `select` compares)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .settings import FULL_POLICIES, SMALL_POLICIES, Settings


@dataclasses.dataclass(frozen=True)
class Job:
    """One placement to train and evaluate; several jobs may resolve to the same run (same layers)."""

    task: str
    group: str  # "single", "grid" or "repeat"
    policy: str  # a plan policy, or "single"
    budget: int | None = None
    plan_seed: int = 0
    train_seed: int = 0
    layer: int | None = None

    @property
    def label(self) -> str:
        parts = [self.task, self.policy if self.layer is None else f"layer {self.layer}"]
        if self.budget is not None:
            parts.append(f"k={self.budget}")
        if self.policy == "random":
            parts.append(f"placement seed {self.plan_seed}")
        if self.train_seed:
            parts.append(f"train seed {self.train_seed}")
        return " · ".join(parts)


def single_jobs(s: Settings, tasks: Sequence[str]) -> list[Job]:
    """One single-layer job per task and layer of ``s.single_layers``."""
    return [Job(t, "single", "single", layer=layer) for t in tasks for layer in s.single_layers]


def grid_jobs(
    s: Settings, tasks: Sequence[str], only: set[str] | None = None, groups: set[str] | None = None
) -> list[Job]:
    """The budget × policy grid, then the seed repeats; ``only``/``groups`` keep the named policies/groups."""
    jobs: list[Job] = []
    for t in tasks:
        ts = s.task(t)
        budgets = s.budgets if ts.grid == "full" else (s.small_budget,)
        policies = FULL_POLICIES if ts.grid == "full" else SMALL_POLICIES
        for b in budgets:
            for p in policies:
                for ps in s.random_seeds if p == "random" else (0,):
                    jobs.append(Job(t, "grid", p, b, plan_seed=ps))
        jobs.append(Job(t, "grid", "all"))
    for t in tasks:
        if s.task(t).grid != "full":
            continue
        for seed in s.repeat_seeds:
            for p in s.repeat_policies:
                jobs.append(Job(t, "repeat", p, None if p == "all" else s.repeat_budget, train_seed=seed))
    return [j for j in jobs if (only is None or j.policy in only) and (groups is None or j.group in groups)]


# ---------------------------------------------------------------------------------------------------------
# Score variants (docs/design.md §3a): what `select` compares
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """A predicted-gain score of the card with its settings (damping δ for the capacity family)."""

    name: str
    score: str
    delta: float | None = None

    def layer_scores(self, card: Any) -> np.ndarray:
        """The card's per-layer score under this variant."""
        return np.asarray(card.layer_scores(self.score, delta=self.delta), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _delta_text(d: float) -> str:
    e = math.log10(d)
    return f"1e{int(round(e))}" if abs(e - round(e)) < 1e-9 else f"{d:g}"


def variants(settings: Settings) -> list[Variant]:
    """capacity at every δ, then the other scores at the card's own settings."""
    out = [Variant(f"capacity@δ={_delta_text(d)}", "capacity", d) for d in settings.deltas]
    out += [Variant(s, s) for s in ("capacity_energy", "gradnorm", "gradnorm_energy", "rate", "rate_linear")]
    out.append(Variant("saturating", "saturating"))
    return out


def spearman_or_none(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho, or None where it is undefined (fewer than 3 points, constant input)."""
    from layercard.card.stats import spearman

    if len(a) < 3 or np.ptp(np.asarray(a, dtype=float)) == 0 or np.ptp(np.asarray(b, dtype=float)) == 0:
        return None  # undefined for constant input
    r = spearman(list(a), list(b))
    return None if not math.isfinite(r) else r
