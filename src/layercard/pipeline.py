"""The whole job in one run folder: card → plan → train → trim → eval → report (DESIGN §1).

A run is described by one YAML config (:func:`load_config`), validated in full before anything runs:
every error names the file and the key (``config.yaml: train.steps: must be a positive integer, got -3``)
and unknown keys are errors. :func:`run_pipeline` then runs the stages over one loaded model::

    RUN_DIR/run.json                      the resolved config (every default filled in)
    RUN_DIR/card/                         card.json, card.md, card_*.png
    RUN_DIR/plan/<placement>/plan.json
    RUN_DIR/train/<placement>/            adapter/, train_metrics.json, checkpoints/
    RUN_DIR/trim/                         trace.json, trim.json, adapter-trimmed/, *.png
    RUN_DIR/eval/{base,<placement>,trimmed}/   eval.json, predictions.jsonl
    RUN_DIR/report.html, report.md, figures/
    RUN_DIR/summary.json                  what the last invocation did, with the headline numbers

Resuming: each stage folder holds ``stage.json`` with the stage's fingerprint, the sha256 of the stage
config and of its input artifacts (model weights, task data, card.json, plan.json, adapter files...).
A stage whose recorded fingerprint matches and whose outputs exist is skipped; one whose fingerprint
changed is recomputed (and everything downstream of it, since its outputs' hashes change). A stage
that was stopped part-way has a record marked ``running``; training then continues from its last
checkpoint when nothing it depends on changed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from layercard.artifacts import SCHEMA_VERSION, read_json, sha256_json, write_json
from layercard.card import SCORES, CardConfig
from layercard.errors import LayercardError
from layercard.evaluate import EvalConfig
from layercard.plan import ADAPTER_KINDS, POLICIES, Budget, PlanConfig
from layercard.train import SCHEDULERS, TrainConfig

__all__ = [
    "RUN_FILE",
    "STAGE_FILE",
    "SUMMARY_FILE",
    "PlacementSpec",
    "RunConfig",
    "StageResult",
    "TaskSpec",
    "TrimSpec",
    "apply_overrides",
    "demo_config_path",
    "load_config",
    "parse_config",
    "run_pipeline",
]

RUN_KIND = "run_config"
STAGE_KIND = "stage"
SUMMARY_KIND = "run_summary"
RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
SUMMARY_FILE = "summary.json"
REPORT_STAGE_FILE = "report.stage.json"
# Bumped when a stage's code changes what it writes, so old records stop matching.
STAGE_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED_NAMES = ("base", "trimmed")


# ---------------------------------------------------------------------------------------------------------
# Typed keys: one checker per kind of value, each error naming the key
# ---------------------------------------------------------------------------------------------------------


class _ConfigError(LayercardError):
    """An error at a config key; :func:`parse_config` prefixes the file name."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> float | None:
    """A YAML number, or a numeric string (PyYAML reads ``1e-3`` as a string: YAML 1.1 wants ``1.0e-3``)."""
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


@dataclasses.dataclass(frozen=True)
class _Key:
    """What one config key accepts. ``kind`` picks the checker in :func:`_check`."""

    kind: str
    optional: bool = False
    choices: tuple[str, ...] = ()


def _check(where: str, key: _Key, v: Any) -> Any:
    """The value of ``where`` converted to its type, or an error naming ``where``."""
    if v is None:
        if key.optional:
            return None
        raise _ConfigError(f"{where}: must not be null")
    k = key.kind
    if k in ("pos_int", "nonneg_int"):
        lo = 1 if k == "pos_int" else 0
        if not _is_int(v) or v < lo:
            what = "a positive integer" if lo else "a non-negative integer"
            raise _ConfigError(f"{where}: must be {what}, got {v!r}")
        return int(v)
    if k in ("pos_float", "nonneg_float", "fraction", "unit"):
        x = _number(v)
        ok = x is not None and math.isfinite(x)
        if ok and k == "pos_float":
            ok, what = x > 0, "a positive number"
        elif ok and k == "nonneg_float":
            ok, what = x >= 0, "a number >= 0"
        elif ok and k == "fraction":
            ok, what = 0 < x <= 1, "a fraction in (0, 1]"
        elif ok:
            ok, what = 0 <= x < 1, "a number in [0, 1)"
        else:
            what = {
                "pos_float": "a positive number",
                "nonneg_float": "a number >= 0",
                "fraction": "a fraction in (0, 1]",
                "unit": "a number in [0, 1)",
            }[k]
        if not ok:
            raise _ConfigError(f"{where}: must be {what}, got {v!r}")
        return float(x)
    if k == "bool":
        if not isinstance(v, bool):
            raise _ConfigError(f"{where}: must be true or false, got {v!r}")
        return v
    if k == "str":
        if not isinstance(v, str) or not v.strip():
            raise _ConfigError(f"{where}: must be a non-empty string, got {v!r}")
        return v.strip()
    if k == "choice":
        if not isinstance(v, str) or v not in key.choices:
            raise _ConfigError(f"{where}: must be one of {', '.join(key.choices)}; got {v!r}")
        return v
    if k == "roles":
        text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        if not isinstance(text, str):
            raise _ConfigError(f"{where}: must be a role list such as 'q,v' or [q, v], got {v!r}")
        from layercard.models import parse_roles

        try:
            parse_roles(text)
        except LayercardError as e:
            raise _ConfigError(f"{where}: {_strip_owner(str(e))}") from None
        return text
    if k == "rank":
        if v == "auto" or (_is_int(v) and v >= 1):
            return v
        raise _ConfigError(f"{where}: must be a positive integer or 'auto', got {v!r}")
    if k == "budget":
        try:
            return str(Budget.parse(str(v)))
        except LayercardError as e:
            raise _ConfigError(f"{where}: {_strip_owner(str(e))}") from None
    if k == "metrics":
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise _ConfigError(f"{where}: must be a metric name or a list of them, got {v!r}")
        from layercard.tasks import METRICS

        bad = [n for n in names if n not in METRICS]
        if bad:
            raise _ConfigError(f"{where}: unknown metric {bad[0]!r}; valid: {', '.join(METRICS)}")
        return tuple(names)
    if k == "any":  # a field the stage config validates itself
        return v
    if k == "threads":
        if v == "auto" or (_is_int(v) and v >= 1):
            return v
        raise _ConfigError(f"{where}: must be a positive integer or 'auto', got {v!r}")
    if k == "window":
        if (
            not isinstance(v, (list, tuple))
            or len(v) != 2
            or not all(_is_int(x) and x >= 0 for x in v)
            or v[0] > v[1]
        ):
            raise _ConfigError(f"{where}: must be two layer indices [a, b] with 0 <= a <= b, got {v!r}")
        return (int(v[0]), int(v[1]))
    raise AssertionError(f"unknown key kind {k}")  # a schema bug, never user input


