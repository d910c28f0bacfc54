"""Large JSONL files read a record at a time (layercard.tasks.lines) give what the whole-file reader gives."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import pytest
from tiny_tok import tiny_tokenizer

import layercard.tasks.lazy as lazy_data
from layercard.artifacts import sha256_json, sha256_json_list
from layercard.errors import LayercardError
from layercard.tasks import load_task, target_entropy
from layercard.tasks.lines import LineExamples


def _both(path: Path, monkeypatch, **kw):
    """(the whole-file reader's task, the line reader's task) of ``path``."""
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 1 << 40)
    whole = load_task(str(path), **kw)
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    lazy = load_task(str(path), **kw)
    return whole, lazy


def _awkward(path: Path) -> Path:
    """Records with what line readers get wrong: a byte-order mark, CRLF ends, blank and white-space
    lines (U+3000 and U+001C are white space to str.strip), U+2028 inside a string, rows with and
    without ids, no line break at the end."""
    rows = [
        json.dumps({"input": "a\u2028b", "target": "x"}),
        "",
        "   \t",
        "\u3000",
        "\x1c",
        json.dumps({"id": "own", "input": "é", "target": "y", "references": ["y", "z"]}),
        json.dumps({"input": "c", "target": "w", "extra": [1, None]}, ensure_ascii=False),
    ]
    rows += [json.dumps({"input": f"q{i}", "target": f"t{i}"}) for i in range(40)]
    body = "\r\n".join(rows[:4]) + "\n" + "\n".join(rows[4:])
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    return path


def test_the_line_reader_gives_the_whole_file_readers_examples_hashes_and_subsets(tmp_path, monkeypatch):
    whole, lazy = _both(_awkward(tmp_path / "d.jsonl"), monkeypatch)
    assert isinstance(lazy.examples, LineExamples) and isinstance(whole.examples, tuple)
    assert len(lazy) == len(whole) == 43
    assert list(lazy.examples) == list(whole.examples)
    assert [e.id for e in lazy.examples][:3] == ["d-00001", "own", "d-00007"]  # ids from line numbers
    assert lazy.data_hash == whole.data_hash
    for n, offset in ((5, 0), (7, 3), (None, 40)):
        assert lazy.subset(n, seed=3, offset=offset) == whole.subset(n, seed=3, offset=offset)
    assert lazy.examples[-1] == whole.examples[-1] and lazy.examples[2:4] == whole.examples[2:4]
    with pytest.raises(IndexError):
        lazy.examples[43]
    # a custom prompt and a chosen preset are hashed beside the examples, as the whole-file reader's are
    for kw in ({"prompt": "Q: {input}"}, {"preset": "sst2"}):
        whole_kw, lazy_kw = _both(tmp_path / "d.jsonl", monkeypatch, **kw)
        assert lazy_kw.data_hash == whole_kw.data_hash != whole.data_hash
    tok = tiny_tokenizer()
    assert target_entropy(tok, lazy, 64, sample=50, seed=1) == target_entropy(
        tok, whole, 64, sample=50, seed=1
    )
    assert pickle.loads(pickle.dumps(lazy)) == lazy  # tasks travel to other processes
    assert lazy.shared_with(whole) == whole.shared_with(lazy) == 43


def test_a_large_file_alone_is_read_a_record_at_a_time(tmp_path, monkeypatch):
    p = _awkward(tmp_path / "d.jsonl")
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", p.stat().st_size + 1)
    assert isinstance(load_task(str(p)).examples, tuple)
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", p.stat().st_size)
    assert isinstance(load_task(str(p)).examples, LineExamples)
    json_file = tmp_path / "d.json"  # a JSON array is parsed whole, whatever its size
    json_file.write_text(json.dumps([{"input": "a", "target": "b"}]))
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    assert isinstance(load_task(str(json_file)).examples, tuple)


def test_a_json_file_of_json_lines_is_read_a_record_at_a_time_too(tmp_path, monkeypatch):
    """datasets' to_json writes JSON lines under a .json name; an array, or one value, is read whole."""
    p = tmp_path / "d.json"
    p.write_bytes(_awkward(tmp_path / "a.jsonl").read_bytes())
    whole, lazy = _both(p, monkeypatch)
    assert isinstance(lazy.examples, LineExamples) and isinstance(whole.examples, tuple)
    assert list(lazy.examples) == list(whole.examples) and lazy.data_hash == whole.data_hash
    one = tmp_path / "one.json"
    one.write_text("\n" + json.dumps({"input": "a", "target": "b"}) + "\n")
    array = tmp_path / "array.json"
    array.write_text(" \n" + json.dumps([{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]))
    for path in (one, array):
        outcomes = []
        for size in (1 << 40, 0):
            monkeypatch.setattr(lazy_data, "LAZY_BYTES", size)
            try:
                outcomes.append(("ok", type(load_task(str(path)).examples)))
            except LayercardError as e:
                outcomes.append(("error", str(e)))
        assert outcomes[0] == outcomes[1]
        assert outcomes[0][0] == ("error" if path == one else "ok")  # one value: not an array of records


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON (Expecting property name enclosed in double quotes: column 2)"),
        (json.dumps({"input": "x"}), "field 'target' missing"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"id": "d-00001", "input": "x", "target": "y"}), "duplicate id 'd-00001'"),
    ],
)
def test_a_record_is_checked_when_read_and_all_are_when_all_are_read(tmp_path, monkeypatch, bad, message):
    rows = [json.dumps({"input": f"q{i}", "target": "t"}) for i in range(30)]
    rows[20] = bad
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 1 << 40)
    with pytest.raises(LayercardError, match=re.escape(f"{p}:21: {message}")):
        load_task(str(p))
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    task = load_task(str(p))  # indexed; line 21 is not read yet
    picked = task.subset(5, seed=0)
    assert "d-00021" not in {e.id for e in picked.examples} and len(picked) == 5
    with pytest.raises(LayercardError, match=re.escape(f"{p}:21: {message}")):
        _ = task.data_hash  # every record read: the same error as the whole-file reader's
    with pytest.raises(LayercardError, match=re.escape(f"{p}:21: {message}")):
        task.at([0, 20] if "duplicate" in message else [20])


