"""Task data: examples, tasks, and :func:`load_task` over data files, presets, synthetic and HF data.

A task spec is one of

- a data file: JSONL, JSON, CSV/TSV or Parquet (``layercard.tasks.formats``), a folder of such files,
  one a split named by its stem (``calls/train.jsonl``, ``calls/test.jsonl``), or a folder written by
  ``datasets``' ``save_to_disk`` (a folder's or DatasetDict's split chosen by ``split=``, else
  ``train``). A single file (or saved
  Dataset) is one split, named by its stem: any other ``split=`` is refused. Records follow one of the schemas
  of ``layercard.tasks.schemas`` (``input``/``target``, Alpaca, chat ``messages``, plain ``text``),
  detected from the first record; ``field_map`` names other columns. The prompt format comes from
  ``preset=``, else from the schema (``chat``, ``text``), else from the parent folder's name
  (``e2e_nlg``, ``gsm8k``, ``samsum``, ``sst2``), else the generic ``jsonl`` format;
- ``PRESET[:SPLIT]`` for the shipped datasets, found as ``ROOT/PRESET/SPLIT.jsonl`` under the data
  root: ``$LAYERCARD_DATA`` when set, else ``./data``, else ``../shared/data``;
- ``synthetic:facts`` / ``synthetic:format`` (or ``facts`` / ``format``), generated offline from ``seed``;
- ``hf:NAME[:CONFIG]`` through ``datasets.load_dataset``, from the local Hugging Face cache only (as
  models are: nothing is downloaded at run time).

Prompt settings (``prompt=``, ``system=``, ``chat_template=``, ``train_turns=``;
``layercard.tasks.prompt``) then
replace the format's wording, whatever the source.

Large data is read a record at a time (``layercard.tasks.lazy``): a JSONL file of 16 MiB or more (or a
``.json`` file of JSON lines) is indexed rather than parsed (``layercard.tasks.lines``), and a Parquet
file, saved dataset or ``hf:`` dataset whose table holds 16 MiB or more converts each row when a command
uses it; a seeded subset of large data reads its own records alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError, MissingSplit, message_line
from layercard.tasks.example import Example
from layercard.tasks.formats import (
    DATA_SUFFIXES,
    TableRows,
    check_own_split,
    chosen_split,
    dataset_rows,
    dataset_splits,
    is_dataset_folder,
    is_saved_dataset,
    read_records,
    split_files,
    split_records,
)
from layercard.tasks.lazy import first_record_schema, table_examples
from layercard.tasks.lines import is_line_file, line_examples
from layercard.tasks.presets import (
    DATASET_PRESETS,
    PRESETS,
    TaskFormat,
    detect_preset,
    get_preset,
    shipped_splits,
)
from layercard.tasks.prompt import apply_prompt
from layercard.tasks.schemas import check_field_map, record_to_example
from layercard.tasks.synthetic import make_synthetic
from layercard.tasks.task import Task

__all__ = [
    "Example",
    "Task",
    "data_roots",
    "dataset_spec",
    "examples_from_records",
    "expand_references",
    "folder_split",
    "load_task",
    "read_jsonl",
]

SYNTHETIC_TASKS = ("facts", "format")
# A file or saved Dataset named as a split (train.jsonl, test.parquet, train-00000-of-00002.parquet) is
# one split of the task its folder holds, and takes that folder's name.
_SPLIT_NAME = re.compile(
    r"(train|training|test|testing|validation|valid|val|dev|eval|evaluation)(-\d+-of-\d+)?", re.I
)


# ---------------------------------------------------------------- records to examples


def _examples(
    rows: Sequence[tuple[str, int, Any]],
    *,
    source: str,
    stem: str,
    field_map: Mapping[str, str] | None,
    cells: bool = False,
) -> tuple[str, tuple[Example, ...]]:
    """(schema, examples) of ``rows``: the schema detected from the first row, every row checked."""
    fmap = check_field_map(field_map)
    if not rows:
        raise LayercardError(f"{source}: no examples")
    schema, columns = first_record_schema(rows[0], fmap)
    out: list[Example] = []
    seen: set[str] = set()
    for where, number, rec in rows:
        ex = record_to_example(rec, schema, columns, where, f"{stem}-{number:05d}", cells=cells)
        if ex.id in seen:
            raise LayercardError(f"{where}: duplicate id {ex.id!r}")
        seen.add(ex.id)
        out.append(ex)
    return schema, tuple(out)


def examples_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    field_map: Mapping[str, str] | None = None,
) -> tuple[Example, ...]:
    """Map records (dicts, or rows of a ``datasets.Dataset``) to examples.

    The schema is detected from the first record (``layercard.tasks.schemas``); ``field_map`` names
    the source column of a field (``{"input": "question"}``). Other columns go to ``meta``. Errors
    name ``SOURCE:ROW`` (1-based).
    """
    rows = [(f"{source}:{i}", i, rec) for i, rec in enumerate(records, start=1)]
    return _examples(rows, source=source, stem=Path(source).stem, field_map=field_map)[1]


def read_jsonl(
    path: str | os.PathLike[str], *, field_map: Mapping[str, str] | None = None
) -> Sequence[Example]:
    """Read and validate a data file's examples (JSONL, or any format of ``read_records``); errors name
    FILE:LINE. Large data's examples are read when used (``layercard.tasks.lazy``)."""
    return _file_examples(Path(path), field_map=field_map)[1]


