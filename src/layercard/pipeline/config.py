"""The run config: YAML loading and validation into the typed config of every stage (docs/design.md §1).

A run is described by one YAML config (:func:`load_config`), validated in full before anything runs:
every error names the file and the key (``config.yaml: train.steps: must be a positive integer, got -3``)
and unknown keys are errors. Each section is checked by the stage's own settings schema
(``layercard.config``); this module only assembles them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from layercard.config import CardConfig, EvalConfig, PlanConfig, TrainConfig, TrimConfig
from layercard.config.run import EvalStage, PlacementName, RunSettings, TaskSpec, TrimStage
from layercard.config.schema import ConfigError, Schema, unknown_key
from layercard.errors import LayercardError
from layercard.pipeline.overrides import apply_overrides, origin_text, parse_yaml

__all__ = [
    "PlacementSpec",
    "RunConfig",
    "TaskSpec",
    "TrimSpec",
    "apply_overrides",
    "demo_config_path",
    "load_config",
    "parse_config",
]

_SECTIONS = ("task", "card", "placements", "train", "trim", "eval")
_TOP_KEYS = [*(f.name for f in RunSettings.settings(yaml_only=True)), *_SECTIONS]


@dataclasses.dataclass(frozen=True)
class PlacementSpec:
    """One placement to plan, train and compare: a name (its folder) and the planner's config."""

    name: str
    plan: PlanConfig

    def __post_init__(self) -> None:
        PlacementName(name=self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.plan.to_dict(yaml_only=True)}


