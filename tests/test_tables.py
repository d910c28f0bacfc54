"""Large Parquet files, saved datasets and hf: datasets read a row at a time (layercard.tasks.lazy) give
what reading every row gives."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest

import layercard.tasks.lazy as lazy_data
from layercard.errors import LayercardError
from layercard.tasks import load_task, read_records
from layercard.tasks.formats import TableRows
from layercard.tasks.lazy import TableExamples

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _rows(n: int = 40) -> list[dict]:
    """Rows with what row readers get wrong: own ids on some, references, None and nested values in
    other columns, text beyond ASCII."""
    rows = []
    for i in range(n):
        row = {
            "id": f"own-{i}" if i % 3 == 0 else None,
            "input": f"q{i} \u2028 é",
            "target": f"t{i}",
            "references": [f"t{i}", f"u{i}"] if i % 4 == 0 else None,
            "extra": [i, None] if i % 2 else None,
            "label": i % 3,
        }
        rows.append(row)
    return rows


def _dataset(rows: list[dict]) -> datasets.Dataset:
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "input": datasets.Value("string"),
            "target": datasets.Value("string"),
            "references": datasets.Sequence(datasets.Value("string")),
            "extra": datasets.Sequence(datasets.Value("int64")),
            "label": datasets.ClassLabel(names=["neg", "neu", "pos"]),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _sources(tmp_path: Path, rows: list[dict]) -> dict[str, str]:
    """The same rows as a Parquet file, a saved Dataset and a saved DatasetDict's split."""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = _dataset(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    return {
        "parquet": str(tmp_path / "d.parquet"),
        "one": str(tmp_path / "one"),
        "dict": str(tmp_path / "dict"),
    }


def _both(spec: str, monkeypatch, **kw):
    """(the task of every row read now, the task whose rows are read when used) of ``spec``."""
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 1 << 40)
    whole = load_task(spec, **kw)
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    return whole, load_task(spec, **kw)


@pytest.mark.parametrize("kind", ["parquet", "one", "dict"])
def test_a_table_read_row_by_row_gives_the_whole_reads_examples_hashes_and_subsets(
    tmp_path, monkeypatch, kind
):
    spec = _sources(tmp_path, _rows())[kind]
    monkeypatch.setattr(TableRows, "_BATCH", 7)  # a whole read crosses batches
    whole, lazy = _both(spec, monkeypatch)
    assert isinstance(lazy.examples, TableExamples) and isinstance(whole.examples, tuple)
    assert len(lazy) == len(whole) == 40
    assert list(lazy.examples) == list(whole.examples)
    ids = [e.id for e in whole.examples]
    stem = Path(spec).stem
    assert ids[:3] == ["own-0", f"{stem}-00002", f"{stem}-00003"]  # ids from row numbers
    assert whole.examples[0].references == ("t0", "u0") and whole.examples[1].meta["extra"] == [1, None]
    assert lazy.data_hash == whole.data_hash
    for n, offset in ((5, 0), (7, 3), (None, 35)):
        assert lazy.subset(n, seed=3, offset=offset) == whole.subset(n, seed=3, offset=offset)
    assert lazy.examples[-1] == whole.examples[-1] and lazy.examples[2:4] == whole.examples[2:4]
    with pytest.raises(IndexError):
        lazy.examples[40]
    for kw in ({"prompt": "Q: {input}"}, {"preset": "sst2"}):
        whole_kw, lazy_kw = _both(spec, monkeypatch, **kw)
        assert lazy_kw.data_hash == whole_kw.data_hash != whole.data_hash
    assert pickle.loads(pickle.dumps(lazy)) == lazy  # tasks travel to other processes
    assert lazy.shared_with(whole) == whole.shared_with(lazy) == 40
    if kind == "dict":  # the other split of a DatasetDict, named in its rows' places
        test = load_task(spec, split="test")
        assert isinstance(test.examples, TableExamples) and len(test) == 3 and test.split == "test"