def _strip_owner(msg: str) -> str:
    """``'budget 'x': ...'`` → the message without a leading owner word the key path already names."""
    for prefix in ("plan config: ", "card config: ", "eval config: ", "trim config: ", "roles: "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _unknown(where: str, key: str, valid: Sequence[str], value: Any) -> _ConfigError:
    hint = ""
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        hint = f" (did you mean {close[0]}?)"
    elif value is None and key in _role_words():
        # YAML flow mappings split at commas: {roles: q,v} reads as roles: q plus a key "v".
        hint = " (in a {...} mapping a comma ends the entry: write roles: 'q,v' or roles: [q, v])"
    return _ConfigError(f"{where}{key}: unknown key{hint}; valid keys: {', '.join(valid)}")


def _role_words() -> set[str]:
    from layercard.models import CANONICAL_ROLES, FUSED_ROLES

    return {*CANONICAL_ROLES, *FUSED_ROLES}


def _section(
    where: str, raw: Any, schema: Mapping[str, _Key], *, required: Sequence[str] = ()
) -> dict[str, Any]:
    """Check a mapping against ``schema``: unknown keys, missing required keys, and each value's type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _ConfigError(f"{where}: must be a mapping of keys to values, got {type(raw).__name__}")
    prefix = f"{where}." if where else ""
    for key in raw:
        if not isinstance(key, str) or key not in schema:
            raise _unknown(prefix, str(key), list(schema), raw[key])
    for key in required:
        if key not in raw:
            raise _ConfigError(f"{prefix}{key}: required key is missing")
    return {key: _check(f"{prefix}{key}", schema[key], value) for key, value in raw.items()}


# ---------------------------------------------------------------------------------------------------------
# The schema of each section
# ---------------------------------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16")
_TOP = {
    "model": _Key("str"),
    "task": _Key("task"),  # checked by _task_spec
    "seed": _Key("nonneg_int"),
    "dtype": _Key("choice", choices=_DTYPES),
    "device": _Key("str"),
    "trust_remote_code": _Key("bool"),
    "threads": _Key("threads"),
    "card": _Key("section"),
    "placements": _Key("section"),
    "train": _Key("section"),
    "trim": _Key("section"),
    "eval": _Key("section"),
}
_TASK = {
    "train": _Key("str"),
    "train_split": _Key("str", optional=True),
    "eval": _Key("str", optional=True),
    "eval_split": _Key("str", optional=True),
}
_CARD = {
    "roles": _Key("roles"),
    "examples": _Key("pos_int"),
    "max_length": _Key("pos_int"),
    "batch_size": _Key("pos_int"),
    "delta": _Key("pos_float"),
    "lora_rank": _Key("pos_int"),
    "lora_alpha": _Key("pos_float"),
    "lr": _Key("pos_float"),
    "a_draws": _Key("pos_int"),
    "sketch": _Key("pos_int", optional=True),
    "layer_groups": _Key("pos_int"),
    "coupling": _Key("bool"),
    "coupling_examples": _Key("pos_int"),
    "coupling_direction": _Key("choice", choices=("first_step", "capacity")),
    "calibrate": _Key("bool"),
    "calibrate_steps": _Key("pos_int"),
    "horizon_steps": _Key("pos_int"),
}
# The pipeline measures coupling and calibrates the cost model unless told not to: the `card` policy
# needs the coupling matrix for its set gain, and the report compares predicted with measured s/step.
_CARD_DEFAULTS = {"coupling": True, "calibrate": True}
_PLACEMENT = {
    "name": _Key("str"),
    "policy": _Key("choice", choices=POLICIES),
    "budget": _Key("budget", optional=True),
    "target": _Key("fraction", optional=True),
    "roles": _Key("roles", optional=True),
    "rank": _Key("rank"),
    "alpha": _Key("pos_float", optional=True),
    "dropout": _Key("unit"),
    "score": _Key("choice", optional=True, choices=tuple(SCORES)),
    "kind": _Key("choice", choices=ADAPTER_KINDS),
    "bands": _Key("pos_int", optional=True),
}
_TRAIN = {
    "steps": _Key("pos_int", optional=True),
    "epochs": _Key("pos_float", optional=True),
    "batch_size": _Key("pos_int"),
    "grad_accum": _Key("pos_int"),
    "lr": _Key("pos_float"),
    "weight_decay": _Key("nonneg_float"),
    "warmup_steps": _Key("nonneg_int"),
    "scheduler": _Key("choice", choices=SCHEDULERS),
    "max_length": _Key("pos_int"),
    "train_examples": _Key("pos_int", optional=True),
    "eval_examples": _Key("nonneg_int"),
    "eval_every": _Key("nonneg_int"),
    "checkpoint_every": _Key("nonneg_int"),
    "log_every": _Key("pos_int"),
    "bottleneck": _Key("pos_int", optional=True),
    "load_in_4bit": _Key("bool"),
    "dtype": _Key("choice", choices=_DTYPES),
}
_TRIM = {
    "enabled": _Key("bool"),
    "placement": _Key("str", optional=True),
    "examples": _Key("pos_int", optional=True),
    "batch_size": _Key("pos_int"),
    "max_new_tokens": _Key("pos_int", optional=True),
    "max_length": _Key("pos_int", optional=True),
    "metric": _Key("str", optional=True),
    "window": _Key("window", optional=True),
    "all_layers": _Key("bool"),
    "radius": _Key("nonneg_int"),
    "tie_tolerance": _Key("nonneg_float"),
    "latency_repeats": _Key("pos_int"),
}
_EVAL = {
    "base": _Key("bool"),
    "examples": _Key("pos_int", optional=True),
    "batch_size": _Key("pos_int"),
    "max_new_tokens": _Key("pos_int", optional=True),
    "metrics": _Key("metrics", optional=True),
    "loss": _Key("bool"),
    "max_length": _Key("pos_int", optional=True),
}


# ---------------------------------------------------------------------------------------------------------
# Config dataclasses
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where training and evaluation data come from (task specs as ``load_task`` reads them).

    ``eval`` defaults to ``train``; ``eval_split`` then defaults to the task's validation split, else
    its test split (never the training split).
    """

    train: str
    train_split: str | None = None
    eval: str | None = None
    eval_split: str | None = None

    def __post_init__(self) -> None:
        for name in ("train", "train_split", "eval", "eval_split"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise LayercardError(f"task.{name}: must be a non-empty string, got {v!r}")
        if not self.train:
            raise LayercardError("task.train: required")


@dataclasses.dataclass(frozen=True)
class PlacementSpec:
    """One placement to plan, train and compare: a name (its folder) and the planner's config."""

    name: str
    plan: PlanConfig

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise LayercardError(
                f"name: {self.name!r} must be 1-64 letters, digits, '_', '.' or '-' (it names a folder)"
            )
        if self.name in _RESERVED_NAMES:
            raise LayercardError(f"name: {self.name!r} is reserved; choose another")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.plan)
        d["budget"] = str(self.plan.budget) if self.plan.budget is not None else None
        d.pop("seed")  # the run's seed
        return {"name": self.name, **d}


@dataclasses.dataclass(frozen=True)
class TrimSpec:
    """Which trained placement to trim (default: the one with the most layers) and the sweep settings."""

    enabled: bool = True
    placement: str | None = None
    config: Any = None  # layercard.trim.TrimConfig (imported lazily: trim pulls in matplotlib for plots)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"enabled": self.enabled, "placement": self.placement}
        if self.config is not None:
            c = self.config.to_dict()
            c.pop("seed")
            d.update(c)
        return d


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated pipeline config; every stage config inside carries the run's seed."""

    model: str
    task: TaskSpec
    placements: tuple[PlacementSpec, ...]
    card: CardConfig
    train: TrainConfig
    trim: TrimSpec
    eval: EvalConfig
    eval_base: bool = True
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    threads: int | str = "auto"
    source: str = "config"

    def __post_init__(self) -> None:
        if not self.placements:
            raise LayercardError("placements: list at least one placement")
        names = [p.name for p in self.placements]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise LayercardError(f"placements: name {dup!r} is used twice; names must be unique")
        if self.trim.enabled and self.trim.placement is not None and self.trim.placement not in names:
            raise LayercardError(
                f"trim.placement: {self.trim.placement!r} is not a placement; placements: {', '.join(names)}"
            )

    def placement(self, name: str) -> PlacementSpec:
        return next(p for p in self.placements if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (every default filled in), as YAML/JSON would write it."""
        card = dataclasses.asdict(self.card)
        card.pop("seed")
        train = self.train.to_dict()
        train.pop("seed")
        ev = self.eval.to_dict()
        ev.pop("seed")
        return {
            "model": self.model,
            "task": dataclasses.asdict(self.task),
            "seed": self.seed,
            "dtype": self.dtype,
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
            "threads": self.threads,
            "card": card,
            "placements": [p.to_dict() for p in self.placements],
            "train": train,
            "trim": self.trim.to_dict(),
            "eval": {"base": self.eval_base, **ev},
        }


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _task_spec(raw: Any) -> TaskSpec:
    if isinstance(raw, str):  # shorthand: one task, trained on its train split, evaluated on the held-out one
        return TaskSpec(train=_check("task", _Key("str"), raw))
    vals = _section("task", raw, _TASK, required=("train",))
    return TaskSpec(**vals)


def _stage_config(where: str, factory: Callable[..., Any], **kw: Any) -> Any:
    """Build a stage config; its own cross-field errors get the section's name in front."""
    try:
        return factory(**kw)
    except _ConfigError:
        raise
    except LayercardError as e:
        raise _ConfigError(f"{where}: {_strip_owner(str(e))}") from None


def _placement(i: int, raw: Any, seed: int) -> PlacementSpec:
    where = f"placements[{i}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        where = f"placements[{raw['name']}]"
    vals = _section(where, raw, _PLACEMENT, required=("name", "policy"))
    name = vals.pop("name")
    try:
        PlacementSpec(name, PlanConfig(policy="all"))  # the name's own checks first, with its key
    except LayercardError as e:
        raise _ConfigError(f"{where}.{e}") from None
    plan = _stage_config(where, PlanConfig, seed=seed, **vals)
    return PlacementSpec(name, plan)


def parse_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a config mapping (parsed YAML) into a :class:`RunConfig`; errors start with ``source``."""
    try:
        return _parse(raw, source)
    except _ConfigError as e:
        raise LayercardError(f"{source}: {e}") from None


def _parse(raw: Any, source: str) -> RunConfig:
    if not isinstance(raw, Mapping):
        raise _ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP:
            raise _unknown("", str(key), list(_TOP), raw[key])
    for key in ("task", "placements"):
        if key not in raw:
            raise _ConfigError(f"{key}: required key is missing")
    simple = {
        k: raw[k] for k in ("model", "seed", "dtype", "device", "trust_remote_code", "threads") if k in raw
    }
    top = {k: _check(k, _TOP[k], v) for k, v in simple.items()}
    seed = top.get("seed", 0)
    task = _task_spec(raw["task"])

    card_vals = {**_CARD_DEFAULTS, **_section("card", raw.get("card"), _CARD)}
    card = _stage_config("card", CardConfig, seed=seed, **card_vals)

    placements_raw = raw["placements"]
    if not isinstance(placements_raw, list) or not placements_raw:
        raise _ConfigError("placements: must be a non-empty list of placements ({name, policy, ...} each)")
    placements = tuple(_placement(i, p, seed) for i, p in enumerate(placements_raw))

    train_vals = _section("train", raw.get("train"), _TRAIN)
    if "epochs" in train_vals and "steps" not in train_vals:
        train_vals["steps"] = None  # epochs given alone replaces the default step count
    train = _stage_config("train", TrainConfig, seed=seed, **train_vals)

    trim_raw = raw.get("trim", {})
    if trim_raw is False:  # `trim: false` switches the stage off
        trim_raw = {"enabled": False}
    from layercard.trim import TrimConfig

    # Fields TrimConfig gained after this schema was written are accepted and left to its own checks.
    later = {f.name: _Key("any", optional=True) for f in dataclasses.fields(TrimConfig) if f.name != "seed"}
    trim_vals = _section("trim", trim_raw, {**later, **_TRIM})
    enabled = trim_vals.pop("enabled", True)
    target = trim_vals.pop("placement", None)

    trim_cfg = _stage_config("trim", TrimConfig, seed=seed, **trim_vals)
    trim = TrimSpec(enabled=enabled, placement=target, config=trim_cfg)

    eval_vals = _section("eval", raw.get("eval"), _EVAL)
    base = eval_vals.pop("base", True)
    ev = _stage_config("eval", EvalConfig, seed=seed, **eval_vals)

    try:
        return RunConfig(
            model=top.get("model", "smollm2"),
            task=task,
            placements=placements,
            card=card,
            train=train,
            trim=trim,
            eval=ev,
            eval_base=base,
            seed=seed,
            dtype=top.get("dtype", "float32"),
            device=top.get("device", "auto"),
            trust_remote_code=top.get("trust_remote_code", False),
            threads=top.get("threads", "auto"),
            source=source,
        )
    except _ConfigError:
        raise
    except LayercardError as e:
        raise _ConfigError(str(e)) from None


def _set_path(raw: dict[str, Any], dotted: str, value: Any, text: str) -> None:
    """Set ``a.b.c`` in nested mappings; a list (placements) is indexed by position or by ``name``."""
    parts = dotted.split(".")
    if not all(parts):
        raise LayercardError(f"--set {text!r}: empty key segment in {dotted!r}")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                idx = int(part)
            else:
                idx = next(
                    (j for j, x in enumerate(node) if isinstance(x, Mapping) and x.get("name") == part), None
                )
            if idx is None:
                names = [str(x.get("name")) for x in node if isinstance(x, Mapping)]
                raise LayercardError(
                    f"--set {text!r}: {here}: no such list entry (give an index 0..{len(node) - 1} or a "
                    f"name: {', '.join(names)})"
                )
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise LayercardError(f"--set {text!r}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None or node.get(part) is False:
                node[part] = {}
            node = node[part]


def apply_overrides(raw: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides on a parsed config (a deep copy); values are typed by YAML parsing."""
    import copy

    import yaml

    out = copy.deepcopy(raw) if raw is not None else {}
    for text in sets:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise LayercardError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=10")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise LayercardError(
                f"--set {text!r}: the value is not valid YAML ({e})".splitlines()[0]
            ) from None
        _set_path(out, key.strip(), parsed, text)
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a YAML run config. Nothing is written."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LayercardError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LayercardError(f"{p}: not valid YAML{where} ({problem})") from None
    if raw is None:
        raise LayercardError(f"{p}: empty config")
    if not isinstance(raw, dict):
        raise LayercardError(f"{p}: the config must be a mapping of keys to values")
    return parse_config(apply_overrides(raw, overrides), source=str(p))


def demo_config_path() -> Path:
    """The packaged demo config (``layercard/configs/demo.yaml``)."""
    from importlib import resources

    return Path(str(resources.files("layercard") / "configs" / "demo.yaml"))


# ---------------------------------------------------------------------------------------------------------
# Run folder layout
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where each artifact of a run lives (the report reads the same layout)."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / RUN_FILE

    @property
    def summary_json(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def card_dir(self) -> Path:
        return self.root / "card"

    @property
    def card_json(self) -> Path:
        return self.card_dir / "card.json"

    def plan_dir(self, name: str) -> Path:
        return self.root / "plan" / name

    def plan_json(self, name: str) -> Path:
        return self.plan_dir(name) / "plan.json"

    def train_dir(self, name: str) -> Path:
        return self.root / "train" / name

    def adapter_dir(self, name: str) -> Path:
        return self.train_dir(name) / "adapter"

    def train_metrics(self, name: str) -> Path:
        return self.train_dir(name) / "train_metrics.json"

    @property
    def trim_dir(self) -> Path:
        return self.root / "trim"

    @property
    def trim_json(self) -> Path:
        return self.trim_dir / "trim.json"

    @property
    def trimmed_adapter(self) -> Path:
        return self.trim_dir / "adapter-trimmed"

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    def eval_json(self, name: str) -> Path:
        return self.eval_dir(name) / "eval.json"

    @property
    def report_record(self) -> Path:
        return self.root / REPORT_STAGE_FILE


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_hash(path: Path) -> str:
    """Hash of a JSON artifact without its provenance and timings (when it was made, how long it took), so
    a stage rerun that reproduces the same content does not invalidate the stages downstream of it."""
    obj = read_json(path)
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in ("provenance", "timings")}
    return sha256_json(obj)


def _folder_hash(folder: Path) -> str:
    """sha256 over a folder's relative file names and bytes (adapters: KB to a few MB)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder)}\n".encode())
        h.update(_file_hash(f).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageResult:
    """What one stage did in this invocation: ``ran``, ``resumed`` or ``skipped`` (inputs unchanged)."""

    stage: str
    status: str
    seconds: float
    folder: str
    fingerprint: str
    rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "folder": self.folder,
            "fingerprint": self.fingerprint,
            "summary": dict(self.rows),
        }


StageCallback = Callable[[str, str, "StageResult | None"], None]


def stage_fingerprint(kind: str, config: Any, inputs: Mapping[str, Any]) -> str:
    """sha256 of the stage kind, its config and its input artifacts' hashes."""
    return sha256_json({"stage": kind, "version": STAGE_VERSION, "config": config, "inputs": dict(inputs)})


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path, kind=STAGE_KIND)
    except LayercardError:
        return None


