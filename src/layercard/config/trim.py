"""Settings of the trace and trim stages (docs/design.md §8)."""

from __future__ import annotations

import dataclasses

from layercard.config.schema import Schema, setting


@dataclasses.dataclass(frozen=True)
class TraceConfig(Schema):
    """Which validation examples the logit lens reads and how they are batched."""

    SECTION = "trace"

    examples: int | None = setting(
        64, optional=True, kind="int", minimum=1, help="seeded subset of the split; null: all"
    )
    batch_size: int = setting(8, kind="int", minimum=1, help="batch size of the lens pass")
    max_length: int | None = setting(
        256,
        optional=True,
        kind="int",
        minimum=2,
        help="cap on prompt + target tokens; null: the format's limits only",
    )
    seed: int = setting(0, kind="seed", yaml=False, help="seed of the example subset")


@dataclasses.dataclass(frozen=True)
class TrimConfig(Schema):
    """The boundary sweep and export.

    K values: ``window=(a, b)`` sweeps ``a..b``; ``all_layers`` every layer; otherwise ``±radius`` layers
    around each trace candidate. The last layer (no trimming) is always in the sweep.
    """

    SECTION = "trim"

    examples: int | None = setting(
        64, optional=True, kind="int", minimum=1, help="held-out examples scored at each K; null: all"
    )
    batch_size: int = setting(8, kind="int", minimum=1, help="batch size of the sweep")
    max_new_tokens: int | None = setting(
        None, kind="int", minimum=1, help="most new tokens generated per example; null: the task format's"
    )
    max_length: int | None = setting(
        256, optional=True, kind="int", minimum=2, help="cap on prompt + target tokens"
    )
    metric: str | None = setting(
        None,
        kind="selection_metric",
        help="selection metric; null: the task's primary; loss: the lowest loss (no generation)",
    )
    window: tuple[int, int] | None = setting(
        None, kind="window", help="sweep exactly the boundaries A..B (A:B, or [A, B] in YAML)"
    )
    all_layers: bool = setting(False, kind="bool", help="sweep every layer as the boundary")
    radius: int = setting(3, kind="int", minimum=0, help="layers swept on each side of a trace candidate")
    tie_tolerance: float = setting(
        1e-9, kind="nonneg_float", help="metric differences up to this are ties (ties → fewer layers)"
    )
    latency_repeats: int = setting(
        3, kind="int", minimum=1, help="generation passes timed before and after; the minimum is reported"
    )
    seed: int = setting(0, kind="seed", yaml=False, help="seed of the example subset")

    def validate(self) -> None:
        if self.window is not None and self.all_layers:
            raise self.fail("window", "window and all_layers exclude each other; give one")

    def trace_config(self) -> TraceConfig:
        """The trace that supplies this sweep's candidates: same examples, batching and length cap."""
        return TraceConfig(
            examples=self.examples, batch_size=self.batch_size, max_length=self.max_length, seed=self.seed
        )
