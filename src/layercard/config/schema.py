"""The schema behind every stage config: one frozen dataclass per stage, one place for each setting.

A setting is a dataclass field made with :func:`setting`: its default, a one-line help text and a *kind*
that says what values it accepts. From that one declaration derive

- the checks run when the config is built (:class:`Schema.__post_init__`), with errors that name the
  field: ``train.steps: must be a positive integer, got -3``;
- YAML validation (:meth:`Schema.from_mapping`): unknown keys (with a close match), types, ranges;
- the command-line options of the stage's command (``layercard.cli.options``);
- ``configs/reference.yaml``, every key at its default with its help (``layercard.config.run``).

Kinds accept the value's own type, and text where a value arrives as text (YAML reads ``1e-3`` as a
string; the command line gives every value as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from layercard.errors import LayercardError

META = "layercard"


class ConfigError(LayercardError):
    """A bad value of one setting: ``field`` names it, ``problem`` says what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one setting accepts and how it is described."""

    kind: str
    help: str
    optional: bool = False
    choices: tuple[str, ...] | Callable[[], Sequence[str]] = ()
    minimum: float | None = None
    yaml: bool = True  # False: set by the run, not a key of the stage's YAML section (the run's seed)
    cli: bool = True  # False: no command-line option

    def choice_list(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    kind: str,
    optional: bool = False,
    choices: tuple[str, ...] | Callable[[], Sequence[str]] = (),
    minimum: float | None = None,
    yaml: bool = True,
    cli: bool = True,
) -> Any:
    """A config field: ``default`` (omit for a required setting), its help and the kind of value."""
    if kind not in _CHECKERS:
        raise AssertionError(f"unknown setting kind {kind!r}")  # a schema bug, never user input
    spec = Spec(kind, help, optional or default is None, choices, minimum, yaml, cli)
    return dataclasses.field(default=default, metadata={META: spec})


def spec_of(f: dataclasses.Field) -> Spec | None:
    return f.metadata.get(META)


# ---------------------------------------------------------------------------------------------------------
# Checkers: value (or its text) → the typed value, or a ConfigError naming `where`
# ---------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v: Any) -> int | None:
    if _is_int(v):
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v.strip())
    return None


def _as_float(v: Any) -> float | None:
    """A number, or a numeric string (YAML 1.1 reads ``1e-3`` as text)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _int(where: str, spec: Spec, v: Any) -> int:
    x = _as_int(v)
    lo = spec.minimum
    if x is None or (lo is not None and x < lo):
        if lo == 1:
            what = "a positive integer"
        elif lo == 0:
            what = "a non-negative integer"
        elif lo is None:
            what = "an integer"
        else:
            what = f"an integer >= {int(lo)}"
        raise ConfigError(where, f"must be {what}, got {v!r}")
    return x


# Seeds reach numpy and torch generators, which take 0..2**32 - 1.
SEED_MAX = 2**32 - 1


def _seed(where: str, spec: Spec, v: Any) -> int:
    x = _as_int(v)
    if x is None or not 0 <= x <= SEED_MAX:
        raise ConfigError(where, f"must be an integer in 0..{SEED_MAX}, got {v!r}")
    return x


_FLOAT_RANGES = {
    "pos_float": ("a positive number", lambda x: x > 0),
    "nonneg_float": ("a number >= 0", lambda x: x >= 0),
    "fraction": ("a fraction in (0, 1]", lambda x: 0 < x <= 1),
    "unit": ("a number in [0, 1)", lambda x: 0 <= x < 1),
}


def _float(where: str, spec: Spec, v: Any) -> float:
    what, ok = _FLOAT_RANGES[spec.kind]
    x = _as_float(v)
    if x is None or not math.isfinite(x) or not ok(x):
        raise ConfigError(where, f"must be {what}, got {v!r}")
    return x