def _write_record(path: Path, **fields: Any) -> None:
    write_json(path, {"kind": STAGE_KIND, "schema_version": SCHEMA_VERSION, **fields})


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return format(x, spec)


def _layers_text(layers: Sequence[int]) -> str:
    return (
        f"{len(layers)}: {list(layers)}" if len(layers) <= 12 else f"{len(layers)}: {layers[0]}–{layers[-1]}"
    )


class _Runner:
    """Runs the stages of one config in one folder over one lazily loaded model."""

    def __init__(
        self, cfg: RunConfig, root: Path, *, progress: bool | None, on_stage: StageCallback | None
    ) -> None:
        self.cfg = cfg
        self.out = RunLayout(root)
        self.progress = progress
        self.on_stage = on_stage
        self.results: list[StageResult] = []
        self._loaded: Any = None
        self._model_hash: str | None = None
        self.train_task, self.eval_task = self._tasks()
        self.trim_task, self.trim_note = self._trim_task()

    # ---- inputs ------------------------------------------------------------------------------------
    def _tasks(self) -> tuple[Any, Any]:
        from layercard.tasks import load_task

        t = self.cfg.task
        src = self.cfg.source
        try:
            train_task = load_task(t.train, split=t.train_split, seed=self.cfg.seed)
        except LayercardError as e:
            raise LayercardError(f"{src}: task.train: {e}") from None
        try:
            if t.eval is None and t.eval_split is None:
                eval_task = _held_out(t.train, train_task.split, self.cfg.seed)
            else:
                eval_task = load_task(t.eval or t.train, split=t.eval_split, seed=self.cfg.seed)
        except LayercardError as e:
            raise LayercardError(f"{src}: task.eval: {e}") from None
        if len(train_task) == 0 or len(eval_task) == 0:
            which = "train" if len(train_task) == 0 else "eval"
            raise LayercardError(f"{src}: task.{which}: no examples")
        return train_task, eval_task

    def _trim_task(self) -> tuple[Any, str]:
        """Boundary selection on eval-split examples the final evaluation does not score, when there are."""
        n = self.cfg.eval.examples
        want = self.cfg.trim.config.examples if self.cfg.trim.config is not None else None
        split = self.eval_task.split
        if n is not None and len(self.eval_task) > n:
            rest = self.eval_task.subset(None, seed=self.cfg.seed, offset=n)
            used = len(rest) if want is None else min(want, len(rest))
            return rest, f"{used} {split} examples held out from eval"
        # Evaluating the whole split leaves nothing held out: the boundary is then chosen on the
        # examples it is scored on, which flatters the trimmed adapter; the summary says so.
        return self.eval_task, f"the eval examples themselves ({split}: none held out)"

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            from layercard.models import load_model

            device = self.cfg.device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._loaded = load_model(
                self.cfg.model,
                dtype=self.cfg.dtype,
                device=device,
                trust_remote_code=self.cfg.trust_remote_code,
            )
            self._model_hash = self._loaded.model_hash
        return self._loaded

    @property
    def model_hash(self) -> str:
        """The weights' hash without loading the model where the weights are a local folder."""
        if self._model_hash is None:
            from layercard import models

            spec = self.cfg.model
            path = Path(spec).expanduser()
            folder: Path | None = None
            if spec in models.BUILTIN_MODELS:
                folder = models.builtin_path(spec)
            elif path.is_dir():
                folder = path
            if folder is not None and any(folder.glob("*.safetensors")):
                # the same memoised hash load_model records (sha256 of the safetensors files)
                self._model_hash = models._folder_hash(folder)
            else:
                self._model_hash = self.loaded.model_hash
        return self._model_hash

    # ---- the stage mechanism ----------------------------------------------------------------------
    def stage(
        self,
        name: str,
        kind: str,
        folder: Path,
        config: Any,
        inputs: Mapping[str, Any],
        outputs: Sequence[Path],
        fn: Callable[[bool], None],
        summarize: Callable[[], list[tuple[str, str]]],
        *,
        record: Path | None = None,
        owns_folder: bool = True,
    ) -> StageResult:
        """Run ``fn(resume)`` unless the recorded fingerprint matches and every output exists."""
        record = record or folder / STAGE_FILE
        fp = stage_fingerprint(kind, config, inputs)
        old = _read_record(record)
        done = old is not None and old.get("fingerprint") == fp and old.get("status") == "done"
        if done and all(p.exists() for p in outputs):
            result = StageResult(name, "skipped", 0.0, str(folder), fp, summarize())
            self._emit("end", name, result)
            return result
        resume = old is not None and old.get("fingerprint") == fp and old.get("status") == "running"
        if owns_folder and folder.exists() and not resume:
            shutil.rmtree(folder)  # outputs of other settings: nothing in them may leak into this run
        folder.mkdir(parents=True, exist_ok=True)
        self._emit("start", name, None)
        t0 = time.perf_counter()
        base = {"stage": name, "fingerprint": fp, "config": config, "inputs": dict(inputs)}
        _write_record(record, status="running", **base)
        try:
            fn(resume)
        except LayercardError as e:  # say which stage failed; the record stays "running" for a resume
            raise LayercardError(f"stage {name}: {e}", exit_code=e.exit_code) from e
        seconds = time.perf_counter() - t0
        rel = [str(p.relative_to(self.out.root)) for p in outputs]
        _write_record(record, status="done", outputs=rel, wall_time_s=round(seconds, 3), **base)
        result = StageResult(name, "resumed" if resume else "ran", seconds, str(folder), fp, summarize())
        self._emit("end", name, result)
        return result

    def _emit(self, event: str, name: str, result: StageResult | None) -> None:
        if result is not None:
            self.results.append(result)
        if self.on_stage is not None:
            self.on_stage(event, name, result)

    # ---- card ---------------------------------------------------------------------------------------
    def card(self) -> None:
        from layercard.card import Card

        out = self.out
        config = dataclasses.asdict(self.cfg.card)

        def fn(_resume: bool) -> None:
            from layercard.artifacts import write_text
            from layercard.card import compute_card
            from layercard.card.figures import write_all
            from layercard.card.summary import card_markdown

            card = compute_card(self.loaded, self.train_task, self.cfg.card, progress=self.progress)
            write_all(card, out.card_dir)
            write_text(out.card_dir / "card.md", card_markdown(card))
            card.save(out.card_json)  # last: its presence means the stage finished

        def summarize() -> list[tuple[str, str]]:
            from layercard.card.summary import top_layers

            card = Card.load(out.card_json)
            rows = [
                ("model", f"{card.model['id']} ({card.n_layers} layers)"),
                ("probe", f"{card.task['n_examples']} examples, {card.n_target_tokens} target tokens"),
                ("probe loss", _fmt(card.loss)),
                (f"top-5 layers by {card.default_score}", str(top_layers(card, card.default_score))),
                ("coupling", "measured" if card.coupling else "not measured"),
                ("cost model", "calibrated" if card.cost else "not calibrated"),
            ]
            return rows + [("time", ", ".join(f"{k} {v:.1f}s" for k, v in card.timings.items()))]

        inputs = {"model": self.model_hash, "data": self.train_task.data_hash}
        self.stage("card", "card", out.card_dir, config, inputs, [out.card_json], fn, summarize)

    # ---- plan ---------------------------------------------------------------------------------------
    def plan(self, p: PlacementSpec) -> None:
        from layercard.plan import Plan

        out = self.out
        path = out.plan_json(p.name)

        def fn(_resume: bool) -> None:
            from layercard.card import Card
            from layercard.plan import make_plan

            card = Card.load(out.card_json)
            make_plan(card, p.plan, card_path=str(out.card_json.resolve())).save(path)

        def summarize() -> list[tuple[str, str]]:
            plan = Plan.load(path)
            pr = plan.predicted
            frac = pr.get("fraction")
            rows = [
                (
                    "policy",
                    f"{plan.config['policy']}"
                    + (f" ({plan.config['budget']})" if plan.config["budget"] else ""),
                ),
                ("layers", _layers_text(plan.layers)),
                ("adapted modules", str(pr.get("modules"))),
                ("trainable params", f"{pr.get('params', 0):,}"),
                (f"predicted gain ({pr.get('score')})", _fmt(pr.get("gain"))),
                ("of all-layer gain", "—" if frac is None else f"{100 * frac:.1f}%"),
                ("predicted s/step", _fmt(pr.get("step_time_s"), ".3g")),
            ]
            return rows + [("warning", w) for w in plan.warnings]

        config = {**p.to_dict(), "seed": p.plan.seed}
        inputs = {"card": _content_hash(out.card_json)}
        self.stage(f"plan:{p.name}", "plan", out.plan_dir(p.name), config, inputs, [path], fn, summarize)

    # ---- train --------------------------------------------------------------------------------------
    def train(self, p: PlacementSpec) -> None:
        out = self.out
        folder = out.train_dir(p.name)
        val = self.eval_task if self.cfg.train.eval_examples else None

        def fn(resume: bool) -> None:
            from layercard.plan import Plan
            from layercard.train import latest_checkpoint, train

            plan = Plan.load(out.plan_json(p.name))
            resume = resume and latest_checkpoint(folder) is not None
            train(
                self.loaded,
                plan,
                self.train_task,
                val,
                self.cfg.train,
                folder,
                resume=resume,
                progress=self.progress,
            )

        def summarize() -> list[tuple[str, str]]:
            m = read_json(out.train_metrics(p.name))
            rows = [
                ("steps", f"{m['steps']} ({m['epochs']:.2f} epochs)"),
                ("trainable params", f"{m['trainable_params']:,}"),
                (
                    "s/step measured / predicted (at these tokens/step)",
                    f"{_fmt(m['s_per_step'], '.3f')} / "
                    f"{_fmt(m.get('predicted_step_time_scaled_s') or m.get('predicted_step_time_s'), '.3f')}",
                ),
                ("train loss first → last", f"{_fmt(m['first_train_loss'])} → {_fmt(m['final_train_loss'])}"),
                ("final val loss", _fmt(m.get("final_val_loss"))),
                (f"peak memory ({m['peak_memory_kind']})", f"{m['peak_memory_mib']:,.0f} MiB"),
            ]
            if m.get("resumed_from") is not None:
                rows.append(("resumed from step", str(m["resumed_from"])))
            return rows

        inputs = {
            "plan": _content_hash(out.plan_json(p.name)),
            "model": self.model_hash,
            "train_data": self.train_task.data_hash,
            "val_data": val.data_hash if val is not None else None,
        }
        outputs = [out.adapter_dir(p.name), out.train_metrics(p.name)]
        self.stage(
            f"train:{p.name}", "train", folder, self.cfg.train.to_dict(), inputs, outputs, fn, summarize
        )

    # ---- trim ---------------------------------------------------------------------------------------
    def trim_target(self) -> str:
        """The placement to trim: the configured one, else the one whose plan adapts the most layers."""
        if self.cfg.trim.placement is not None:
            return self.cfg.trim.placement
        sizes = [
            (len(read_json(self.out.plan_json(p.name))["layers"]), -i, p.name)
            for i, p in enumerate(self.cfg.placements)
        ]
        return max(sizes)[2]

    def trim(self, target: str) -> None:
        out = self.out
        spec = self.cfg.trim

        def fn(_resume: bool) -> None:
            from layercard.trim import trim

            trim(
                self.loaded,
                out.adapter_dir(target),
                self.trim_task,
                spec.config,
                out.trim_dir,
                progress=self.progress,
            )

        def summarize() -> list[tuple[str, str]]:
            t = read_json(out.trim_json)
            b, a = t["before"], t["after"]
            metric = t["metric"]

            def val(row: dict[str, Any]) -> Any:
                return row.get("loss") if metric == "loss" else row["metrics"].get(metric)

            return [
                ("placement", target),
                ("selected on", self.trim_note),
                ("candidates", ", ".join(f"{k}={v}" for k, v in (t.get("candidates") or {}).items()) or "—"),
                ("boundaries swept", str(t["ks"])),
                ("chosen K", f"{t['chosen_k']} (adapters kept in layers ≤ K)"),
                (f"{metric} before → after", f"{_fmt(val(b))} → {_fmt(val(a))}"),
                ("adapted layers before → after", f"{b['n_adapted_layers']} → {a['n_adapted_layers']}"),
                ("adapted modules before → after", f"{b['adapted_modules']} → {a['adapted_modules']}"),
                (
                    "s/example before → after",
                    f"{_fmt(b['s_per_example'], '.3f')} → {_fmt(a['s_per_example'], '.3f')}",
                ),
            ]

        config = {**spec.to_dict(), "placement": target, "seed": self.cfg.seed}
        inputs = {
            "adapter": _folder_hash(out.adapter_dir(target)),
            "model": self.model_hash,
            "data": self.trim_task.data_hash,
        }
        outputs = [out.trim_json, out.trimmed_adapter]
        self.stage("trim", "trim", out.trim_dir, config, inputs, outputs, fn, summarize)

    # ---- eval ---------------------------------------------------------------------------------------
    def evaluate(self, name: str, adapter: Path | None) -> None:
        from layercard.evaluate import EvalResult

        out = self.out
        folder = out.eval_dir(name)

        def fn(_resume: bool) -> None:
            from layercard.evaluate import evaluate

            res = evaluate(
                self.loaded, self.eval_task, self.cfg.eval, adapter=adapter, progress=self.progress
            )
            res.save(folder)

        def summarize() -> list[tuple[str, str]]:
            r = EvalResult.load(out.eval_json(name))
            rows = [
                (m + (" (primary)" if i == 0 else ""), _fmt(v)) for i, (m, v) in enumerate(r.metrics.items())
            ]
            return rows + [
                ("loss", _fmt(r.loss)),
                ("examples", str(r.n)),
                ("s/example", _fmt(r.timing.get("s_per_example"), ".3f")),
            ]

        inputs = {
            "model": self.model_hash,
            "data": self.eval_task.data_hash,
            "adapter": _folder_hash(adapter) if adapter is not None else None,
        }
        outputs = [out.eval_json(name)]
        self.stage(f"eval:{name}", "eval", folder, self.cfg.eval.to_dict(), inputs, outputs, fn, summarize)

    # ---- report -------------------------------------------------------------------------------------
    def report(self) -> None:
        from layercard import report

        out = self.out
        html, md = out.root / report.HTML_FILE, out.root / report.MD_FILE

        def fn(_resume: bool) -> None:
            report.build_report(out.root)

        def summarize() -> list[tuple[str, str]]:
            return [("html", str(html.resolve())), ("markdown", str(md.resolve()))]

        inputs = {str(p.relative_to(out.root)): _file_hash(p) for p in report.report_inputs(out.root)}
        config = {"report_version": report.REPORT_VERSION}
        self.stage(
            "report",
            "report",
            out.root,
            config,
            inputs,
            [html, md],
            fn,
            summarize,
            record=out.report_record,
            owns_folder=False,
        )


