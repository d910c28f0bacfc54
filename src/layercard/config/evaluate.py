"""Settings of the eval stage (docs/design.md §9)."""

from __future__ import annotations

import dataclasses
from typing import Any

from layercard.config.schema import Schema, setting


@dataclasses.dataclass(frozen=True)
class EvalConfig(Schema):
    """What to evaluate and how. ``None`` means the task format's default."""

    SECTION = "eval"

    examples: int | None = setting(
        None, kind="int", minimum=1, help="seeded subset of the split; null: all examples"
    )
    batch_size: int = setting(16, kind="int", minimum=1, help="generation batch size")
    max_new_tokens: int | None = setting(
        None, kind="int", minimum=1, help="most new tokens generated per example; null: the task format's"
    )
    metrics: tuple[str, ...] | None = setting(
        None, kind="metrics", help="metric names, first = primary; null: the task format's"
    )
    loss: bool = setting(True, kind="bool", help="also compute the teacher-forced loss over the targets")
    max_length: int | None = setting(
        None, kind="int", minimum=2, help="cap on prompt + target tokens for the loss; null: format limits"
    )
    seed: int = setting(0, kind="seed", yaml=False, help="seed of the example subset")

    def resolved(self, task: Any, examples: Any = None) -> EvalConfig:
        """This config with the task-format defaults filled in (what actually runs). Without metrics given,
        they are :func:`layercard.tasks.default_metrics` of ``examples`` (the task's examples as they are
        scored; default: as they are)."""
        from layercard.tasks.metrics import default_metrics

        fmt = task.format
        scored = task.examples if examples is None else examples
        return dataclasses.replace(
            self,
            metrics=self.metrics
            if self.metrics is not None
            else default_metrics(fmt.name, fmt.metrics, scored),
            max_new_tokens=self.max_new_tokens or task.format.max_new_tokens,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
