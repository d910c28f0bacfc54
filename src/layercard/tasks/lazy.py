"""Examples read from their source when a command uses them, for data too large to parse up front.

A large data source's examples (:class:`LazyExamples`) are a sequence whose records are read and checked
when used: a seeded subset of 64 reads 64 records, whatever the source's size. Two kinds read them: a
JSONL file's lines (``layercard.tasks.lines``) and the rows of a Parquet file, saved dataset or ``hf:``
dataset (:class:`TableExamples`, over :class:`~layercard.tasks.formats.TableRows`). Their examples, order,
ids and places are those the whole-source reader gives, so subsets, data hashes, cards and run folders
are the same whichever reader read the data.

What changes is when a malformed record is found: a record no command reads is not checked. Reading every
example (training on the whole set, its data hash) checks each one, and a duplicate id, in source order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

from layercard.errors import LayercardError
from layercard.tasks.example import Example
from layercard.tasks.formats import TableRows, item_by_take
from layercard.tasks.schemas import (
    check_field_map,
    detect_schema,
    detected_map,
    record_to_example,
    schema_columns,
)

__all__ = ["LAZY_BYTES", "LazyExamples", "TableExamples", "table_examples"]

# Data smaller than this (a file's bytes, a table's in memory) is read whole, so that every malformed
# record is reported before any work.
LAZY_BYTES = 16 * 1024 * 1024


class LazyExamples(Sequence[Example], ABC):
    """Examples of one large source, each read from its record when used.

    A subclass gives the records as ``(where, number, record)``: ``where`` names the record in errors
    (``FILE:LINE``, ``SOURCE:ROW``), ``number`` makes the id of a record without one.
    """

    def __init__(self, *, schema: str, columns: Mapping[str, str | None], stem: str) -> None:
        self.schema = schema
        self._columns = dict(columns)
        self._stem = stem

    @property
    @abstractmethod
    def label(self) -> str:
        """What progress bars call the source (a file's name)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _rows_at(self, indices: Sequence[int]) -> Iterable[tuple[str, int, Any]]:
        """The records at ``indices`` (each in range), in that order."""

    @abstractmethod
    def _all_rows(self) -> Iterator[tuple[str, int, Any]]:
        """Every record, in source order."""

    @abstractmethod
    def _source_key(self) -> tuple[Any, ...]:
        """What names the source and its state, for equality: the same data, unchanged."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, {len(self)} examples)"

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Example, ...]: ...
    def __getitem__(self, i: int | slice) -> Example | tuple[Example, ...]:
        return item_by_take(self, i)

    def _key(self) -> tuple[Any, ...]:
        columns = tuple(sorted(self._columns.items(), key=str))
        return (type(self).__name__, *self._source_key(), self.schema, columns, self._stem)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyExamples):  # the same source, unchanged, read alike
            return self._key() == other._key()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def _examples(self, rows: Iterable[tuple[str, int, Any]]) -> Iterator[Example]:
        """``rows`` as examples, each checked, and a duplicate id among them refused as the whole-source
        reader refuses one."""
        seen: set[str] = set()
        for where, number, rec in rows:
            ex = record_to_example(rec, self.schema, self._columns, where, f"{self._stem}-{number:05d}")
            if ex.id in seen:
                raise LayercardError(f"{where}: duplicate id {ex.id!r}")
            seen.add(ex.id)
            yield ex

    def take(self, indices: Sequence[int]) -> tuple[Example, ...]:
        """The examples at ``indices`` (each in range), in that order."""
        return tuple(self._examples(self._rows_at(indices)))

    def __iter__(self) -> Iterator[Example]:
        """Every example in source order, each checked, and ids checked for duplicates."""
        return self._examples(self._all_rows())


class TableExamples(LazyExamples):
    """The examples of a large Parquet file, saved dataset or ``hf:`` dataset, each converted from its
    row when read."""

    def __init__(self, rows: TableRows, **kw: Any) -> None:
        super().__init__(**kw)
        self.rows = rows

    @property
    def label(self) -> str:
        return self.rows.label

    def __len__(self) -> int:
        return len(self.rows)

    def _rows_at(self, indices: Sequence[int]) -> Iterable[tuple[str, int, Any]]:
        return self.rows.take(indices)

    def _all_rows(self) -> Iterator[tuple[str, int, Any]]:
        return iter(self.rows)

    def _source_key(self) -> tuple[Any, ...]:
        return self.rows.key()


def first_record_schema(
    first: tuple[str, int, Any], field_map: Mapping[str, str] | None
) -> tuple[str, dict[str, str | None]]:
    """(schema, columns) of a source whose first record is ``first``, as the whole-source reader detects
    them; a ShareGPT conversation's columns join the field map (:func:`.schemas.detected_map`)."""
    where, _, rec = first
    fmap = detected_map(rec, check_field_map(field_map))
    schema = detect_schema(rec, fmap, where)
    return schema, schema_columns(schema, fmap)


def table_examples(
    rows: TableRows, *, stem: str, field_map: Mapping[str, str] | None
) -> tuple[str, Sequence[Example]]:
    """(schema, examples) of a table's rows: read when used where the table holds :data:`LAZY_BYTES` or
    more, else every row converted and checked now."""
    fmap = check_field_map(field_map)
    if not len(rows):
        raise LayercardError(f"{rows.source}: no examples")
    schema, columns = first_record_schema(rows.take([0])[0], fmap)
    examples = TableExamples(rows, schema=schema, columns=columns, stem=stem)
    if rows.nbytes >= LAZY_BYTES:
        examples.take([0])  # the first record is checked whole, as the schema was read from it
        return schema, examples
    return schema, tuple(examples)
