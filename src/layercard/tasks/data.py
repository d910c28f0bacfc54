"""Task data: examples, tasks, and :func:`load_task` over JSONL files, presets, synthetic and HF data.

A task spec is one of

- a path to a JSONL file (``input``/``target``/optional ``references`` per line; other keys go to
  ``Example.meta``). Its format comes from ``preset=``, else from the parent folder's name
  (``e2e_nlg``, ``gsm8k``, ``samsum``, ``sst2``), else the generic ``jsonl`` format;
- ``PRESET[:SPLIT]`` for the shipped datasets, found as ``ROOT/PRESET/SPLIT.jsonl`` under the data
  root: ``$LAYERCARD_DATA`` when set, else ``./data``, else ``../shared/data``;
- ``synthetic:facts`` / ``synthetic:format`` (or ``facts`` / ``format``), generated offline from ``seed``;
- ``hf:NAME[:CONFIG]`` with a ``field_map``, through ``datasets.load_dataset`` (needs the network or
  a warm HF cache).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError
from layercard.tasks.example import Example
from layercard.tasks.presets import DATASET_PRESETS, PRESETS, TaskFormat, detect_preset, get_preset
from layercard.tasks.synthetic import make_synthetic
from layercard.tasks.task import Task

__all__ = [
    "Example",
    "Task",
    "data_roots",
    "examples_from_records",
    "expand_references",
    "load_task",
    "read_jsonl",
]

SYNTHETIC_TASKS = ("facts", "format")
_RESERVED = ("id", "input", "target", "references")


# ---------------------------------------------------------------- JSONL and record mapping


def _record_to_example(rec: Any, where: str, default_id: str, field_map: Mapping[str, str] | None) -> Example:
    """Validate one record and turn it into an Example; errors start with ``where`` (FILE:LINE)."""
    if not isinstance(rec, Mapping):
        raise LayercardError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    fmap = dict(field_map or {})
    unknown = set(fmap) - set(_RESERVED)
    if unknown:
        raise LayercardError(f"field_map: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(_RESERVED)}")
    src = {k: fmap.get(k, k) for k in _RESERVED}

    values: dict[str, Any] = {}
    for key in ("input", "target"):
        name = src[key]
        value = rec.get(name)
        if value is None:
            raise LayercardError(f"{where}: field {name!r} missing")
        if not isinstance(value, str):
            raise LayercardError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            # an empty target trains on nothing but the end token; an empty input has no prompt
            raise LayercardError(f"{where}: field {name!r} missing (empty string)")
        values[key] = value

    refs = rec.get(src["references"])
    if refs is None:
        refs = [values["target"]]
    if (
        isinstance(refs, str)
        or not isinstance(refs, Sequence)
        or not refs
        or not all(isinstance(r, str) and r for r in refs)
    ):
        raise LayercardError(f"{where}: field {src['references']!r} must be a non-empty list of strings")

    ex_id = rec.get(src["id"], default_id)
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
        raise LayercardError(f"{where}: field {src['id']!r} must be a string, got {type(ex_id).__name__}")
    used = {src[k] for k in _RESERVED}
    meta = {k: v for k, v in rec.items() if k not in used}
    return Example(
        id=str(ex_id), input=values["input"], target=values["target"], references=tuple(refs), meta=meta
    )


def examples_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    field_map: Mapping[str, str] | None = None,
) -> tuple[Example, ...]:
    """Map records (dicts, or rows of a ``datasets.Dataset``) to examples.

    ``field_map`` names the source column for ``input``, ``target`` and optionally ``references`` and
    ``id``; unmapped keys keep their own names. Other columns go to ``meta``. Errors name
    ``SOURCE:ROW`` (1-based).
    """
    out: list[Example] = []
    seen: set[str] = set()
    for i, rec in enumerate(records, start=1):
        ex = _record_to_example(rec, f"{source}:{i}", f"{Path(source).stem}-{i:05d}", field_map)
        if ex.id in seen:
            raise LayercardError(f"{source}:{i}: duplicate id {ex.id!r}")
        seen.add(ex.id)
        out.append(ex)
    if not out:
        raise LayercardError(f"{source}: no examples")
    return tuple(out)


def read_jsonl(
    path: str | os.PathLike[str], *, field_map: Mapping[str, str] | None = None
) -> tuple[Example, ...]:
    """Read and validate a JSONL file of examples (blank lines allowed); errors name FILE:LINE."""
    p = Path(path)
    if not p.is_file():
        raise LayercardError(f"{p}: no such file")
    examples: list[Example] = []
    seen: set[str] = set()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LayercardError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # split on "\n" only: str.splitlines() also breaks at U+2028, which GSM8K has inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LayercardError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        ex = _record_to_example(rec, where, f"{p.stem}-{lineno:05d}", field_map)
        if ex.id in seen:
            raise LayercardError(f"{where}: duplicate id {ex.id!r}")
        seen.add(ex.id)
        examples.append(ex)
    if not examples:
        raise LayercardError(f"{p}: no examples")
    return tuple(examples)


def expand_references(examples: Sequence[Example]) -> tuple[Example, ...]:
    """One example per reference (ids ``ID#k``), for training on every E2E reference.

    Each copy keeps the full reference list, so scoring is unchanged.
    """
    out: list[Example] = []
    for ex in examples:
        if len(ex.references) == 1:
            out.append(ex)
            continue
        for k, ref in enumerate(ex.references):
            out.append(Example(f"{ex.id}#{k}", ex.input, ref, ex.references, ex.meta))
    return tuple(out)


# ---------------------------------------------------------------- spec resolution


def data_roots() -> list[Path]:
    """Where ``PRESET:SPLIT`` specs are looked up: ``$LAYERCARD_DATA`` alone when set (an explicit choice
    must not silently fall through), else ``./data`` then ``../shared/data`` relative to the CWD."""
    env = os.environ.get("LAYERCARD_DATA")
    if env:
        return [Path(env)]
    return [Path("data"), Path("..") / "shared" / "data"]


def _split_spec(spec: str, split: str | None) -> tuple[str, str | None]:
    """``name:split`` -> (name, split), checking it agrees with an explicit ``split=``."""
    name, _, spec_split = spec.partition(":")
    if spec_split and split and spec_split != split:
        raise LayercardError(f"task {spec!r}: split {spec_split!r} in the spec but split={split!r} given")
    return name, (spec_split or split)


def _resolve_dataset(name: str, split: str | None) -> Path:
    roots = data_roots()
    if split is None:
        # a default split only when it is unambiguous: train if shipped
        for root in roots:
            if (root / name / "train.jsonl").is_file():
                return root / name / "train.jsonl"
        available = sorted({f.stem for r in roots if (r / name).is_dir() for f in (r / name).glob("*.jsonl")})
        hint = f"available: {', '.join(available)}" if available else "no data found"
        raise LayercardError(f"task {name!r}: no split given and no train split ({hint}); use {name}:SPLIT")
    tried = [root / name / f"{split}.jsonl" for root in roots]
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(str(p.resolve()) for p in tried)
    raise LayercardError(f"task {name}:{split}: data file not found; looked in {looked} (set LAYERCARD_DATA)")


def load_task(
    spec: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    preset: str | None = None,
    field_map: Mapping[str, str] | None = None,
    expand_references: bool = False,
) -> Task:
    """Load a task from a spec (see the module docstring).

    ``limit`` keeps a seeded subset (:meth:`Task.subset` with ``seed``) *before* references are
    expanded, so the number of distinct inputs is what ``limit`` says. ``preset`` overrides the
    detected prompt format. ``seed`` also generates the synthetic tasks.
    """
    fmt = get_preset(preset) if preset is not None else None
    spec = str(spec)

    if spec.endswith(".jsonl") or Path(spec).is_file():
        path = Path(spec)
        examples = read_jsonl(path, field_map=field_map)
        fmt = fmt or detect_preset(path)
        name = fmt.name if fmt.name != "jsonl" else path.stem
        task = Task(name, str(path.resolve()), split or path.stem, fmt, examples)
    elif spec.startswith("hf:"):
        task = _load_hf(spec, split=split or "train", field_map=field_map, fmt=fmt)
    else:
        synthetic = spec.startswith("synthetic:")
        name, split_ = _split_spec(spec.removeprefix("synthetic:"), split)
        if synthetic:
            if name not in SYNTHETIC_TASKS:
                raise LayercardError(
                    f"task {spec!r}: unknown synthetic task; valid: {', '.join(SYNTHETIC_TASKS)}"
                )
        if name in SYNTHETIC_TASKS:
            task = make_synthetic(name, split=split_ or "train", seed=seed)
            if fmt is not None:
                task = task.with_format(fmt)
        elif name in DATASET_PRESETS:
            path = _resolve_dataset(name, split_)
            examples = read_jsonl(path, field_map=field_map)
            task = Task(name, str(path.resolve()), path.stem, fmt or PRESETS[name], examples)
        else:
            raise LayercardError(
                f"unknown task {spec!r}: expected a .jsonl path, one of {', '.join(DATASET_PRESETS)} "
                f"(as NAME:SPLIT), synthetic:{'|'.join(SYNTHETIC_TASKS)}, or hf:NAME[:CONFIG]"
            )

    if limit is not None:
        task = task.subset(limit, seed=seed)
    if expand_references:
        task = Task(task.name, task.source, task.split, task.format, _expand(task.examples))
    return task


_expand = expand_references  # the keyword argument of load_task shadows the function name


def _load_hf(spec: str, *, split: str, field_map: Mapping[str, str] | None, fmt: TaskFormat | None) -> Task:
    """``hf:NAME[:CONFIG]`` through ``datasets.load_dataset``; any failure is one line."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise LayercardError(f"task {spec!r}: expected hf:NAME or hf:NAME:CONFIG")
    name, config = parts[1], (parts[2] if len(parts) == 3 and parts[2] else None)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad split: all are a user-facing one-liner
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LayercardError(
            f"task {spec!r}: datasets.load_dataset failed (needs the network or a cached copy): {msg}"
        ) from None
    examples = examples_from_records(ds, source=f"{spec}[{split}]", field_map=field_map)
    fmt = fmt or PRESETS["jsonl"]
    return Task(name, spec, split, fmt, examples)


def is_file_spec(spec: str) -> bool:
    """A task read from one file: it has no other split to hold out."""
    return spec.endswith(".jsonl") or Path(spec).exists()


def names_split(spec: str) -> bool:
    """Whether ``spec`` carries its own split (``NAME:SPLIT``, ``synthetic:NAME:SPLIT``; never ``hf:``)."""
    if spec.startswith("hf:") or is_file_spec(spec):
        return False
    return len(spec.split(":")) > (2 if spec.startswith("synthetic:") else 1)


def held_out(spec: str, *, exclude: str | None = None, seed: int = 0) -> Task | None:
    """The validation split of the task ``spec`` names, else its test split; never the split ``exclude``.

    A split written in ``spec`` is dropped first (``e2e_nlg:train`` → ``e2e_nlg``). ``None`` for a file
    (it has no other split) and for a task with neither split.
    """
    if is_file_spec(spec):
        return None
    if spec.startswith("hf:"):
        base = spec
    else:
        base = ":".join(spec.split(":")[: 2 if spec.startswith("synthetic:") else 1])
    for candidate in ("validation", "test"):
        if candidate == exclude:
            continue
        try:
            return load_task(base, split=candidate, seed=seed)
        except LayercardError:
            continue
    return None