def test_the_first_record_is_checked_when_the_file_is_indexed(tmp_path, monkeypatch):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"input": 3, "target": "t"}) + "\n" + json.dumps({"input": "a", "target": "b"}))
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    with pytest.raises(LayercardError, match=re.escape(f"{p}:1: field 'input' must be a string")):
        load_task(str(p))
    p.write_text("\n\n")
    with pytest.raises(LayercardError, match=re.escape(f"{p}: no examples")):
        load_task(str(p))


@pytest.mark.parametrize(
    "body",
    [
        b'{"input": "a", "target": "b"}\r{"input": "c", "target": "d"}\n',  # a lone CR breaks the line
        b'{"input": "a", "target": "b"}\n{"input": "\xff", "target": "d"}\n',  # not UTF-8
        b"\x1f\x8b\x08\x00" + bytes(range(200)),  # gzip
    ],
)
def test_what_the_line_reader_cannot_read_the_whole_file_reader_reads_or_names(tmp_path, monkeypatch, body):
    p = tmp_path / "d.jsonl"
    p.write_bytes(body)
    outcomes = []
    for size in (1 << 40, 0):
        monkeypatch.setattr(lazy_data, "LAZY_BYTES", size)
        try:
            t = load_task(str(p))
            outcomes.append(("ok", type(t.examples), [(e.input, e.target) for e in t.examples]))
        except LayercardError as e:
            outcomes.append(("error", str(e)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == ("ok" if body.startswith(b'{"input": "a", "target": "b"}\r') else "error")


def test_a_file_changed_after_it_was_indexed_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"input": f"q{i}", "target": "t"}) + "\n" for i in range(10)))
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    task = load_task(str(p))
    with p.open("a") as f:
        f.write(json.dumps({"input": "new", "target": "t"}) + "\n")
    with pytest.raises(LayercardError, match=re.escape(f"{p}: changed since it was read")):
        task.subset(2)


def test_a_list_hashed_as_it_comes_is_hashed_as_the_whole_list():
    rng = random.Random(0)
    for _ in range(50):
        items = [
            {"a": rng.random(), "é": "x\u2028y", "n": [1, {"z": None}]} for _ in range(rng.randint(0, 4))
        ]
        assert sha256_json_list(iter(items)) == sha256_json(items)
        for beside in ({"prompt": {"b": 1}}, {"preset": "x", "a": 3}):
            assert sha256_json_list(items, into="examples", beside=beside) == sha256_json(
                {"examples": items, **beside}
            )


def test_a_whole_read_of_a_large_file_leaves_its_hash_known(tmp_path, monkeypatch):
    p = _awkward(tmp_path / "d.jsonl")
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 1 << 40)
    whole = load_task(str(p), prompt="Q: {input}")
    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0)
    lazy = load_task(str(p), prompt="Q: {input}")
    small = whole.subset(3)
    assert small.shared_with(lazy) == 3  # reads the large file to its end
    assert "data_hash" in lazy.__dict__ and lazy.data_hash == whole.data_hash
    again = load_task(str(p), prompt="Q: {input}")
    assert any(e.input for e in again._read_all("reading"))  # a read stopped early leaves no hash
    assert "data_hash" not in again.__dict__ and again.data_hash == whole.data_hash