def _bool(where: str, spec: Spec, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ConfigError(where, f"must be true or false, got {v!r}")


def _str(where: str, spec: Spec, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        # YAML reads on, off, yes and no as booleans: the text the user wrote needs quotes
        hint = (
            f" (YAML reads an unquoted {'on or yes' if v else 'off or no'} as {str(v).lower()}: quote it)"
            if isinstance(v, bool)
            else ""
        )
        raise ConfigError(where, f"must be a non-empty string, got {v!r}{hint}")
    return v.strip()


def _choice(where: str, spec: Spec, v: Any) -> str:
    valid = spec.choice_list()
    if not isinstance(v, str) or v not in valid:
        hint = (
            f" (YAML reads an unquoted on, off, yes or no as {str(v).lower()}: quote it)"
            if isinstance(v, bool)
            else ""
        )
        raise ConfigError(where, f"must be one of {', '.join(valid)}; got {v!r}{hint}")
    return v


def _roles(where: str, spec: Spec, v: Any) -> str:
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    if not isinstance(text, str):
        raise ConfigError(where, f"must be a role list such as 'q,v' or [q, v], got {v!r}")
    from layercard.models import parse_roles

    try:
        parse_roles(text)
    except LayercardError as e:
        raise ConfigError(where, str(e).removeprefix("roles: ")) from None
    return text


def _auto_or_int(where: str, spec: Spec, v: Any) -> int | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    x = _as_int(v)
    if x is None or x < 1:
        raise ConfigError(where, f"must be a positive integer or 'auto', got {v!r}")
    return x


def _sketch(where: str, spec: Spec, v: Any) -> int | str | None:
    if isinstance(v, str) and v.strip().lower() in ("off", "none", "null"):
        return None  # the command line's way to ask for the exact covariance
    try:
        return _auto_or_int(where, spec, v)
    except ConfigError:
        raise ConfigError(where, f"must be a positive integer, 'auto' or 'off', got {v!r}") from None


def _budget(where: str, spec: Spec, v: Any) -> Any:
    from layercard.config.budget import Budgets

    try:
        return Budgets.of(v if not isinstance(v, (int, float)) else str(v))
    except LayercardError as e:
        raise ConfigError(where, str(e)) from None


def _metric_names() -> tuple[str, ...]:
    from layercard.tasks.metrics import METRICS

    return tuple(METRICS)


def _metrics(where: str, spec: Spec, v: Any) -> tuple[str, ...]:
    names = [n.strip() for n in v.split(",")] if isinstance(v, str) else v
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(where, f"must be a metric name or a list of them, got {v!r}")
    if not names:
        raise ConfigError(where, "is empty; name at least one, or null for the default")
    valid = _metric_names()
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(where, f"unknown metric {bad[0]!r}; valid: {', '.join(valid)}")
    return tuple(dict.fromkeys(names))  # a duplicate would be scored and shown twice


def _selection_metric(where: str, spec: Spec, v: Any) -> str:
    valid = (*_metric_names(), "loss")
    if not isinstance(v, str) or v not in valid:
        raise ConfigError(where, f"unknown metric {v!r}; valid: {', '.join(valid)}")
    return v


def _window(where: str, spec: Spec, v: Any) -> tuple[int, int]:
    parts: Any = v
    if isinstance(v, str):
        a, sep, b = v.partition(":")
        parts = [_as_int(a), _as_int(b)] if sep else None
    if (
        not isinstance(parts, (list, tuple))
        or len(parts) != 2
        or not all(_is_int(x) and x >= 0 for x in parts)
        or parts[0] > parts[1]
    ):
        raise ConfigError(where, f"must be two layer indices a <= b, both >= 0 (A:B), got {v!r}")
    return (int(parts[0]), int(parts[1]))


_CHECKERS: dict[str, Callable[[str, Spec, Any], Any]] = {
    "int": _int,
    "seed": _seed,
    **dict.fromkeys(_FLOAT_RANGES, _float),
    "bool": _bool,
    "str": _str,
    "choice": _choice,
    "roles": _roles,
    "rank": _auto_or_int,
    "threads": _auto_or_int,
    "sketch": _sketch,
    "budget": _budget,
    "metrics": _metrics,
    "selection_metric": _selection_metric,
    "window": _window,
}


def check(where: str, spec: Spec, value: Any) -> Any:
    """``value`` converted to the setting's type, or a :class:`ConfigError` naming ``where``."""
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(where, "must not be null")
    return _CHECKERS[spec.kind](where, spec, value)


# ---------------------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------------------


class Schema:
    """Base of every stage config (a frozen dataclass of :func:`setting` fields).

    Subclasses set ``SECTION`` (the YAML section and the prefix of error messages) and may override
    :meth:`validate` for checks across fields.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec = spec_of(f)
            if spec is not None:
                where = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
                object.__setattr__(self, f.name, check(where, spec, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks across fields; raise :class:`ConfigError` (``self.fail``) naming the field."""

    def fail(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.SECTION}.{field}" if self.SECTION else field, problem)

    @classmethod
    def settings(cls, *, yaml_only: bool = False, cli_only: bool = False) -> list[dataclasses.Field]:
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            spec = spec_of(f)
            if spec is None or (yaml_only and not spec.yaml) or (cli_only and not spec.cli):
                continue
            out.append(f)
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting with a default, at its default (JSON form)."""
        return {
            f.name: to_jsonable(f.default)
            for f in cls.settings(yaml_only=True)
            if f.default is not dataclasses.MISSING
        }

    @classmethod
    def from_mapping(cls, raw: Any, *, where: str | None = None, **fixed: Any) -> Schema:
        """Build from a YAML mapping: unknown keys are errors; ``fixed`` sets non-YAML fields (seed)."""
        where = cls.SECTION if where is None else where
        prefix = f"{where}." if where else ""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(where, f"must be a mapping of keys to values, got {type(raw).__name__}")
        valid = [f.name for f in cls.settings(yaml_only=True)]
        for key in raw:
            if not isinstance(key, str) or key not in valid:
                raise unknown_key(prefix, str(key), valid, raw[key])
        required = [f.name for f in cls.settings(yaml_only=True) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]}", "required key is missing")
        return cls.build(where, **cls.prepare(dict(raw)), **fixed)

    @classmethod
    def prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Adjust the YAML values of a section before building (a hook for subclasses)."""
        return values

    @classmethod
    def build(cls, where: str, **kw: Any) -> Schema:
        """``cls(**kw)`` with its errors renamed from ``SECTION.field`` to ``where.field``."""
        try:
            return cls(**kw)
        except ConfigError as e:
            if where == cls.SECTION or not e.where.startswith(cls.SECTION):
                raise
            tail = e.where[len(cls.SECTION) :].lstrip(".")
            raise ConfigError(f"{where}.{tail}" if where else tail, e.problem) from None

    def to_dict(self, *, yaml_only: bool = False) -> dict[str, Any]:
        """JSON form: budgets as text, tuples as lists."""
        return {f.name: to_jsonable(getattr(self, f.name)) for f in self.settings(yaml_only=yaml_only)}

    def replace(self, **changes: Any) -> Schema:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def to_jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [to_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str, list, dict)):
        return v
    return str(v)  # Budget, Budgets


def unknown_key(prefix: str, key: str, valid: Sequence[str], value: Any) -> ConfigError:
    """An unknown key, with the closest valid one when there is one."""
    hint = ""
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        hint = f" (did you mean {close[0]}?)"
    elif value is None and key in _role_words():
        # YAML flow mappings split at commas: {roles: q,v} reads as roles: q plus a key "v".
        hint = " (in a {...} mapping a comma ends the entry: write roles: 'q,v' or roles: [q, v])"
    return ConfigError(f"{prefix}{key}", f"unknown key{hint}; valid keys: {', '.join(valid)}")


def _role_words() -> set[str]:
    from layercard.models import CANONICAL_ROLES, FUSED_ROLES

    return {*CANONICAL_ROLES, *FUSED_ROLES}