def _file_examples(
    p: Path, *, field_map: Mapping[str, str] | None, split: str | None = None
) -> tuple[str, Sequence[Example], str | None]:
    """(schema, examples, the split a saved DatasetDict's was read from) of a data file or saved dataset:
    a large JSONL file indexed (:func:`~layercard.tasks.lines.line_examples`), a large table's rows read
    when used (:func:`~layercard.tasks.lazy.table_examples`), any other read whole. A folder of data
    files reads the file of its split."""
    files = split_files(p)
    if files is not None:
        chosen = chosen_split(p, list(files), split)
        if len(files[chosen]) == 1:
            schema, examples, _ = _file_examples(files[chosen][0], field_map=field_map)
            return schema, examples, chosen
        # a split in shards: their rows in order, named as one file of the split would name them
        schema, examples = table_examples(split_records(files[chosen]).rows, stem=chosen, field_map=field_map)
        return schema, examples, chosen
    stem = p.stem if p.is_file() else p.name
    if is_line_file(p):
        check_own_split(p, split, (p.stem,))
        lazy = line_examples(p, stem=stem, field_map=field_map)
        if lazy is not None:
            return lazy[0], lazy[1], None
    records = read_records(p, split=split)
    if isinstance(records.rows, TableRows):
        schema, examples = table_examples(records.rows, stem=stem, field_map=field_map)
        return schema, examples, records.split
    source = f"{p}[{records.split}]" if records.split else str(p)
    schema, examples = _examples(
        records.rows, source=source, stem=stem, field_map=field_map, cells=records.cells
    )
    return schema, examples, records.split


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


def _schema_format(schema: str, preset: TaskFormat | None, detected: TaskFormat) -> TaskFormat:
    """The prompt format of data of ``schema``: the given preset, else the schema's own, else ``detected``."""
    if schema == "text":  # plain text has no prompt, whatever preset was asked for
        base = preset or PRESETS["text"]
        return base if base.completion else dataclasses.replace(base, completion=True, chat_template=False)
    if preset is not None:
        return preset
    return PRESETS["chat"] if schema == "chat" else detected


def _load_path(
    p: Path, *, split: str | None, field_map: Mapping[str, str] | None, preset: TaskFormat | None
) -> Task:
    """A task from a data file or a saved dataset folder."""
    schema, examples, read_split = _file_examples(p, field_map=field_map, split=split)
    stem = p.stem if p.is_file() else p.name
    files = split_files(p)
    read = files[read_split] if files is not None and read_split is not None else (p,)  # the files read
    detected = detect_preset(read[0]) if read[0].is_file() else PRESETS["jsonl"]
    fmt = _schema_format(schema, preset, detected)
    name = fmt.name if fmt.name in DATASET_PRESETS or fmt.name in SYNTHETIC_TASKS else _path_task_name(p)
    chosen = fmt.name != _schema_format(schema, None, detected).name
    # a single file is one split, named by its stem (read_records refused any other split asked of it);
    # a split in shards has the folder for its source, as a saved dataset's split has
    source = read[0] if len(read) == 1 else p
    return Task(name, str(source.resolve()), read_split or stem, fmt, examples, schema, chosen)


