"""A budget: the cap on one cost of a placement (docs/design.md §6)."""

from __future__ import annotations

import dataclasses
import math

from layercard.errors import LayercardError

BUDGET_KINDS: tuple[str, ...] = ("layers", "params", "step_time", "modules")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


def _shown(kind: str, v: object) -> str:
    """A budget value in a message: whole numbers without a decimal point, seconds with their unit."""
    whole = (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()
    )
    return (str(int(v)) if whole else repr(v)) + (" s" if kind == "step_time" else "")  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Budget:
    """A cap on one cost of a placement: ``layers``, ``params``, ``step_time`` (seconds) or ``modules``."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise LayercardError(
                f"budget {self.kind!r}: unknown kind; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise LayercardError(
                f"budget {self.kind}={_shown(self.kind, v)}: must be a positive finite number"
            )
        if self.kind in ("layers", "modules") and float(v) != int(v):
            raise LayercardError(f"budget {self.kind}={_shown(self.kind, v)}: must be a whole number")
        object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``'layers=8'``, ``'params=2.5M'``, ``'step_time=1.5'``, ``'modules=16'``."""
        kind, sep, raw = str(text).partition("=")
        kind, raw = kind.strip().lower().replace("-", "_"), raw.strip().lower()
        if not sep or not kind or not raw:
            raise LayercardError(
                f"budget {text!r}: expected KIND=VALUE, e.g. layers=8; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        if kind not in BUDGET_KINDS:
            raise LayercardError(
                f"budget {text!r}: unknown kind {kind!r}; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        mult = 1.0
        if kind == "params" and raw[-1] in _SUFFIX:
            raw, mult = raw[:-1], _SUFFIX[raw[-1]]
        try:
            value = float(raw) * mult
        except ValueError:
            raise LayercardError(f"budget {text!r}: value {raw!r} is not a number") from None
        return cls(kind, value)

    def __str__(self) -> str:
        v = int(self.value) if self.value == int(self.value) else self.value
        return f"{self.kind}={v}"
