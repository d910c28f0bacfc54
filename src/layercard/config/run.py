"""Settings of a whole run (``layercard run``): its top-level keys, the task, and each stage section.

A run config is YAML with the sections ``task``, ``card``, ``placements``, ``train``, ``trim`` and
``eval``. Each section's keys are the YAML settings of one stage config (plus a few run-level keys:
``trim.enabled``, ``trim.placement``, ``eval.base``, a placement's ``name``), so the run schema is
assembled here from the stage schemas rather than written again. :func:`reference_yaml` renders every
key at its default with its help: ``configs/reference.yaml`` is that text (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from layercard.config.card import CardConfig
from layercard.config.evaluate import EvalConfig
from layercard.config.plan import PlanConfig
from layercard.config.schema import ConfigError, Schema, setting, spec_of, to_jsonable
from layercard.config.train import DTYPES, TrainConfig
from layercard.config.trim import TrimConfig
from layercard.tasks.presets import TRAIN_TURNS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_NAMES = ("base", "trimmed")  # the eval folders of the base model and the trimmed adapter
# The trimmed adapter's row is named after its placement with this suffix, so no placement ends in it.
TRIMMED_SUFFIX = "-trimmed"


@dataclasses.dataclass(frozen=True)
class RunSettings(Schema):
    """The run's top-level keys: one model, one seed, where and how it runs."""

    SECTION = ""

    model: str = setting(
        "smollm2", kind="str", help="built-in name, local Hugging Face folder, .gguf file, or a cached hub id"
    )
    seed: int = setting(
        0,
        kind="seed",
        help="one seed for probe subsets, planning, LoRA init, data order, eval, synthetic task generation",
    )
    dtype: str = setting("float32", kind="choice", choices=DTYPES, help="weights dtype of the loaded model")
    device: str = setting("auto", kind="str", help="auto | cpu | cuda | cuda:N | mps")
    trust_remote_code: bool = setting(False, kind="bool", help="allow the model folder's own code")
    threads: int | str = setting(
        "auto", kind="threads", help="torch threads; auto: the cores other processes leave idle (at least 1)"
    )

    def validate(self) -> None:
        # checked with the rest of the config, not when the model loads after the work before it
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise self.fail("device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


def parse_fields(items: Any, where: str) -> dict[str, str]:
    """A field map from ``NAME=COLUMN`` items (a list, or one comma-separated string) or a mapping."""
    if isinstance(items, str) and items.lstrip().startswith("{"):  # a mapping's text (_fields_text)
        try:
            items = json.loads(items)
        except ValueError:
            raise ConfigError(where, f"must be NAME=COLUMN items or a mapping, got {items!r}") from None
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        texts = items.split(",") if isinstance(items, str) else items
        if not isinstance(texts, (list, tuple)):
            raise ConfigError(where, f"must be NAME=COLUMN items or a mapping, got {items!r}")
        pairs = []
        for text in texts:
            name, sep, column = str(text).partition("=")
            if not sep:
                raise ConfigError(where, f"{str(text)!r} is not NAME=COLUMN (e.g. input=question)")
            pairs.append((name.strip(), column.strip()))
    out: dict[str, str] = {}
    for name, column in pairs:
        if not name or not isinstance(column, str) or not column:
            raise ConfigError(where, f"{name}={column!r}: give a field name and a column name")
        if name in out:
            raise ConfigError(where, f"field {name!r} is mapped twice")
        out[name] = column
    return out


@dataclasses.dataclass(frozen=True)
class TaskSpec(Schema):
    """Where training and evaluation data come from, how their fields are read and how they are prompted.

    ``eval`` defaults to ``train``. With ``eval_split`` null, an eval task that names no split of its
    own is read on its validation split, else its test split (never the training split); a data file is
    read whole. A run refuses eval data equal to its training data. ``fields``, ``prompt``, ``system``,
    ``chat_template`` and ``train_turns`` apply to both; :meth:`load_kwargs` gives them as ``load_task``
    keywords.
    """

    SECTION = "task"

    train: str = setting(
        kind="str",
        help="data file (JSONL, JSON, CSV, TSV, Parquet), folder of one such file a split or saved "
        "dataset folder (FOLDER[:SPLIT]), PRESET:SPLIT "
        "(gsm8k:train), synthetic:facts|format, hf:NAME[:CONFIG] (from the local Hugging Face cache)",
    )
    train_split: str | None = setting(
        None, kind="str", help="split of a preset/synthetic task or dataset folder; null: train"
    )
    eval: str | None = setting(None, kind="str", help="null: the training task ...")
    eval_split: str | None = setting(
        None,
        kind="str",
        help="... on its validation split, else its test split (also for a task.eval named without a split; "
        "a file is read whole); never the training data",
    )
    fields: str | None = setting(
        None,
        kind="str",
        help="where fields are read: {input: question, target: answer}; null: own names",
    )
    prompt: str | None = setting(
        None, kind="str", help="prompt template with {input}, or @FILE; null: the preset's"
    )
    system: str | None = setting(None, kind="str", help="system prompt, or @FILE; null: none")
    chat_template: bool | None = setting(
        None, kind="bool", help="render prompts with the model's chat template; null: on (off for plain text)"
    )
    train_turns: str | None = setting(
        None,
        kind="choice",
        choices=TRAIN_TURNS,
        help="chat data: the assistant turns that carry loss, all or last (the final reply alone); null: all",
    )

    @classmethod
    def prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A YAML mapping or list of ``fields`` becomes its ``NAME=COLUMN,...`` text."""
        raw = values.get("fields")
        if raw is not None and not isinstance(raw, str):
            values = {**values, "fields": _fields_text(parse_fields(raw, f"{cls.SECTION}.fields"))}
        return values

    def validate(self) -> None:
        if self.fields is not None:
            parse_fields(self.fields, f"{self.SECTION}.fields")

    def load_kwargs(self) -> dict[str, Any]:
        """The ``load_task`` keywords of these settings (field map and prompt); unset ones are left out."""
        kw: dict[str, Any] = {}
        if self.fields is not None:
            kw["field_map"] = parse_fields(self.fields, f"{self.SECTION}.fields")
        for name in ("prompt", "system", "chat_template", "train_turns"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw


def _fields_text(fmap: dict[str, str]) -> str:
    """A field map as one setting's text: ``NAME=COLUMN,...``, or JSON where a column holds a comma."""
    if any("," in v or "=" in k for k, v in fmap.items()):
        return json.dumps(fmap, ensure_ascii=False)
    return ",".join(f"{k}={v}" for k, v in fmap.items())


@dataclasses.dataclass(frozen=True)
class PlacementName(Schema):
    """The run-level key of a placement: its name, which names its folders."""

    SECTION = "placement"

    name: str = setting(
        kind="str", help="folder name: letters, digits, _ . - ; not base or trimmed, not ending in -trimmed"
    )

    def validate(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise self.fail(
                "name", f"{self.name!r} must be 1-64 letters, digits, '_', '.' or '-' (it names a folder)"
            )
        if self.name.lower() in RESERVED_NAMES:  # a folder name, and folders may ignore case
            raise self.fail("name", f"{self.name!r} is reserved; choose another")
        if self.name.lower().endswith(TRIMMED_SUFFIX):
            raise self.fail(
                "name",
                f"{self.name!r} ends in {TRIMMED_SUFFIX}, which names trimmed adapters; choose another",
            )


@dataclasses.dataclass(frozen=True)
class TrimStage(Schema):
    """The run-level keys of the trim section."""

    SECTION = "trim"

    enabled: bool = setting(True, kind="bool", help="`trim: false` switches the stage off")
    placement: str | None = setting(
        None, kind="str", help="which trained placement; null: the one adapting the most layers"
    )


@dataclasses.dataclass(frozen=True)
class EvalStage(Schema):
    """The run-level keys of the eval section."""

    SECTION = "eval"

    base: bool = setting(
        True, kind="bool", help="also evaluate the base model: loss drops are measured from it"
    )


# (YAML key, run-level schema or None, stage schema or None, comment) in file order.
SECTIONS: tuple[tuple[str, type[Schema] | None, type[Schema] | None, str], ...] = (
    ("task", TaskSpec, None, "or just `task: synthetic:facts`"),
    ("card", None, CardConfig, "the Layer Card (layercard card)"),
    ("placements", PlacementName, PlanConfig, "at least one; each is planned, trained, evaluated, compared"),
    ("train", None, TrainConfig, "applies to every placement (layercard train)"),
    ("trim", TrimStage, TrimConfig, "boundary layer and trimming (layercard trim)"),
    ("eval", EvalStage, EvalConfig, "every placement, the trimmed adapter and the base model"),
)
# Values shown for required keys, which have no default.
_EXAMPLES = {
    ("task", "train"): "synthetic:facts",
    ("placements", "name"): "all",
    ("placements", "policy"): "all",
}
_COMMENT_COLUMN = 26
# Help that says more in a run config than the stage's own (which its command shares).
_RUN_HELP = {
    ("trim", "examples"): "examples scored at each K, from the eval split's examples that eval.examples "
    "leaves out; where it leaves none (eval.examples null), the boundary is chosen on the examples "
    "evaluated; null: all",
}


def _yaml_value(v: Any) -> str:
    import yaml

    text = yaml.safe_dump(to_jsonable(v), default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


# Keys a run sets for itself when they are left out: written commented out, since a value in the file would
# pin them (and --set of the key they go with would then conflict).
_DERIVED = {
    ("card", "calibrate_dropout"): "left out, it is the placements' dropout where they share one",
    ("card", "calibrate_checkpointing"): "left out, it is train.gradient_checkpointing",
    ("card", "weight_snr"): "left out here so that such a run can turn it on",
    ("train", "steps"): "left out, 100 unless epochs is given",
}


def _lines(section: str, schema: type[Schema], indent: str, first_prefix: str | None = None) -> list[str]:
    out = []
    for f in schema.settings(yaml_only=True):
        spec = spec_of(f)
        assert spec is not None
        value = _EXAMPLES.get((section, f.name), f.default)
        prefix = first_prefix if (first_prefix is not None and not out) else indent
        derived = _DERIVED.get((section, f.name))
        key = f"# {f.name}" if derived else f.name
        text = f"{prefix}{key}: {_yaml_value(value)}"
        choices = spec.choice_list()
        note = _RUN_HELP.get((section, f.name), spec.help) + (
            f" ({' | '.join(choices)})" if choices and spec.kind == "choice" else ""
        )
        if derived:
            note += f"; {derived}"
        elif f.default is dataclasses.MISSING:
            note += "; required (an example here)"
        elif value != f.default:
            note += f"; an example here, the default is {_yaml_value(f.default)}"
        out.append(f"{text.ljust(_COMMENT_COLUMN - 1)} # {note}")
    return out


def reference_yaml() -> str:
    """Every key of a run config at its default, with its help: the text of ``configs/reference.yaml``."""
    lines = [
        "# Every key of a `layercard run` config at its default, generated from the stage settings",
        "# (layercard.config); a test keeps them equal. Unknown keys are errors; 1e-3 is a number.",
        "# Override any key from the command line: `layercard run this.yaml --set train.steps=10`.",
        "# Relative paths (model folder, task files) are read from this file's folder; --set paths",
        "# from the current folder. A key given twice is an error.",
        "",
        *_lines("", RunSettings, ""),
    ]
    for key, run_schema, stage_schema, comment in SECTIONS:
        lines += ["", f"{f'{key}:'.ljust(_COMMENT_COLUMN - 1)} # {comment}"]
        if key == "placements":
            assert run_schema is not None and stage_schema is not None
            lines += _lines(key, run_schema, "    ", first_prefix="  - ")
            lines += _lines(key, stage_schema, "    ")
            continue
        for schema in (run_schema, stage_schema):
            if schema is not None:
                lines += _lines(key, schema, "  ")
    return "\n".join(lines) + "\n"