def _path_task_name(p: Path) -> str:
    """The task name of a data file or saved dataset folder: its stem, or where that names a split
    (``data/calls/train.jsonl``), the name of the folder holding it (``calls``)."""
    stem = p.stem if p.is_file() else p.name
    folder = p.resolve().parent.name
    return folder if _SPLIT_NAME.fullmatch(stem) and folder else stem


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
        available = list(
            dict.fromkeys(s for r in roots if (r / name).is_dir() for s in shipped_splits(r / name))
        )
        hint = f"available: {', '.join(available)}" if available else "no data found"
        raise LayercardError(f"task {name!r}: no split given and no train split ({hint}); use {name}:SPLIT")
    tried = [root / name / f"{split}.jsonl" for root in roots]
    for path in tried:
        if path.is_file():
            return path
    # the data is there without this split: name the splits it has, as a synthetic task does
    folder = next((p.parent for p in tried if p.parent.is_dir()), None)
    if folder is not None:
        have = shipped_splits(folder)
        valid = f"valid: {', '.join(have)}" if have else "it holds no SPLIT.jsonl"
        raise MissingSplit(f"task {name}:{split}: unknown split {split!r}; {valid} (in {folder.resolve()})")
    looked = ", ".join(str(p.resolve()) for p in tried)
    raise MissingSplit(f"task {name}:{split}: data file not found; looked in {looked} (set LAYERCARD_DATA)")


def is_path_spec(spec: str, folder: str | Path | None = None) -> bool:
    """Whether ``spec`` names a data file or folder rather than a preset, synthetic or hub task, read from
    ``folder`` where relative (else from the working directory).

    A folder that merely shares a built-in task's name (``facts/``, a demo's output) does not make the
    name a path: ``facts`` stays the synthetic task.
    """
    if spec.startswith("hf:"):
        return False
    p = Path(spec)
    q = Path(folder) / p if folder is not None and not p.expanduser().is_absolute() else p
    if p.suffix.lower() in DATA_SUFFIXES or q.is_file() or is_saved_dataset(q):
        return True
    name = spec.partition(":")[0]
    return q.is_dir() and name not in (*DATASET_PRESETS, *SYNTHETIC_TASKS)