def test_rows_read_in_batches_are_the_rows_the_libraries_give_one_by_one(tmp_path, monkeypatch):
    rows = _rows(23)
    sources = _sources(tmp_path, rows)
    monkeypatch.setattr(TableRows, "_BATCH", 5)
    parquet = Path(sources["parquet"])
    expected = pq.read_table(parquet).to_pylist()
    assert list(read_records(parquet).rows) == [(f"{parquet}:{i}", i, r) for i, r in enumerate(expected, 1)]
    saved = datasets.load_from_disk(sources["one"])
    one_by_one = [(f"{sources['one']}:{i}", i, r) for i, r in enumerate(saved, start=1)]
    got = read_records(sources["one"]).rows
    assert list(got) == one_by_one and got[4] == one_by_one[4] and got[-1] == one_by_one[-1]
    assert got.take([9, 2]) == [one_by_one[9], one_by_one[2]]
    assert got[1:3] == one_by_one[1:3]
    assert one_by_one[0][2]["label"] == 0 and one_by_one[1][2]["extra"] == [1, None]


def test_hf_datasets_are_read_row_by_row_where_large(monkeypatch):
    ds = _dataset(_rows())
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, *, split: ds)
    whole, lazy = _both("hf:demo/qa", monkeypatch)
    assert isinstance(lazy.examples, TableExamples) and list(lazy.examples) == list(whole.examples)
    assert lazy.data_hash == whole.data_hash and whole.examples[1].id == "qa[train]-00002"
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, *, split: ds.select([]))
    with pytest.raises(LayercardError, match=re.escape("hf:demo/qa[train]: no examples")):
        load_task("hf:demo/qa")


@pytest.mark.parametrize(
    "bad, message",
    [({"target": None}, "field 'target' missing"), ({"id": "own-0"}, "duplicate id 'own-0'")],
)
def test_a_row_is_checked_when_read_and_all_are_when_all_are_read(tmp_path, monkeypatch, bad, message):
    rows = [{"id": None, "input": f"q{i}", "target": "t"} for i in range(30)]
    rows[0]["id"] = "own-0"
    rows[20] = {**rows[20], **bad}
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 1 << 40)
    with pytest.raises(LayercardError, match=re.escape(f"{p}:21: {message}")):
        load_task(str(p))
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    task = load_task(str(p))  # row 21 is not read yet
    picked = task.subset(5, seed=0)
    assert "d-00021" not in {e.id for e in picked.examples} and len(picked) == 5
    with pytest.raises(LayercardError, match=re.escape(f"{p}:21: {message}")):
        _ = task.data_hash  # every row read: the same error as the whole read's
    with pytest.raises(LayercardError, match=re.escape(f"{p}:21: {message}")):
        task.at([0, 20] if "duplicate" in message else [20])


def test_the_first_row_is_checked_when_the_table_is_opened(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"input": "a", "target": None}, {"input": "b", "target": "c"}]), p)
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    with pytest.raises(LayercardError, match=re.escape(f"{p}:1: field 'target' missing")):
        load_task(str(p))
    pq.write_table(pa.Table.from_pylist([{"input": "a", "target": "b"}]).slice(0, 0), p)
    with pytest.raises(LayercardError, match=re.escape(f"{p}: no examples")):
        load_task(str(p))
    with pytest.raises(LayercardError, match=re.escape("field_map: unknown key 'answer'")):
        load_task(str(p), field_map={"answer": "b"})  # the field map is checked first, as for any file


def test_only_a_large_table_is_read_row_by_row(tmp_path, monkeypatch):
    sources = _sources(tmp_path, _rows())
    for spec in sources.values():
        size = read_records(spec, split="train" if spec.endswith("dict") else None).rows.nbytes
        monkeypatch.setattr(lazy_data, "LAZY_BYTES", size + 1)
        assert isinstance(load_task(spec).examples, tuple)
        monkeypatch.setattr(lazy_data, "LAZY_BYTES", size)
        assert isinstance(load_task(spec).examples, TableExamples)


def test_a_saved_dataset_changed_after_it_was_opened_is_refused(tmp_path, monkeypatch):
    spec = _sources(tmp_path, _rows())["one"]
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    task = load_task(spec)
    task.subset(2)
    arrow = next(Path(spec).glob("*.arrow"))
    st = arrow.stat()
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(LayercardError, match=re.escape(f"{spec}: changed since it was read")):
        task.subset(2)
