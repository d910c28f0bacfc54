"""Data files: the records of a JSONL, JSON, CSV/TSV or Parquet file, or of a saved Hugging Face dataset.

Each reader returns the records with the place each came from, so every later error names it:
``FILE:LINE`` for text files (the line a record starts on) and ``SOURCE:ROW`` (1-based) for Parquet
files and saved datasets. Text files are UTF-8, with or without a byte-order mark. A ``.json`` file
holds an array of records, or JSON lines. A ``.csv`` file has CSV's quoting; a ``.tsv`` file is read with
it where the whole file is strictly quoted CSV with tabs (as Python's csv and pandas write it), else
unquoted (tabs separate cells, quotes are text). A single file is one split, named by its stem. A saved
dataset is a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s, whose split is
chosen by name). A folder of data files that is not a saved dataset holds one split a file, named by its
stem (``calls/train.jsonl``, ``calls/test.jsonl``: :func:`split_files`), chosen by name as a
``DatasetDict``'s; a split in Parquet shards (``train-00000-of-00002.parquet``, …) is its shards joined in
order, each row named by its own shard and row there. Parquet files and saved datasets are kept as
tables (:class:`TableRows`), a row becoming a record when read.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from layercard.errors import LayercardError, MissingSplit, message_line

__all__ = [
    "DATA_SUFFIXES",
    "Records",
    "TableRows",
    "check_own_split",
    "check_unchanged",
    "chosen_split",
    "dataset_rows",
    "dataset_splits",
    "file_stamps",
    "is_dataset_folder",
    "is_saved_dataset",
    "item_by_take",
    "read_records",
    "reads_lines",
    "split_records",
    "split_files",
]

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
_DICT_FILE = "dataset_dict.json"  # written by DatasetDict.save_to_disk
_STATE_FILE = "state.json"  # written by Dataset.save_to_disk


@dataclass(frozen=True)
class Records:
    """The records of one source as ``(where, number, record)``: ``number`` is the line (JSONL, CSV) or
    the record's position (JSON arrays, tables), and names examples without an id. ``cells``: values
    are table text (CSV)."""

    rows: Sequence[tuple[str, int, Any]]  # a list, or a table's rows read when used (TableRows)
    cells: bool = False
    split: str | None = None  # the split read from a saved DatasetDict


def _read_text(p: Path) -> str:
    if not p.is_file():
        raise LayercardError(f"{p}: no such file")
    try:
        return p.read_text(encoding="utf-8-sig")  # utf-8-sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        with open(p, "rb") as f:
            head = f.read(8)
        for magic, kind, undo in _COMPRESSED:
            if head.startswith(magic):
                raise LayercardError(
                    f"{p}: {kind}-compressed, not text; decompress it first ({undo} {p.name})"
                ) from None
        raise LayercardError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# The signatures of compressed files a data file is sometimes given as, and the command that undoes each.
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\xfd7zXZ", "xz", "unxz -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
)


def _jsonl(p: Path, text: str) -> list[tuple[str, int, Any]]:
    rows = []
    # split on "\n" only: str.splitlines() also breaks at U+2028, which GSM8K has inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{p}:{lineno}", lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LayercardError(f"{p}:{lineno}: not valid JSON ({e.msg}: column {e.colno})") from None
    return rows


def _json(p: Path, text: str) -> list[tuple[str, int, Any]]:
    """A JSON array of records, each named by the line it starts on; JSON lines are read as such."""
    stripped = text.lstrip()
    if not stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
                return _jsonl(p, text)
            raise LayercardError(f"{p}:{e.lineno}: not valid JSON ({e.msg}: column {e.colno})") from None
        raise LayercardError(f"{p}: expected a JSON array of records (or one record per line)")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise LayercardError(f"{p}:{e.lineno}: not valid JSON ({e.msg}: column {e.colno})") from None
    # The text is valid: walk the array's items to learn the line each starts on. Items are numbered
    # by position (a one-line array has them all on line 1); the record number is added to the place
    # when an item shares its line with the one before.
    decoder = json.JSONDecoder()
    rows: list[tuple[str, int, Any]] = []
    pos, line, counted, last = text.index("[") + 1, 1, 0, 0
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return rows
        item, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted, pos)  # counted once: linear in the file's size
        counted = pos
        number = len(rows) + 1
        rows.append((f"{p}:{line}" + (f" (record {number})" if line == last else ""), number, item))
        pos, last = end, line


def _csv(p: Path, text: str, delimiter: str) -> list[tuple[str, int, Any]]:
    if delimiter != "\t":
        return _cells(p, text, delimiter, csv.QUOTE_MINIMAL, strict=False)
    # TSV comes both ways: quoted as Python's csv and pandas write it (a cell holding a tab, a newline or a
    # quote is wrapped in quotes) and unquoted, its quotes text ('"Great" movie'). Read as quoted only
    # where the whole file parses strictly so; otherwise CSV's quoting would drop those quotes and an
    # unclosed one would swallow the lines after it.
    try:
        return _cells(p, text, delimiter, csv.QUOTE_MINIMAL, strict=True)
    except LayercardError:
        return _cells(p, text, delimiter, csv.QUOTE_NONE, strict=False)


def _cells(p: Path, text: str, delimiter: str, quoting: int, *, strict: bool) -> list[tuple[str, int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=strict)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise LayercardError(f"{p}:1: not valid CSV ({e})") from None
    dup = next((h for h in header if header.count(h) > 1), None)
    if dup is not None:
        raise LayercardError(f"{p}:1: column {dup!r} appears twice in the header")
    rows = []
    start = reader.line_num + 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            where = f"{p}:{line}"
            if not any(c.strip() for c in cells):
                continue  # blank lines are allowed, as in JSONL
            if len(cells) != len(header):
                raise LayercardError(f"{where}: {len(cells)} cells, the header has {len(header)}")
            rows.append((where, line, dict(zip(header, cells, strict=True))))
    except csv.Error as e:
        raise LayercardError(f"{p}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


Stamps = tuple[tuple[str, int, int], ...]


def file_stamps(files: Sequence[Path]) -> Stamps:
    """(path, size, modification time) of each file: what tells that data read from them has changed."""
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_unchanged(what: str | Path, files: Sequence[Path], stamps: Stamps) -> None:
    """Refuse to read on from ``files`` where they changed since ``stamps`` were taken of them."""
    if file_stamps(files) != stamps:
        raise LayercardError(f"{what}: changed since it was read; run the command again")


class TableRows(Sequence[tuple[str, int, Any]]):
    """The rows of a Parquet table or a ``datasets.Dataset`` as ``(where, number, record)``, ``where``
    ``SOURCE:ROW`` and ``number`` the 1-based row; each row becomes a record when read, and a whole read
    converts them in batches. ``files``: what the data was read from, refused once changed (a saved
    dataset's are memory-mapped)."""

    _BATCH = 10_000

    def __init__(
        self, source: str, label: str, data: Any, files: Sequence[Path], rows_per_file: Sequence[int] = ()
    ) -> None:
        import pyarrow as pa  # what both kinds of table are made of

        self.source = source
        self.label = label
        self._data = data
        self._arrow = isinstance(data, pa.Table)  # else a datasets.Dataset
        self._files = tuple(files)
        self._stamps = file_stamps(self._files)
        # a table joined from shards: each row is named by its own file and row there, and numbered by
        # its place in the whole
        self._starts = list(itertools.accumulate(rows_per_file, initial=0))[:-1] if rows_per_file else []

    def _where(self, i: int) -> str:
        """``SOURCE:ROW`` of the 0-based row ``i``; a joined shard's own file and row in it."""
        if not self._starts:
            return f"{self.source}:{i + 1}"
        k = bisect.bisect_right(self._starts, i) - 1
        return f"{self._files[k]}:{i - self._starts[k] + 1}"

    @property
    def nbytes(self) -> int:
        """The bytes the table's data takes in memory (or mapped from disk)."""
        return int(self._data.nbytes if self._arrow else self._data.data.nbytes)

    def __len__(self) -> int:
        return int(self._data.num_rows)

    def key(self) -> tuple[Any, ...]:
        """The source and the state its files were read in."""
        return (self.source, self._stamps)

    def _check(self) -> None:
        check_unchanged(self.source, self._files, self._stamps)

    def _records(self, indices: Sequence[int]) -> list[Any]:
        if self._arrow:
            return self._data.take(list(indices)).to_pylist()
        return _batch_rows(self._data[list(indices)], len(indices))

    def take(self, indices: Sequence[int]) -> list[tuple[str, int, Any]]:
        """The rows at ``indices`` (each in range), in that order."""
        self._check()
        recs = self._records(indices) if len(indices) else []
        return [(self._where(i), i + 1, rec) for i, rec in zip(indices, recs, strict=True)]

    @overload
    def __getitem__(self, i: int) -> tuple[str, int, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[str, int, Any]]: ...
    def __getitem__(self, i: int | slice) -> tuple[str, int, Any] | list[tuple[str, int, Any]]:
        return item_by_take(self, i)

    def __iter__(self) -> Iterator[tuple[str, int, Any]]:
        self._check()
        n = len(self)
        for start in range(0, n, self._BATCH):
            stop = min(n, start + self._BATCH)
            if self._arrow:
                recs = self._data.slice(start, stop - start).to_pylist()
            else:
                recs = _batch_rows(self._data[start:stop], stop - start)
            for i, rec in enumerate(recs, start=start + 1):
                yield self._where(i - 1), i, rec


def item_by_take(seq: Any, i: int | slice) -> Any:
    """``seq[i]`` for a sequence read through its ``take(indices)`` (a slice: the items it spans, in one
    read), with a list's negative indices and IndexError."""
    if isinstance(i, slice):
        return seq.take(range(*i.indices(len(seq))))
    n = len(seq)
    if not -n <= i < n:
        raise IndexError(i)
    return seq.take([i % n])[0]


def _batch_rows(batch: dict[str, list[Any]], n: int) -> list[dict[str, Any]]:
    """A ``datasets`` batch (a list per column) as its ``n`` rows, each a dict in column order."""
    keys = list(batch)
    if not keys:
        return [{} for _ in range(n)]
    return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]