def _held_out(spec: str, train_split: str, seed: int) -> Any:
    """The validation split of a preset/synthetic/HF task, else its test split; never the train split."""
    from layercard.tasks import load_task

    if spec.endswith(".jsonl") or Path(spec).exists():
        raise LayercardError(f"{spec}: a file has no held-out split; give task.eval (and task.eval_split)")
    if spec.startswith("hf:"):
        base = spec
    else:  # drop a split named in the spec (NAME:SPLIT, synthetic:NAME:SPLIT)
        base = ":".join(spec.split(":")[: 2 if spec.startswith("synthetic:") else 1])
    for candidate in ("validation", "test"):
        if candidate == train_split:
            continue
        try:
            return load_task(base, split=candidate, seed=seed)
        except LayercardError:
            continue
    raise LayercardError(f"{spec}: found no validation or test split; give task.eval_split")


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------


def choose_threads(setting: int | str) -> int:
    """Torch intra-op threads for a run: the number given, or for ``auto`` the cores left idle.

    On a shared CPU, OpenMP threads beyond the idle cores spin-wait on their busy siblings: measured on
    2 cores with one other busy process, a SmolLM2 forward+backward took 17-23 s on 2 threads and 6-8 s
    on 1. ``auto`` therefore takes the cores minus the 1-minute load average at the start (at least 1,
    at most torch's default).
    """
    import os

    import torch

    default = torch.get_num_threads()
    if setting != "auto":
        return int(setting)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: keep torch's default
        return default
    idle = (os.cpu_count() or default) - round(busy)
    return max(1, min(default, idle))