def folder_split(spec: str, folder: str | Path | None = None) -> tuple[str, str] | None:
    """``(FOLDER, SPLIT)`` where ``spec`` is ``FOLDER:SPLIT`` and ``FOLDER`` a folder of splits (a folder
    of data files, or a saved ``DatasetDict``; read from ``folder`` where relative), as ``PRESET:SPLIT``
    names a preset's split; None for any other spec, a built-in task's name among them."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or not tail or spec.startswith(("hf:", "synthetic:")):
        return None
    if head in (*DATASET_PRESETS, *SYNTHETIC_TASKS):
        return None
    q = Path(head)
    if folder is not None and not q.expanduser().is_absolute():
        q = Path(folder) / q
    return (head, tail) if is_dataset_folder(q) and dataset_splits(q) is not None else None


def load_task(
    spec: str | os.PathLike[str],
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    preset: str | None = None,
    field_map: Mapping[str, str] | None = None,
    expand_references: bool = False,
    prompt: str | None = None,
    system: str | None = None,
    chat_template: bool | None = None,
    train_turns: str | None = None,
) -> Task:
    """Load a task from a spec (see the module docstring).

    ``limit`` keeps a seeded subset (:meth:`Task.subset` with ``seed``) *before* references are
    expanded, so the number of distinct inputs is what ``limit`` says. ``preset`` overrides the
    detected prompt format. ``seed`` also generates the synthetic tasks. ``prompt`` (a template with
    ``{input}``, or ``@FILE``), ``system`` (text or ``@FILE``) and ``chat_template`` (``None``: the
    format's) set the prompt (``layercard.tasks.prompt``); ``train_turns`` (``all`` or ``last``) which
    assistant turns of chat data carry loss.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise LayercardError(f"limit: must be a non-negative integer or None, got {limit!r}")
    fmt = get_preset(preset) if preset is not None else None
    spec = str(spec)

    named = folder_split(spec)
    if spec.startswith("hf:"):
        task = _load_hf(spec, split=split or "train", field_map=field_map, fmt=fmt)
    elif is_path_spec(spec):
        task = _load_path(Path(spec), split=split, field_map=field_map, preset=fmt)
    elif named is not None:
        folder, in_spec = named
        if split and split != in_spec:
            raise LayercardError(f"task {spec!r}: split {in_spec!r} in the spec but split={split!r} given")
        task = _load_path(Path(folder), split=in_spec, field_map=field_map, preset=fmt)
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
            if fmt is not None and fmt.name != task.format.name:
                task = dataclasses.replace(task, format=fmt, preset_chosen=True)
        elif name in DATASET_PRESETS:
            path = _resolve_dataset(name, split_)
            examples = read_jsonl(path, field_map=field_map)
            chosen = fmt is not None and fmt.name != name
            task = Task(name, str(path.resolve()), path.stem, fmt or PRESETS[name], examples, None, chosen)
        else:
            raise LayercardError(
                f"unknown task {spec!r}: expected a data file ({', '.join(DATA_SUFFIXES)}), a folder of "
                f"them or a saved dataset folder (as FOLDER[:SPLIT]), one of {', '.join(DATASET_PRESETS)} "
                "(as NAME:SPLIT), "
                f"synthetic:{'|'.join(SYNTHETIC_TASKS)}, or hf:NAME[:CONFIG]"
            )

    # text records have no input; any other record's is read until one is found
    if task.format.completion and task.schema != "text" and any(ex.input for ex in task.examples):
        # a plain-text format trains on the target alone: every input would be dropped unsaid
        raise LayercardError(
            f"preset {task.format.name!r}: plain text, for records of one text field; task {spec!r} has "
            "inputs, which it would drop; choose another preset"
        )
    if train_turns not in (None, "all") and task.schema != "chat":
        kind = f"{task.schema} records" if task.schema else f"the {task.format.name} preset's data"
        raise LayercardError(
            f"train_turns: {train_turns!r} chooses among a conversation's assistant turns; task {spec!r} "
            f"holds {kind}, one target each"
        )
    fmt_prompted = apply_prompt(
        task.format, prompt=prompt, system=system, chat_template=chat_template, train_turns=train_turns
    )
    if fmt_prompted is not task.format:
        task = task.with_format(fmt_prompted)
    if limit is not None:
        task = task.subset(limit, seed=seed)
    if expand_references:
        task = dataclasses.replace(task, examples=_expand(task.examples))
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

        with _hf_offline():
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # not cached, unknown name, bad split: all are a user-facing one-liner
        msg = message_line(e)
        if _unknown_split(e):  # the dataset is there without this split: a held-out lookup tries the next
            raise MissingSplit(f"task {spec!r}: no split {split!r} ({msg})") from None
        if _not_cached(e):
            raise LayercardError(
                f"task {spec!r}: dataset {name!r} is not in the local Hugging Face cache (hf: datasets are "
                "read offline: load it once with datasets.load_dataset where the hub is reachable, or give a "
                f"data file; datasets said: {msg})"
            ) from None
        raise LayercardError(f"task {spec!r}: datasets.load_dataset failed: {msg}") from None
    source = f"{spec}[{split}]"
    rows = dataset_rows(ds, source, source)
    schema, examples = table_examples(rows, stem=Path(source).stem, field_map=field_map)
    task_fmt = _schema_format(schema, fmt, PRESETS["jsonl"])
    chosen = task_fmt.name != _schema_format(schema, None, PRESETS["jsonl"]).name
    return Task(name, spec, split, task_fmt, examples, schema, chosen)


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face's offline mode for the block, restored after it: the local cache only.

    ``datasets`` and ``huggingface_hub`` read their offline switch once, at import, into module
    constants (their ``DownloadConfig.local_files_only`` is not honoured by ``load_dataset``), so the
    constants are set as well as the variables (the latter for any worker process the library starts).
    """
    import datasets.config
    import huggingface_hub.constants

    consts = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved_consts = [(mod, attr, getattr(mod, attr)) for mod, attr in consts if hasattr(mod, attr)]
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    try:
        for mod, attr, _ in saved_consts:
            setattr(mod, attr, True)
        os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
        yield
    finally:
        for mod, attr, value in saved_consts:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _not_cached(e: Exception) -> bool:
    """Whether ``datasets.load_dataset`` failed offline for want of a cached copy: it says it could not
    reach the Hub (a ConnectionError), or found neither the dataset nor its files (its own errors for
    these are FileNotFoundErrors)."""
    return isinstance(e, (ConnectionError, FileNotFoundError))


def _unknown_split(e: Exception) -> bool:
    """Whether ``datasets.load_dataset`` failed because the dataset has no such split: its builder says
    ``Bad split: ...`` and its reader ``Unknown split "..."``, both as a ValueError. Any other failure
    (offline, no such dataset, a broken script) is not a missing split and must not be passed over."""
    return isinstance(e, ValueError) and str(e).startswith(("Bad split", "Unknown split"))


def is_file_spec(spec: str) -> bool:
    """A task read from one file (or one saved Dataset folder): it has no other split to hold out.

    A saved ``DatasetDict`` folder, or a folder of data files, is not: its validation or test split is held
    out like a preset's.
    """
    if not is_path_spec(spec):  # the test load_task reads a spec by, so the two never disagree
        return False
    p = Path(spec)
    return dataset_splits(p) is None if is_dataset_folder(p) else True


def names_split(spec: str) -> bool:
    """Whether ``spec`` carries its own split (``NAME:SPLIT``, ``synthetic:NAME:SPLIT``; never ``hf:``)."""
    if spec.startswith("hf:") or is_file_spec(spec) or _splits_folder(spec):
        return False
    return len(spec.split(":")) > (2 if spec.startswith("synthetic:") else 1)


def _splits_folder(spec: str) -> bool:
    """Whether ``spec`` is a path to a folder of splits (a saved dataset, or a folder of data files); a
    folder that shares a built-in task's name is not a path (:func:`is_path_spec`)."""
    return is_path_spec(spec) and is_dataset_folder(spec)


def dataset_spec(spec: str) -> str:
    """The dataset a task spec names, without its split (``sst2:train`` → ``sst2``); a file, a saved
    dataset folder or an ``hf:`` spec names itself."""
    if spec.startswith("hf:") or is_file_spec(spec) or _splits_folder(spec):
        return spec
    return ":".join(spec.split(":")[: 2 if spec.startswith("synthetic:") else 1])


def validation_task(
    spec: str | None,
    split: str | None,
    train_spec: str,
    train_split: str,
    *,
    seed: int = 0,
    **load_kwargs: Any,
) -> Task | None:
    """The task that validates or evaluates a training on ``train_spec`` (read on ``train_split``): ``spec``
    (else the training task) on ``split``, on the split ``spec`` names, or a file whole; without any of
    these, its :func:`held_out` split, never ``train_split`` of the same dataset. None where it has no
    held-out split (a file named as the training task alone has none). ``load_kwargs`` go to
    :func:`load_task`."""
    if spec is None and split is None:
        return held_out(train_spec, exclude=train_split, seed=seed, **load_kwargs)
    spec = spec or train_spec
    if split is None and not is_file_spec(spec) and not names_split(spec):
        same = dataset_spec(spec) == dataset_spec(train_spec)
        return held_out(spec, exclude=train_split if same else None, seed=seed, **load_kwargs)
    return load_task(spec, split=split, seed=seed, **load_kwargs)


def held_out(
    spec: str,
    *,
    exclude: str | None = None,
    seed: int = 0,
    order: tuple[str, ...] = ("validation", "test"),
    **load_kwargs: Any,
) -> Task | None:
    """The validation split of the task ``spec`` names, else its test split (the first of ``order`` it
    has); never the split ``exclude``.

    A split written in ``spec`` is dropped first (``gsm8k:train`` → ``gsm8k``). ``None`` for a file
    (it has no other split) and for a task with neither split. ``load_kwargs`` go to :func:`load_task`
    (the field map and prompt settings of the training task).
    """
    if is_file_spec(spec):
        return None
    base = dataset_spec(spec)
    splits = dataset_splits(base) if _splits_folder(base) else None
    for candidate in order:
        if candidate == exclude or (splits is not None and candidate not in splits):
            continue
        try:
            return load_task(base, split=candidate, seed=seed, **load_kwargs)
        except MissingSplit:  # absent: try the next; a split that exists but is malformed says so
            continue
    return None