def dataset_rows(ds: Any, source: str, label: str) -> TableRows:
    """The rows of a ``datasets.Dataset`` (memory-mapped from the files it names, or in memory)."""
    files = [Path(f["filename"]) for f in getattr(ds, "cache_files", None) or () if "filename" in f]
    return TableRows(source, label, ds, files)


def _parquet(p: Path) -> TableRows:
    return TableRows(str(p), p.name, _parquet_table(p), [p])


def _parquet_table(p: Path) -> Any:
    """The ``pyarrow.Table`` of a Parquet file."""
    if not p.is_file():
        raise LayercardError(f"{p}: no such file")
    try:
        import pyarrow.parquet as pq

        return pq.read_table(p)
    except Exception as e:  # a corrupt or foreign file: one line
        raise LayercardError(f"{p}: not a readable Parquet file ({message_line(e)})") from None


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and ((p / _DICT_FILE).is_file() or (p / _STATE_FILE).is_file())


# A shard's name as the hub's converted datasets write it: train-00000-of-00002.parquet
_SHARD = re.compile(r"(?P<split>.+)-(?P<index>\d+)-of-(?P<count>\d+)")


def lone_shard_text(path: str | Path) -> str | None:
    """What to say of a file named as one shard of a split of several (``train-00001-of-00004.parquet``),
    read alone: where the rest of the split is. None for any other path."""
    p = Path(path)
    shard = _SHARD.fullmatch(p.stem)
    if shard is None or not p.is_file() or int(shard["count"]) < 2:
        return None
    split, count = shard["split"], int(shard["count"])
    whole = (
        f"give its folder, {p.parent}, to read all {count} as split {split!r}"
        if p.suffix.lower() == ".parquet"
        else "join the shards into one file to read the whole split"
    )
    return f"{p.name} is shard {int(shard['index']) + 1} of {count} of split {split!r}, read alone; {whole}"


