"""Large JSON-lines files, read a record at a time.

A JSONL file of :data:`~layercard.tasks.lazy.LAZY_BYTES` or more is indexed rather than parsed: one pass
over its bytes checks that it is UTF-8 and notes where each record's line starts. Its examples
(:class:`LineExamples`, a :class:`~layercard.tasks.lazy.LazyExamples`) are then parsed when a command
reads them, with the ids and line numbers the whole-file reader gives.
"""

from __future__ import annotations

import codecs
import json
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from layercard.errors import LayercardError
from layercard.progress import count, say_progress
from layercard.tasks import lazy
from layercard.tasks.formats import Stamps, check_unchanged, file_stamps, reads_lines
from layercard.tasks.lazy import LazyExamples, first_record_schema

__all__ = ["LineExamples", "index_lines", "is_line_file", "line_examples"]

_CHUNK = 1 << 24
_BOM = codecs.BOM_UTF8
# A command says it is reading a file this large, as the pass takes a second or more.
_SAY_BYTES = 256 * 1024 * 1024


class NotLineData(Exception):
    """The file has line breaks the whole-file reader counts differently (a lone carriage return), or
    bytes that are not UTF-8: the whole-file reader reads it, and names the fault."""


def is_line_file(p: Path) -> bool:
    """Whether ``p`` is read one record per line (``.jsonl``, ``.ndjson``, any name but the other data
    suffixes, or a ``.json`` file that does not open an array: JSON lines, as ``datasets``' ``to_json``
    writes them) and is large enough to be read a record at a time."""
    if not (reads_lines(p) or p.suffix.lower() == ".json"):
        return False
    try:
        if not (p.is_file() and p.stat().st_size >= lazy.LAZY_BYTES):
            return False
        return reads_lines(p) or _opens_with_record(p)
    except OSError:
        return False


def _opens_with_record(p: Path) -> bool:
    """Whether the first thing in ``p`` (after a byte-order mark and white space) is a JSON object."""
    with open(p, "rb") as f:
        head = f.read(1 << 16).removeprefix(_BOM).lstrip()
    return head.startswith(b"{")


def _has_text(line: bytes) -> bool:
    """Whether the decoded line holds anything but white space, as ``str.strip`` judges it."""
    s = line.strip()
    if not s:
        return False
    if 0x21 <= s[0] <= 0x7E:  # a printable ASCII character is never white space
        return True
    return bool(s.decode("utf-8", "replace").strip())


def index_lines(p: Path) -> tuple[array, array]:
    """(byte offset, 1-based line number) of each line of ``p`` that holds a record, in one pass that
    also checks the whole file is UTF-8. Raises :class:`NotLineData` where it is not, or where a carriage
    return stands alone (the whole-file reader breaks lines there)."""
    offsets, numbers = array("q"), array("q")
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, pos, lineno = b"", 0, 0
    with open(p, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                raise NotLineData from None
            buf = carry + chunk
            parts = buf.split(b"\n")
            # the piece after the last line break waits for the next chunk; at the end it is the last line
            carry = parts.pop() if chunk else b""
            has_cr = b"\r" in buf
            for part in parts:
                lineno += 1
                if has_cr and part.find(b"\r") not in (-1, len(part) - 1):
                    raise NotLineData
                if _has_text(part[len(_BOM) :] if pos == 0 and part.startswith(_BOM) else part):
                    offsets.append(pos)
                    numbers.append(lineno)
                pos += len(part) + 1
            if not chunk:
                break
    return offsets, numbers


def _record(line: bytes, at_start: bool, where: str) -> Any:
    """The JSON record of one line as read from the file (its break, and at the file's start a byte-order
    mark, left out); ``where``: FILE:LINE, for the error."""
    if at_start and line.startswith(_BOM):
        line = line[len(_BOM) :]
    try:
        return json.loads(line.rstrip(b"\n").removesuffix(b"\r").decode("utf-8"))
    except json.JSONDecodeError as e:
        raise LayercardError(f"{where}: not valid JSON ({e.msg}: column {e.colno})") from None


class LineExamples(LazyExamples):
    """The examples of an indexed JSONL file, each parsed from its line when read."""

    def __init__(self, path: Path, offsets: array, numbers: array, *, stamp: Stamps, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = path
        self._offsets = offsets
        self._numbers = numbers
        self._stamp = stamp

    @property
    def label(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return len(self._offsets)

    def _source_key(self) -> tuple[Any, ...]:
        return (self.path, self._stamp)

    def _open(self) -> Any:
        check_unchanged(self.path, (self.path,), self._stamp)
        return open(self.path, "rb")

    def _row(self, line: bytes, k: int) -> tuple[str, int, Any]:
        lineno = self._numbers[k]
        where = f"{self.path}:{lineno}"
        return where, lineno, _record(line, self._offsets[k] == 0, where)

    def _rows_at(self, indices: Sequence[int]) -> Iterator[tuple[str, int, Any]]:
        with self._open() as f:
            for k in indices:
                f.seek(self._offsets[k])
                yield self._row(f.readline(), k)

    def _all_rows(self) -> Iterator[tuple[str, int, Any]]:
        k, n = 0, len(self)
        with self._open() as f:
            for lineno, line in enumerate(f, start=1):
                if k == n:
                    break
                if lineno != self._numbers[k]:
                    continue
                yield self._row(line, k)
                k += 1


def line_examples(
    p: Path, *, stem: str, field_map: Mapping[str, str] | None
) -> tuple[str, LineExamples] | None:
    """(schema, examples) of a large JSONL file, read a record at a time; None where the whole-file
    reader must read it (:class:`NotLineData`, or a ``.json`` file of one record), which then names what
    is wrong with it."""
    size = p.stat().st_size
    stamp = file_stamps((p,))
    t0 = time.monotonic()
    if size >= _SAY_BYTES:
        say_progress(f"indexing {p.name} ({size / 2**20:,.0f} MiB)")
    try:
        offsets, numbers = index_lines(p)
    except NotLineData:
        return None
    if file_stamps((p,)) != stamp:
        raise LayercardError(f"{p}: changed while it was read; run the command again")
    if not offsets:
        raise LayercardError(f"{p}: no examples")
    if len(offsets) < 2 and not reads_lines(p):
        return None  # a .json file of one value: the whole-file reader says it is not an array
    with open(p, "rb") as f:
        f.seek(offsets[0])
        where = f"{p}:{numbers[0]}"
        first = (where, numbers[0], _record(f.readline(), offsets[0] == 0, where))
    schema, columns = first_record_schema(first, field_map)
    examples = LineExamples(p, offsets, numbers, schema=schema, columns=columns, stem=stem, stamp=stamp)
    examples.take([0])  # the first record is checked whole, as the schema was read from it
    if size >= _SAY_BYTES:
        say_progress(
            f"indexing {p.name}: {count(len(examples), 'record')} ({time.monotonic() - t0:.1f} s); each is "
            "read when used"
        )
    return schema, examples
