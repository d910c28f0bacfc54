"""A budget: the cap on one cost of a placement (docs/design.md §6)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from layercard.errors import LayercardError

BUDGET_KINDS: tuple[str, ...] = ("layers", "params", "step_time", "modules", "memory")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}
# Memory budgets are in MiB; a unit may be written after the number. GB and MB are read as GiB and MiB,
# as memory sizes are usually meant (a "24 GB" GPU holds 24 GiB), and the help says so.
_MEMORY_UNITS = {"gib": 1024.0, "gb": 1024.0, "g": 1024.0, "mib": 1.0, "mb": 1.0, "m": 1.0}


# What a cost's absolute value is counted in, as messages say it (the others are counts).
COST_UNITS = {"step_time": "s", "memory": "MiB"}


def unit_suffix(kind: str) -> str:
    """`` s`` or `` MiB`` after an absolute cost of ``kind``; nothing after a count."""
    return f" {COST_UNITS[kind]}" if kind in COST_UNITS else ""


def grouped(part: str) -> str:
    """One budget as text (``params=100000000``) with a large whole number grouped for reading
    (``params=100,000,000``); any other as it is."""
    kind, _, value = part.partition("=")
    return f"{kind}={int(value):,}" if value.isdigit() and int(value) >= 10_000 else part


def _shown(kind: str, v: object, relative: bool = False) -> str:
    """A budget value in a message: whole numbers without a decimal point, seconds with their unit, a
    multiple of the reference with its ``x``."""
    whole = (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()
    )
    unit = "x" if relative else unit_suffix(kind)
    return (str(int(v)) if whole else repr(v)) + unit  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Budget:
    """A cap on one cost of a placement: ``layers``, ``params``, ``step_time`` (seconds), ``modules`` or
    ``memory`` (peak training memory, MiB).

    ``relative`` budgets are multiples of the reference placement's cost (``params=0.25x``).
    """

    kind: str
    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise LayercardError(
                f"budget {self.kind!r}: unknown kind; valid kinds: {', '.join(BUDGET_KINDS)}"
            )
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise LayercardError(
                f"budget {self.kind}={_shown(self.kind, v, self.relative)}: must be a positive finite number"
            )
        if self.kind in ("layers", "modules") and not self.relative and float(v) != int(v):
            raise LayercardError(f"budget {self.kind}={_shown(self.kind, v)}: must be a whole number")
        object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``'layers=8'``, ``'params=2.5M'``, ``'step_time=1.5'`` (or ``1.5s``), ``'modules=16'``,
        ``'memory=6G'``, ``'params=0.25x'``."""
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
        if "_" in raw:  # float() would read Python's digit separators: 1_000k as a million
            raise LayercardError(
                f"budget {text!r}: value {raw!r} has an underscore; write the digits without separators"
            )
        relative = raw.endswith("x") and raw[:-1].strip() != ""  # "0.25x"; a bare "x" is not a number
        raw = raw[:-1] if relative else raw
        mult = 1.0
        if kind == "params" and not relative and raw and raw[-1] in _SUFFIX:
            raw, mult = raw[:-1], _SUFFIX[raw[-1]]
        if kind == "step_time" and not relative and raw.endswith("s") and raw[:-1].strip():
            raw = raw[:-1].strip()  # seconds, as messages write a step time ("0.44 s")
        if kind == "memory" and not relative:
            unit = next((u for u in _MEMORY_UNITS if raw.endswith(u) and raw[: -len(u)].strip()), None)
            if unit is not None:
                raw, mult = raw[: -len(unit)].strip(), _MEMORY_UNITS[unit]
        try:
            value = float(raw) * mult
        except ValueError:
            share = _percent(raw)  # a share of the reference is written as a multiple of it
            hint = "" if share is None else f"; {raw} of the reference is written {share:g}x"
            if kind == "memory" and share is None:
                hint = "; write MiB, or a number with M/MB/MiB or G/GB/GiB, or a multiple of the reference"
            elif kind == "params" and share is None:
                hint = "; write a count, with k/m/g, or a multiple of the reference (0.25x)"
            value_text = str(text).partition("=")[2].strip()  # as written: raw is lower-cased and cut
            raise LayercardError(f"budget {text!r}: value {value_text!r} is not a number{hint}") from None
        return cls(kind, value, relative)

    def cap(self, reference: dict[str, float]) -> float:
        """The cap in the cost's own unit: a relative budget times the reference's cost."""
        if not self.relative:
            return self.value
        if self.kind not in reference:
            raise LayercardError(f"budget {self}: the reference has no {self.kind} cost")
        return self.value * reference[self.kind]

    def __str__(self) -> str:
        if self.relative:
            return f"{self.kind}={self.value:g}x"
        v = int(self.value) if self.value == int(self.value) else self.value
        return f"{self.kind}={v}"

    @property
    def label(self) -> str:
        """The budget as messages show it, with its unit (``step_time=0.44 s``, ``memory=6144 MiB``)."""
        unit = "" if self.relative else unit_suffix(self.kind)
        return f"{grouped(str(self))}{unit}"


@dataclasses.dataclass(frozen=True)
class Budgets:
    """One or several budgets, all of which a placement must meet (``params=0.25x,step_time=0.6x``).

    With one budget it reads like that budget (``.kind``, ``.value``, ``.relative``), which is what the
    layer policies take.
    """

    items: tuple[Budget, ...]

    def __post_init__(self) -> None:
        if not self.items:
            raise LayercardError("budget: give at least one KIND=VALUE")
        kinds = [b.kind for b in self.items]
        dup = next((k for k in kinds if kinds.count(k) > 1), None)
        if dup is not None:
            raise LayercardError(f"budget {self}: {dup} is given twice")

    @classmethod
    def parse(cls, text: str) -> Budgets:
        return cls(tuple(Budget.parse(part) for part in str(text).split(",") if part.strip()))

    @classmethod
    def of(cls, value: Budget | Budgets | str | Sequence[Budget | str]) -> Budgets:
        """Budgets from a Budget, text (``params=0.25x,step_time=0.6x``) or a list of either (as YAML
        writes one)."""
        if isinstance(value, Budgets):
            return value
        if isinstance(value, Budget):
            return cls((value,))
        if isinstance(value, (list, tuple)):
            items: list[Budget] = []
            for v in value:
                if isinstance(v, Budget):
                    items.append(v)
                elif isinstance(v, str):
                    items += cls.parse(v).items
                else:
                    raise LayercardError(
                        f"budget {v!r}: each entry of a budget list must be KIND=VALUE text "
                        "(e.g. params=0.25x)"
                    )
            return cls(tuple(items))
        return cls.parse(value)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def _single(self) -> Budget:
        if len(self.items) != 1:
            raise LayercardError(f"budget {self}: this policy takes one budget")
        return self.items[0]

    @property
    def kind(self) -> str:
        return self._single().kind

    @property
    def value(self) -> float:
        return self._single().value

    @property
    def relative(self) -> bool:
        return self._single().relative

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.items)

    @property
    def label(self) -> str:
        """The budgets as messages show them, each with its unit."""
        return ", ".join(b.label for b in self.items)


def _percent(raw: str) -> float | None:
    """``20%`` as the share it means (0.2); None where ``raw`` is no percentage."""
    try:
        return float(raw[:-1]) / 100 if raw.endswith("%") else None
    except ValueError:
        return None