def split_files(path: str | Path) -> dict[str, tuple[Path, ...]] | None:
    """The data files of a folder that holds one split a file, by split (each file's stem), or None where
    ``path`` is no such folder (a file, a saved dataset, a folder without a data file). A split in Parquet
    shards (``train-00000-of-00002.parquet``, ``train-00001-of-00002.parquet``) is its shards in order;
    every other split is one file. Hidden files are not read; two files of one split, a shard set with one
    missing, and shards of another format are refused."""
    p = Path(path)
    if not p.is_dir() or is_saved_dataset(p):
        return None
    files: dict[str, tuple[Path, ...]] = {}
    shards: dict[str, dict[int, Path]] = {}
    counts: dict[str, int] = {}
    for f in sorted(p.iterdir()):
        if f.name.startswith(".") or f.suffix.lower() not in DATA_SUFFIXES or not f.is_file():
            continue
        shard = _SHARD.fullmatch(f.stem)
        if shard is None:
            _add_split(p, files, f.stem, (f,))
            continue
        if f.suffix.lower() != ".parquet":
            raise LayercardError(
                f"{f}: one shard of a split; shards are joined where they are Parquet files, and a "
                f"{f.suffix} split is read from one file: join the shards into one file, or give one file"
            )
        split, count = shard["split"], int(shard["count"])
        if counts.setdefault(split, count) != count:
            raise LayercardError(
                f"{f}: a shard of {count}, beside shards of split {split!r} of {counts[split]}; keep one set"
            )
        shards.setdefault(split, {})[int(shard["index"])] = f
    for split, found in shards.items():
        missing = [i for i in range(counts[split]) if i not in found]
        if missing or len(found) != counts[split]:
            what = (
                f"shard {missing[0]} ({split}-{missing[0]:05d}-of-{counts[split]:05d}.parquet) is missing"
                if missing
                else f"shards numbered past {counts[split] - 1}"
            )
            raise LayercardError(
                f"{p}: split {split!r} is in {counts[split]} shards and {what}; a split is read whole"
            )
        _add_split(p, files, split, tuple(found[i] for i in range(counts[split])))
    return dict(sorted(files.items())) or None