@dataclasses.dataclass(frozen=True)
class TrimSpec:
    """Which trained placement to trim (default: the one with the most layers) and the sweep settings."""

    enabled: bool = True
    placement: str | None = None
    config: TrimConfig = dataclasses.field(default_factory=TrimConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "placement": self.placement, **self.config.to_dict(yaml_only=True)}


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
    # the config file, resolved (None for a config not read from a file), and the --set overrides on it
    path: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.placements:
            raise ConfigError("placements", "list at least one placement")
        names = [p.name for p in self.placements]
        folded = [n.lower() for n in names]  # names are folders, and folders may ignore case
        dup = next((n for n, f in zip(names, folded, strict=True) if folded.count(f) > 1), None)
        if dup is not None:
            same = [n for n, f in zip(names, folded, strict=True) if f == dup.lower()]
            if len(set(same)) == 1:
                raise ConfigError("placements", f"name {dup!r} is used twice; names must be unique")
            raise ConfigError(
                "placements",
                f"names {' and '.join(map(repr, same))} differ only in case; names must be unique",
            )
        if self.trim.enabled and self.trim.placement is not None and self.trim.placement not in names:
            raise ConfigError(
                "trim.placement",
                f"{self.trim.placement!r} is not a placement; placements: {', '.join(names)}",
            )

    def origin(self, *keys: str) -> str:
        """Where the value of ``keys`` (dotted, as errors name them) came from, to start a message with
        (:func:`~layercard.pipeline.overrides.origin_text`)."""
        return origin_text(keys, self.overrides, [p.name for p in self.placements], self.source)

    def placement(self, name: str) -> PlacementSpec:
        """The placement called ``name``."""
        return next(p for p in self.placements if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (every default filled in), as YAML/JSON would write it."""
        return {
            "model": self.model,
            "task": self.task.to_dict(),
            "seed": self.seed,
            "dtype": self.dtype,
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
            "threads": self.threads,
            "card": self.card.to_dict(yaml_only=True),
            "placements": [p.to_dict() for p in self.placements],
            "train": self.train.to_dict(yaml_only=True),
            "trim": self.trim.to_dict(),
            "eval": {"base": self.eval_base, **self.eval.to_dict(yaml_only=True)},
        }


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _two_part(
    where: str, raw: Any, run_schema: type[Schema], stage_schema: type[Schema], seed: int
) -> tuple[Any, Any]:
    """A section holding run-level keys beside a stage's settings: check the union, build both."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"must be a mapping of keys to values, got {type(raw).__name__}")
    run_keys = [f.name for f in run_schema.settings(yaml_only=True)]
    stage_keys = [f.name for f in stage_schema.settings(yaml_only=True)]
    for key in raw:
        if not isinstance(key, str) or key not in (*run_keys, *stage_keys):
            raise unknown_key(f"{where}.", str(key), [*run_keys, *stage_keys], raw[key])
    run = run_schema.from_mapping({k: raw[k] for k in run_keys if k in raw}, where=where)
    stage = stage_schema.from_mapping({k: raw[k] for k in stage_keys if k in raw}, where=where, seed=seed)
    return run, stage


def _placement(i: int, raw: Any, seed: int) -> PlacementSpec:
    where = f"placements[{i}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        where = f"placements[{raw['name']}]"
    named, plan = _two_part(where, raw, PlacementName, PlanConfig, seed)
    return PlacementSpec(named.name, plan)


def _task(raw: Any) -> TaskSpec:
    if isinstance(raw, str):  # shorthand: one task, trained on its train split, evaluated on the held-out one
        return TaskSpec.build("task", train=raw)
    return TaskSpec.from_mapping(raw)


def _card_for(
    card: CardConfig, placements: tuple[PlacementSpec, ...], raw: Any, train: TrainConfig
) -> CardConfig:
    """The card settings a run's placements need: a `spectrum` placement reads the weight SNRs, so they are
    measured unless the config turns them off, which is then an error naming the placement; where every
    placement has the same LoRA dropout, the cost calibration trains with it unless the config sets its
    own (a plan of another dropout says so); and it trains with activation checkpointing as the run's
    training does unless the config sets its own (training says so)."""
    given = raw if isinstance(raw, Mapping) else {}
    dropouts = {p.plan.dropout for p in placements}
    if len(dropouts) == 1 and "calibrate_dropout" not in given:
        card = dataclasses.replace(card, calibrate_dropout=dropouts.pop())
    if "calibrate_checkpointing" not in given:
        card = dataclasses.replace(card, calibrate_checkpointing=train.gradient_checkpointing)
    reader = next((p.name for p in placements if p.plan.policy == "spectrum"), None)
    if reader is None or card.weight_snr:
        return card
    if "weight_snr" in given:
        raise ConfigError(
            "card.weight_snr", f"is false, but placement {reader!r} uses policy spectrum, which reads it"
        )
    return dataclasses.replace(card, weight_snr=True)


def parse_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a config mapping (parsed YAML) into a :class:`RunConfig`; errors start with ``source``."""
    try:
        return _parse(raw, source)
    except LayercardError as e:
        raise LayercardError(f"{source}: {e}") from None


def _parse(raw: Any, source: str) -> RunConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"the config must be a mapping of keys to values, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise unknown_key("", str(key), _TOP_KEYS, raw[key])
    for key in ("task", "placements"):
        if key not in raw:
            raise ConfigError(key, "required key is missing")
    for key in ("card", "train", "trim", "eval"):
        if key in raw and raw[key] is None:  # `train:` with nothing under it
            raise ConfigError(key, "is empty (null): leave the section out for its defaults, or give keys")
    top = RunSettings.from_mapping({k: v for k, v in raw.items() if k not in _SECTIONS}, where="")
    seed = top.seed
    placements_raw = raw["placements"]
    if not isinstance(placements_raw, list) or not placements_raw:
        raise ConfigError("placements", "must be a non-empty list of placements ({name, policy, ...} each)")
    task = _task(raw["task"])
    card = CardConfig.from_mapping(raw.get("card"), seed=seed)
    placements = tuple(_placement(i, p, seed) for i, p in enumerate(placements_raw))
    train = TrainConfig.from_mapping(raw.get("train"), seed=seed)
    card = _card_for(card, placements, raw.get("card"), train)
    trim_raw = raw.get("trim", {})
    if trim_raw is False:  # `trim: false` switches the stage off
        trim_raw = {"enabled": False}
    trim_stage, trim_cfg = _two_part("trim", trim_raw, TrimStage, TrimConfig, seed)
    eval_stage, ev = _two_part("eval", raw.get("eval"), EvalStage, EvalConfig, seed)
    return RunConfig(
        model=top.model,
        task=task,
        placements=placements,
        card=card,
        train=train,
        trim=TrimSpec(enabled=trim_stage.enabled, placement=trim_stage.placement, config=trim_cfg),
        eval=ev,
        eval_base=eval_stage.base,
        seed=seed,
        dtype=top.dtype,
        device=top.device,
        trust_remote_code=top.trust_remote_code,
        threads=top.threads,
        source=source,
    )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a YAML run config. Nothing is written.

    Relative file paths in the file (the model, the task files) are read from the config's folder;
    values given with ``--set`` are read from the current folder, as any command-line path.
    """
    if isinstance(overrides, str):  # one KEY=VALUE, not its characters
        overrides = [overrides]
    p = Path(path)
    if p.is_dir():
        raise LayercardError(f"{p}: is a folder, not a config file")
    if not p.is_file():
        raise LayercardError(f"{p}: no such config file")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LayercardError(f"{p}: not UTF-8 text (byte {e.start})") from None
    raw = parse_yaml(text, str(p))
    if raw is None:
        raise LayercardError(f"{p}: empty config")
    if not isinstance(raw, dict):
        raise LayercardError(f"{p}: the config must be a mapping of keys to values")
    if isinstance(raw.get("kind"), str) and "schema_version" in raw:  # card.json, plan.json: JSON is YAML
        raise LayercardError(
            f"{p}: a layercard {raw['kind']} artifact, not a run config (a YAML file of model, task and "
            "placements: see src/layercard/configs/reference.yaml)"
        )
    sets = tuple(overrides)
    merged = apply_overrides(_resolve_paths(raw, p.parent), sets)
    try:
        cfg = _parse(merged, str(p))
    except LayercardError as e:
        # a bad value given with --set is not in the file: the message names the --set that gave it
        key = e.where if isinstance(e, ConfigError) else ""
        where = origin_text([key], sets, _names(merged), str(p)) if key else str(p)
        raise LayercardError(f"{where}: {e}") from None
    return dataclasses.replace(cfg, path=str(p.resolve()), overrides=sets)


def _names(raw: Mapping[str, Any]) -> list[str | None]:
    """Each placement's name in a config mapping, None where it has none."""
    entries = raw.get("placements")
    if not isinstance(entries, list):
        return []
    return [
        x.get("name") if isinstance(x, Mapping) and isinstance(x.get("name"), str) else None for x in entries
    ]


def _resolve_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``raw`` with its relative model and task paths made absolute from the config's ``folder``."""
    from layercard.models import BUILTIN_MODELS
    from layercard.tasks import folder_split, is_path_spec

    base = folder.resolve()

    def local(value: Any, is_path: bool) -> Any:
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        return str(base / value) if is_path or (base / value).exists() else value

    def task_path(value: Any) -> Any:
        # load_task's own test, from the config's folder: a folder there named like a built-in task
        # (a demo's facts/) leaves the task built in
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        if is_path_spec(value, base) or is_path_spec(value):
            return str(base / value)
        named = folder_split(value, base)  # FOLDER:SPLIT, the folder read from the config's folder
        return f"{base / named[0]}:{named[1]}" if named is not None else value

    out = dict(raw)
    model = out.get("model")
    if isinstance(model, str) and model not in BUILTIN_MODELS:
        out["model"] = local(model, model.startswith(("./", "../")) or model.lower().endswith(".gguf"))
    task = out.get("task")
    if isinstance(task, str):
        out["task"] = task_path(task)
    elif isinstance(task, Mapping):
        out["task"] = {k: _task_path(k, v, local, task_path) for k, v in task.items()}
    return out


def _task_path(
    key: str, value: Any, local: Callable[[Any, bool], Any], task_path: Callable[[Any], Any]
) -> Any:
    """A task setting with its path read from the config's folder: the data files, and a prompt or system
    text given as ``@FILE``."""
    if not isinstance(value, str):
        return value
    if key in ("train", "eval"):
        return task_path(value)
    if key in ("prompt", "system") and value.startswith("@") and len(value) > 1:
        return "@" + local(value[1:], True)
    return value


def demo_config_path() -> Path:
    """The packaged demo config (``layercard/configs/demo.yaml``)."""
    from importlib import resources

    return Path(str(resources.files("layercard") / "configs" / "demo.yaml"))