def run_pipeline(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    progress: bool | None = None,
    on_stage: StageCallback | None = None,
) -> dict[str, Any]:
    """Run every stage of ``cfg`` in ``run_dir``, skipping those whose inputs are unchanged.

    ``on_stage(event, name, result)`` is called with ``("start", name, None)`` before a stage runs and
    ``("end", name, result)`` after it ran or was skipped. Returns the run summary (also written to
    ``summary.json``): each stage's status and the headline numbers of every placement.
    """
    t0 = time.perf_counter()
    root = Path(run_dir)
    import torch

    runner = _Runner(cfg, root, progress=progress, on_stage=on_stage)  # loads the tasks: may raise
    try:
        _ = runner.model_hash  # an unknown model fails here, before the run folder exists
    except LayercardError as e:
        raise LayercardError(f"{cfg.source}: model: {e}", exit_code=e.exit_code) from None
    if root.exists() and not root.is_dir():
        raise LayercardError(f"{root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    # No paths or times in run.json: its hash is one of the report's inputs.
    write_json(
        runner.out.run_json, {"kind": RUN_KIND, "schema_version": SCHEMA_VERSION, "config": cfg.to_dict()}
    )

    threads_before = torch.get_num_threads()
    threads = choose_threads(cfg.threads)
    torch.set_num_threads(threads)
    try:
        runner.card()
        for p in cfg.placements:
            runner.plan(p)
        for p in cfg.placements:
            runner.train(p)
        target = None
        if cfg.trim.enabled:
            target = runner.trim_target()
            runner.trim(target)
        if cfg.eval_base:
            runner.evaluate("base", None)
        for p in cfg.placements:
            runner.evaluate(p.name, runner.out.adapter_dir(p.name))
        if target is not None:
            runner.evaluate("trimmed", runner.out.trimmed_adapter)
        runner.report()
    finally:
        torch.set_num_threads(threads_before)

    from layercard.report import collect_results

    results = collect_results(root)
    summary = {
        "kind": SUMMARY_KIND,
        "schema_version": SCHEMA_VERSION,
        "run_dir": str(root),
        "config": cfg.source,
        "model": cfg.model,
        "task": {
            "train": runner.train_task.describe()["name"],
            "train_split": runner.train_task.split,
            "eval_split": runner.eval_task.split,
        },
        "stages": [r.to_dict() for r in runner.results],
        "ran": [r.stage for r in runner.results if r.status != "skipped"],
        "skipped": [r.stage for r in runner.results if r.status == "skipped"],
        "primary_metric": results["primary_metric"],
        "rows": results["rows"],
        "report": {
            "html": str((root / "report.html").resolve()),
            "markdown": str((root / "report.md").resolve()),
        },
        "threads": threads,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    write_json(runner.out.summary_json, summary)
    return summary