def _add_split(folder: Path, files: dict[str, tuple[Path, ...]], split: str, paths: tuple[Path, ...]) -> None:
    if split in files:
        raise LayercardError(
            f"{folder}: two files of split {split!r} ({_named(files[split])}, {_named(paths)}); keep one"
        )
    files[split] = paths


def _named(paths: Sequence[Path]) -> str:
    """A split's file by name, or its shards by count and first name."""
    return paths[0].name if len(paths) == 1 else f"{len(paths)} Parquet shards from {paths[0].name}"


def split_records(paths: Sequence[Path]) -> Records:
    """The records of one split of a folder (:func:`split_files`): its file, or its Parquet shards
    joined in order."""
    if len(paths) == 1:
        return read_records(paths[0])
    import pyarrow as pa

    tables = [_parquet_table(f) for f in paths]
    for f, t in zip(paths[1:], tables[1:], strict=True):
        if not t.schema.equals(tables[0].schema):
            raise LayercardError(
                f"{f}: its columns ({', '.join(t.schema.names)}) differ from those of {paths[0].name} "
                f"({', '.join(tables[0].schema.names)}); the shards of a split share one schema"
            )
    shard = _SHARD.fullmatch(paths[0].stem)
    assert shard is not None  # split_files made the set of shard names
    name = f"{shard['split']}-*-of-{shard['count']}.parquet"
    table = pa.concat_tables(tables)
    return Records(TableRows(str(paths[0].parent / name), name, table, paths, [t.num_rows for t in tables]))


def is_dataset_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder of splits: a saved dataset, or one of data files (:func:`split_files`)."""
    return is_saved_dataset(path) or split_files(path) is not None


def chosen_split(p: Path, splits: Sequence[str], split: str | None) -> str:
    """The split of a folder of ``splits`` to read: ``split``, else ``train``, else the only one."""
    if split is None:
        if "train" not in splits and len(splits) != 1:
            raise LayercardError(
                f"{p}: splits {', '.join(splits)}; choose one ({p}:SPLIT, or a split option)"
            )
        return "train" if "train" in splits else splits[0]
    if split not in splits:
        raise MissingSplit(f"{p}: no split {split!r}; its splits: {', '.join(splits)}")
    return split


def dataset_splits(path: str | Path) -> list[str] | None:
    """The split names of a saved DatasetDict folder or a folder of data files (:func:`split_files`);
    ``None`` for a single saved Dataset."""
    files = split_files(path)
    if files is not None:
        return list(files)
    p = Path(path) / _DICT_FILE
    if not p.is_file():
        return None
    try:
        splits = json.loads(p.read_text(encoding="utf-8"))["splits"]
    except (ValueError, KeyError, TypeError):
        raise LayercardError(f"{p}: not a dataset_dict.json (no list of splits)") from None
    return [str(s) for s in splits]


def _recorded_split(p: Path) -> str | None:
    """The split a saved single Dataset records in its state file (``load_dataset(split=...)``), if any."""
    try:
        split = json.loads((p / _STATE_FILE).read_text(encoding="utf-8")).get("_split")
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable state file is load_from_disk's to report
    return split if isinstance(split, str) and split else None


def check_own_split(p: Path, split: str | None, own: tuple[str | None, ...]) -> None:
    """Refuse a split a single file or Dataset does not hold: it holds one, named ``own``; reading it
    anyway would score (or train on) other rows than the split asked for."""
    if split is None or split in own:
        return
    what = "one file" if p.is_file() else "one saved Dataset"
    raise MissingSplit(
        f"{p}: {what}, no split {split!r} (its own: {own[0]!r}); leave the split setting out to read it, "
        "or name the other split's own file in its place"
    )


def _saved_dataset(p: Path, split: str | None) -> Records:
    splits = dataset_splits(p)
    chosen = None
    if splits is None:
        check_own_split(p, split, (p.name, _recorded_split(p)))
    else:
        chosen = chosen_split(p, splits, split)
    try:
        import datasets

        ds = datasets.load_from_disk(str(p))
        if chosen is not None:
            ds = ds[chosen]
    except Exception as e:  # a folder from another version, a missing shard: one line
        msg = message_line(e)
        raise LayercardError(f"{p}: datasets.load_from_disk failed: {msg}") from None
    source = f"{p}[{chosen}]" if chosen else str(p)
    label = f"{p.name}[{chosen}]" if chosen else p.name
    return Records(dataset_rows(ds, source, label), split=chosen)


def read_records(path: str | Path, *, split: str | None = None) -> Records:
    """Every record of a data file or saved dataset folder (``split``: which split of a DatasetDict); a
    Parquet file's or saved dataset's as :class:`TableRows`, each row converted when read.

    A single file or saved Dataset is one split, named by its stem (or the split a Dataset records):
    another ``split`` raises :class:`~layercard.errors.MissingSplit`.
    """
    p = Path(path)
    if p.is_dir():
        files = split_files(p)
        if files is not None:
            chosen = chosen_split(p, list(files), split)
            records = split_records(files[chosen])
            return Records(records.rows, cells=records.cells, split=chosen)
        if not is_saved_dataset(p):
            raise LayercardError(
                f"{p}: a folder with no data file ({', '.join(DATA_SUFFIXES)}), and not a saved dataset (no "
                f"{_DICT_FILE} or {_STATE_FILE})"
            )
        return _saved_dataset(p, split)
    if p.is_file():  # a missing file is reported as such below
        check_own_split(p, split, (p.stem,))
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return Records(_parquet(p))
    text = _read_text(p)
    if reads_lines(p):
        return Records(_jsonl(p, text))
    if suffix == ".json":
        return Records(_json(p, text))
    return Records(_csv(p, text, "\t" if suffix == ".tsv" else ","), cells=True)


def reads_lines(p: Path) -> bool:
    """Whether :func:`read_records` reads ``p`` as one JSON record per line: ``.jsonl``, ``.ndjson`` and
    any name but the other data suffixes'."""
    return p.suffix.lower() not in _NOT_LINES


_NOT_LINES = (".json", ".csv", ".tsv", ".parquet")
