"""Data files and schemas, field maps, prompt settings and the task's identity (layercard.tasks)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from layercard.config.run import TaskSpec
from layercard.config.schema import ConfigError
from layercard.errors import LayercardError, MissingSplit
from layercard.tasks import PRESETS, held_out, is_file_spec, load_task, names_split, read_records

ALPACA = [
    {"instruction": "Name the colour of the sky.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "source": "math"},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
QA = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]


def write_jsonl(path: Path, rows: list, *, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], *, bom: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("bom", [False, True])
def test_the_same_rows_read_alike_from_jsonl_json_csv_and_parquet(tmp_path, bom):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"input": "x1", "target": "y1"}, {"input": 'x, "2"\nnext', "target": "y2"}]
    files = [write_jsonl(tmp_path / "d.jsonl", rows, bom=bom), write_csv(tmp_path / "d.csv", rows, bom=bom)]
    (tmp_path / "d.json").write_text(("\ufeff" if bom else "") + json.dumps(rows, indent=2), encoding="utf-8")
    files.append(tmp_path / "d.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    files.append(tmp_path / "d.parquet")
    tasks = [load_task(str(f)) for f in files]
    assert all(
        [(e.input, e.target) for e in t.examples] == [(r["input"], r["target"]) for r in rows] for t in tasks
    )
    assert all(t.format.name == "jsonl" and t.name == "d" for t in tasks)


def test_json_records_are_named_by_the_line_they_start_on(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"input": "a", "target": "b"},\n  {"input": "c"}\n]\n')
    with pytest.raises(LayercardError, match=re.escape(f"{p}:3: field 'target' missing")):
        load_task(str(p))
    p.write_text('[{"input": "a", "target": "b"}, {"input": "c"}]')  # one line: the record says which
    with pytest.raises(LayercardError, match=re.escape(f"{p}:1 (record 2): field 'target' missing")):
        load_task(str(p))
    p.write_text('[{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]')
    assert [e.id for e in load_task(str(p)).examples] == ["d-00001", "d-00002"]
    p.write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n')  # JSON lines in .json
    assert [e.target for e in load_task(str(p)).examples] == ["b", "d"]
    p.write_text('[{"input": "a", "target": "b"},]')
    with pytest.raises(LayercardError, match=re.escape(f"{p}:1: not valid JSON")):
        load_task(str(p))
    p.write_text('{"data": []}')
    with pytest.raises(LayercardError, match="expected a JSON array of records"):
        load_task(str(p))


def test_csv_rows_errors_name_the_starting_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('input,target\n"multi\nline",ok\nx,\n')
    with pytest.raises(LayercardError, match=re.escape(f"{p}:4: field 'target' missing (empty string)")):
        load_task(str(p))
    p.write_text("input,target\na,b,c\n")
    with pytest.raises(LayercardError, match=re.escape(f"{p}:2: 3 cells, the header has 2")):
        load_task(str(p))
    p.write_text("input,input\na,b\n")
    with pytest.raises(LayercardError, match="column 'input' appears twice"):
        load_task(str(p))


def test_csv_references_cell_takes_a_json_list_or_one_string(tmp_path):
    p = write_csv(
        tmp_path / "r.csv",
        [
            {"input": "a", "target": "b", "references": '["b", "bee"]'},
            {"input": "c", "target": "d", "references": "dee"},
            {"input": "e", "target": "f", "references": ""},
            {"input": "g", "target": "h", "references": "[name=A | age=3]"},  # not JSON: one reference
        ],
    )
    refs = [e.references for e in load_task(str(p)).examples]
    assert refs == [("b", "bee"), ("dee",), ("f",), ("[name=A | age=3]",)]


def test_not_utf8_and_missing_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "latin.csv"
    bad.write_bytes("input,target\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(LayercardError, match=re.escape(f"{bad}: not UTF-8 text")):
        load_task(str(bad))
    with pytest.raises(LayercardError, match="no such file"):
        load_task(str(tmp_path / "absent.parquet"))
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not data")
    with pytest.raises(LayercardError, match="a folder with no data file .*and not a saved dataset"):
        load_task(str(folder))


def test_a_folder_of_data_files_holds_one_split_a_file(tmp_path):
    """calls/train.jsonl and calls/validation.csv: the task calls, its splits named by the files."""
    from layercard.tasks.data import dataset_spec, validation_task

    calls = tmp_path / "calls"
    write_jsonl(calls / "train.jsonl", [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}])
    (calls / "validation.csv").write_text("input,target\ne,f\n")
    (calls / "README.md").write_text("# not data")
    (calls / ".hidden.jsonl").write_text("not json")
    t = load_task(str(calls))
    assert (t.name, t.split, len(t), t.source) == (
        "calls",
        "train",
        2,
        str((calls / "train.jsonl").resolve()),
    )
    v = load_task(str(calls), split="validation")
    assert (v.name, v.split, [e.input for e in v.examples]) == ("calls", "validation", ["e"])
    with pytest.raises(MissingSplit, match=re.escape("no split 'test'; its splits: train, validation")):
        load_task(str(calls), split="test")
    # like a DatasetDict: splits to hold out, the validation split first
    assert (
        not is_file_spec(str(calls))
        and not names_split(str(calls))
        and dataset_spec(str(calls)) == str(calls)
    )
    held = held_out(str(calls), exclude="train")
    assert held is not None and held.split == "validation"
    assert validation_task(None, None, str(calls), "train").split == "validation"
    # FOLDER:SPLIT names a split as PRESET:SPLIT does, here and in a run config beside the folder
    assert load_task(f"{calls}:validation").split == "validation" and names_split(f"{calls}:validation")
    assert dataset_spec(f"{calls}:validation") == str(calls)
    assert held_out(f"{calls}:train", exclude="train").split == "validation"
    with pytest.raises(LayercardError, match="split 'validation' in the spec but split='train' given"):
        load_task(f"{calls}:validation", split="train")
    with pytest.raises(MissingSplit, match="no split 'test'"):
        load_task(f"{calls}:test")
    from layercard.pipeline.config import load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: tiny\ntask: {train: calls, eval: calls:validation}\nplacements: [{name: a, policy: all}]\n"
    )
    spec = load_config(cfg).task
    assert (spec.train, spec.eval) == (str(calls), f"{calls}:validation")
    # no train split and more than one other: one must be chosen
    two = tmp_path / "two"
    for name in ("a", "b"):
        write_jsonl(two / f"{name}.jsonl", [{"input": "x", "target": "y"}])
    with pytest.raises(
        LayercardError, match=re.escape("splits a, b; choose one (") + ".*:SPLIT, or a split option"
    ):
        load_task(str(two))
    assert load_task(str(two), split="b").split == "b"
    # a split in shards, or twice, is refused
    (two / "b.csv").write_text("input,target\nx,y\n")
    with pytest.raises(LayercardError, match=re.escape("two files of split 'b' (b.csv, b.jsonl); keep one")):
        load_task(str(two), split="a")
    shards = tmp_path / "shards"
    write_jsonl(shards / "train-00000-of-00002.jsonl", [{"input": "x", "target": "y"}])
    with pytest.raises(
        LayercardError, match="one shard of a split; shards are joined where they are Parquet"
    ):
        load_task(str(shards))


def test_saved_dataset_folders_and_their_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = tmp_path / "one"
    datasets.Dataset.from_list(QA).save_to_disk(str(one))
    t = load_task(str(one), field_map={"input": "question", "target": "answer"})
    assert [e.input for e in t.examples] == ["q1", "q2"] and t.name == "one" and is_file_spec(str(one))
    both = tmp_path / "both"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA), "validation": datasets.Dataset.from_list(ALPACA[:1])}
    ).save_to_disk(str(both))
    assert len(load_task(str(both))) == 2 and load_task(str(both)).split == "train"
    val = load_task(str(both), split="validation")
    assert (len(val), val.split, val.source.endswith("both")) == (1, "validation", True)
    with pytest.raises(LayercardError, match=re.escape("no split 'test'; its splits: train, validation")):
        load_task(str(both), split="test")
    # a DatasetDict has splits to hold out, like a preset; a single file or Dataset has none
    assert not is_file_spec(str(both)) and not names_split(str(both))
    held = held_out(str(both), exclude="train")
    assert held is not None and held.split == "validation" and len(held) == 1
    assert held_out(str(one)) is None
    bad = tmp_path / "bad"
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(QA), "b": datasets.Dataset.from_list(QA)}
    ).save_to_disk(str(bad))
    with pytest.raises(
        LayercardError, match=re.escape("splits a, b; choose one (") + ".*:SPLIT, or a split option"
    ):
        load_task(str(bad))


def test_a_folder_named_like_a_builtin_task_leaves_the_task_builtin(tmp_path, monkeypatch):
    from layercard.pipeline.config import load_config

    # a demo's output holds facts/ and format/: run from there, the names are still the synthetic tasks,
    # though the folders hold JSON files
    for name in ("facts", "format"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert not is_file_spec("facts") and not is_file_spec("format:train")
    held = held_out("facts", exclude="train")
    assert held is not None and held.split == "test" and load_task("facts").split == "train"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\ntask: facts\nplacements: [{name: a, policy: all, budget: layers=1}]\n")
    assert load_config(cfg).task.train == "facts"
    cfg.write_text("model: tiny\ntask: {train: facts, eval: format}\nplacements: [{name: a, policy: all}]\n")
    assert (load_config(cfg).task.train, load_config(cfg).task.eval) == ("facts", "format")
    # a folder of another name is still a path, read from the config's folder
    (tmp_path / "mine").mkdir()
    cfg.write_text("model: tiny\ntask: mine\nplacements: [{name: a, policy: all}]\n")
    assert load_config(cfg).task.train == str(tmp_path / "mine") and is_file_spec("mine")


def test_read_records_numbers_rows_of_tables(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "qa.parquet")
    recs = read_records(tmp_path / "qa.parquet")
    assert [(w, n) for w, n, _ in recs.rows] == [(f"{tmp_path / 'qa.parquet'}:{i}", i) for i in (1, 2)]
    with pytest.raises(LayercardError, match=re.escape(f"{tmp_path / 'qa.parquet'}:1: no known schema")):
        load_task(str(tmp_path / "qa.parquet"))


# ---------------------------------------------------------------- schemas


def test_alpaca_instruction_and_input_make_the_input(tmp_path):
    t = load_task(str(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)))
    a, b = t.examples
    assert (a.input, a.target) == ("Name the colour of the sky.", "Blue.")
    assert (b.input, b.target, dict(b.meta)) == ("Add the numbers.\n\n2 and 3", "5", {"source": "math"})
    assert t.format.name == "jsonl"
    with pytest.raises(LayercardError, match=re.escape(":2: field 'output' missing")):
        load_task(str(write_jsonl(tmp_path / "bad.jsonl", [ALPACA[0], {"instruction": "x"}])))


def test_chat_messages_keep_the_conversation(tmp_path):
    t = load_task(str(write_jsonl(tmp_path / "chat.jsonl", CHAT)))
    a, b = t.examples
    assert t.format.name == "chat" and t.name == "chat"
    assert (a.input, a.target) == ("Capital of France?", "Paris.")
    assert a.messages[0] == ("system", "Be brief.") and len(a.messages) == 5
    assert b.messages == (("user", "2+2?"), ("assistant", "4"))
    assert a.to_dict()["messages"][1] == {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "must be a non-empty list"),
        ([{"role": "user", "content": "hi"}], "the last turn must be the assistant's"),
        ([{"role": "assistant", "content": "hi"}], "must start with a user turn"),
        (
            [{"role": "bot", "content": "hi"}],
            "field 'messages'[0].role: 'bot' is not one of system, user, assistant, tool, human, gpt, "
            "function_call, observation",
        ),
        ([{"role": "user", "content": ""}], "field 'messages'[0].content: must be a non-empty string"),
        (
            [{"from": "user", "content": "hi"}],
            "field 'messages'[0]: no key 'role' (the item's keys: from, content)",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "[1]: a system turn may only come first",
        ),
    ],
)
def test_bad_conversations_name_file_line_and_turn(tmp_path, messages, message):
    p = write_jsonl(tmp_path / "c.jsonl", [CHAT[1], {"messages": messages}])
    with pytest.raises(LayercardError, match=re.escape(f"{p}:2: ") + ".*" + re.escape(message)):
        load_task(str(p))


def _sharegpt(row: dict) -> dict:
    """A chat record in ShareGPT's layout: the system turn as a field of its own."""
    turns = row["messages"]
    names = {"user": "human", "assistant": "gpt"}
    out: dict = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in turns[1:]]}
    if turns[0]["role"] == "system":
        out["system"] = turns[0]["content"]
    else:
        out["conversations"].insert(0, {"from": names[turns[0]["role"]], "value": turns[0]["content"]})
    return out


def test_sharegpt_conversations_read_as_the_same_chat_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_sharegpt(r) for r in CHAT]
    assert rows[0]["system"] == "Be brief." and "system" not in rows[1]
    chat = load_task(str(write_jsonl(tmp_path / "m" / "chat.jsonl", CHAT)))
    files = [write_jsonl(tmp_path / "s" / "chat.jsonl", rows)]
    files.append(tmp_path / "a" / "chat.json")
    files[-1].parent.mkdir()
    files[-1].write_text(json.dumps(rows, indent=1))
    files.append(tmp_path / "p" / "chat.parquet")
    files[-1].parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"system": None, **r} for r in rows]), files[-1])
    (tmp_path / "c").mkdir()
    files.append(write_csv(tmp_path / "c" / "chat.csv", [{"system": r.get("system", ""),
                                                          "conversations": json.dumps(r["conversations"])}
                                                         for r in rows]))  # fmt: skip
    for f in files:
        t = load_task(str(f))
        assert t.format.name == "chat" and t.schema == "chat", f
        # turns, input, target and no leftover fields; a CSV row's id is its line, after the header
        same = [(e.input, e.target, e.messages, e.meta) for e in t.examples]
        assert same == [(e.input, e.target, e.messages, e.meta) for e in chat.examples], f
        assert t.data_hash == chat.data_hash or f.suffix == ".csv", f
    # chat messages under ShareGPT's column name
    named = write_jsonl(tmp_path / "n" / "chat.jsonl", [{"conversations": r["messages"]} for r in CHAT])
    assert load_task(str(named)).data_hash == chat.data_hash
    # "human" and "gpt" are user and assistant in any chat data
    renamed = [
        {
            "messages": [
                {**m, "role": {"user": "human"}.get(m["role"], m["role"])} for m in CHAT[1]["messages"]
            ]
        }
    ]
    assert load_task(str(write_jsonl(tmp_path / "r.jsonl", renamed))).examples[0].messages == (
        ("user", "2+2?"),
        ("assistant", "4"),
    )


def test_a_sharegpt_system_field_and_the_field_map(tmp_path):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    both = {"system": "Be brief.", "conversations": [{"from": "system", "value": "Terse."}, *conv]}
    p = write_jsonl(tmp_path / "both.jsonl", [both])
    with pytest.raises(LayercardError, match=re.escape(f"{p}:1: field 'system' and the conversation's own")):
        load_task(str(p))
    p = write_jsonl(tmp_path / "odd.jsonl", [{"conversations": conv}, {"conversations": conv, "system": 3}])
    with pytest.raises(LayercardError, match=re.escape(f"{p}:2: field 'system' must be a string, got int")):
        load_task(str(p))
    # a null or blank system field is none; the field map names it for other chat data
    p = write_jsonl(tmp_path / "blank.jsonl", [{"conversations": conv, "system": " "}])
    assert load_task(str(p)).examples[0].messages[0] == ("user", "Hi")
    own = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "sys": "S"}
    ]
    p = write_jsonl(tmp_path / "own.jsonl", own)
    assert load_task(str(p)).examples[0].meta == {"sys": "S"}  # not read unless named
    t = load_task(str(p), field_map={"system": "sys"})
    assert t.examples[0].messages[0] == ("system", "S") and t.examples[0].meta == {}
    # a field map naming other fields reads the record as they say
    p = write_jsonl(tmp_path / "qa.jsonl", [{"conversations": conv, "q": "x", "a": "y"}])
    assert load_task(str(p), field_map={"input": "q", "target": "a"}).schema == "input_target"
    # tool use: the call is the assistant's turn, what it returned a tool turn; the definitions stay in meta
    call = [{"from": "function_call", "value": "f()"}, {"from": "observation", "value": "42"}]
    tool = {"conversations": [*conv[:1], *call, conv[1]], "tools": '[{"name": "f"}]'}
    sharegpt = load_task(str(write_jsonl(tmp_path / "tool.jsonl", [tool])))
    ex = sharegpt.examples[0]
    assert ex.messages == (("user", "Hi"), ("assistant", "f()"), ("tool", "42"), ("assistant", "Hello."))
    assert (ex.input, ex.target, ex.meta) == ("Hi", "Hello.", {"tools": tool["tools"]})
    # the same conversation as messages with a tool role: the same examples and hash
    turns = [{"role": r, "content": c} for r, c in ex.messages]
    same = write_jsonl(tmp_path / "m" / "tool.jsonl", [{"messages": turns, "tools": tool["tools"]}])
    assert load_task(str(same)).data_hash == sharegpt.data_hash
    # tools: a list of definitions or its JSON text, checked at load; none is none
    for ok in ([{"name": "f"}], None, "", "[]"):
        assert load_task(str(write_jsonl(tmp_path / "ok.jsonl", [{**tool, "tools": ok}]))).examples[0]
    for bad, said in (("f()", "not JSON"), ('{"name": "f"}', "must be a list of tool definitions"),
                      (["f"], "must be a list of tool definitions")):  # fmt: skip
        p = write_jsonl(tmp_path / "bad_tools.jsonl", [tool, {**tool, "tools": bad}])
        with pytest.raises(LayercardError, match=re.escape(f"{p}:2: field 'tools': {said}")):
            load_task(str(p))
    # a role still unknown is refused by name
    odd = {"conversations": [*conv[:1], {"from": "bot", "value": "f()"}, conv[1]]}
    p = write_jsonl(tmp_path / "odd_role.jsonl", [odd])
    with pytest.raises(
        LayercardError,
        match=re.escape("'conversations'[1].from: 'bot' is not one of system, user, assistant, tool, human"),
    ):
        load_task(str(p))


def test_plain_text_is_a_completion_task(tmp_path):
    t = load_task(str(write_jsonl(tmp_path / "notes.jsonl", [{"text": "Once upon a time."}])))
    ex = t.examples[0]
    assert (ex.input, ex.target) == ("", "Once upon a time.")
    assert t.format.completion and not t.format.chat_template and t.format.name == "text"
    with pytest.raises(LayercardError, match="prompt: plain-text data has no prompt"):
        load_task(str(tmp_path / "notes.jsonl"), prompt="Q: {input}")
    with pytest.raises(LayercardError, match="chat_template: plain-text data has no prompt"):
        load_task(str(tmp_path / "notes.jsonl"), chat_template=True)
    assert load_task(str(tmp_path / "notes.jsonl"), preset="text").examples == t.examples
    # the plain-text format trains on the target alone: data with inputs would lose them
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"input": "q", "target": "a"}])
    for spec in (str(qa), "synthetic:facts"):
        with pytest.raises(
            LayercardError, match="preset 'text': plain text, .* has inputs, which it would drop"
        ):
            load_task(spec, preset="text")


def test_field_map_renames_columns_and_chooses_the_schema(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", QA)
    t = load_task(str(p), field_map={"input": "question", "target": "answer"})
    assert [(e.input, e.target) for e in t.examples] == [("q1", "a1"), ("q2", "a2")]
    sharegpt = [{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}]
    chat = load_task(
        str(write_jsonl(tmp_path / "sg.jsonl", sharegpt)),
        field_map={"messages": "conversations", "role": "from", "content": "value"},
    )
    assert chat.examples[0].messages == (("user", "hi"), ("assistant", "yo"))
    # mapping `target` says input/target even when the first row lacks the column
    with pytest.raises(LayercardError, match=re.escape(":1: field 'answer' missing")):
        load_task(str(write_jsonl(tmp_path / "b.jsonl", [{"input": "q"}])), field_map={"target": "answer"})
    with pytest.raises(LayercardError, match="field_map: unknown key 'label'; valid: id, input"):
        load_task(str(p), field_map={"label": "x"})
    with pytest.raises(LayercardError, match="names fields of several schemas"):
        load_task(str(p), field_map={"target": "answer", "text": "question"})


def test_no_schema_fits_lists_the_fields_found(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(LayercardError) as e:
        load_task(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:1: no known schema fits the fields found (question, answer)")
    assert "instruction + output (Alpaca)" in msg and "--field input=COLUMN" in msg and "\n" not in msg
    with pytest.raises(LayercardError) as e:  # a map naming a column the data lacks says so
        load_task(str(p), field_map={"input": "quest"})
    assert (
        str(e.value) == f"{p}:1: field map input=quest: no such column (the fields found: question, answer)"
    )
    # the fields are there and one is null: that row says which, not "no schema fits"
    null = {"input": "x", "target": None}
    for rows, line in (
        ([null, {"input": "y", "target": "z"}], 1),
        ([{"input": "y", "target": "z"}, null], 2),
    ):
        with pytest.raises(LayercardError, match=rf"n\.jsonl:{line}: field 'target' missing"):
            load_task(str(write_jsonl(tmp_path / "n.jsonl", rows)))


# ---------------------------------------------------------------- prompt settings and identity


def test_prompt_settings_replace_the_wording(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"input": "x", "target": "y"}])
    t = load_task(str(p), prompt="  Summarize:\n{input}\n", system="Be terse.", chat_template=False)
    assert t.format.prompt() == {
        "template": "Summarize:\n{input}",
        "system": "Be terse.",
        "chat_template": False,
    }
    (tmp_path / "tmpl.txt").write_text("From a file: {input}\n")
    assert load_task(str(p), prompt=f"@{tmp_path / 'tmpl.txt'}").format.instruction == "From a file: {input}"
    with pytest.raises(LayercardError, match=re.escape("prompt: 'Summarize' has no {input} placeholder")):
        load_task(str(p), prompt="Summarize")
    with pytest.raises(LayercardError, match="prompt: '@nope.txt': no such file"):
        load_task(str(p), prompt="@nope.txt")
    with pytest.raises(LayercardError, match="system: is empty"):
        load_task(str(p), system="  ")


def test_a_prompt_of_its_own_changes_the_data_hash_and_is_described(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"input": "x", "target": "y"}])
    plain = load_task(str(p))
    same = load_task(str(p), prompt="{input}", chat_template=True)  # the preset's own prompt, spelled out
    hashes = {
        plain.data_hash,
        load_task(str(p), prompt="Q: {input}").data_hash,
        load_task(str(p), system="Be terse.").data_hash,
        load_task(str(p), chat_template=False).data_hash,
    }
    assert same.data_hash == plain.data_hash and len(hashes) == 4
    d = load_task(str(p), prompt="Q: {input}").describe()
    assert d["prompt"] == {"template": "Q: {input}", "system": None, "chat_template": True, "custom": True}
    assert d["format"]["instruction"] == "Q: {input}" and plain.describe()["prompt"]["custom"] is False


def test_a_preset_other_than_the_datas_own_changes_the_data_hash(tmp_path):
    """Two presets prompt and cut the same records differently: a card or run stage made under one must
    not be taken for the other's, so the hash covers a preset the data does not name."""
    p = write_jsonl(tmp_path / "qa.jsonl", [{"input": "x", "target": "y"}])
    plain = load_task(str(p))
    assert load_task(str(p), preset="jsonl").data_hash == plain.data_hash  # the data's own preset
    facts = load_task(str(p), preset="facts")
    sst2 = load_task(str(p), preset="sst2")
    assert len({plain.data_hash, facts.data_hash, sst2.data_hash}) == 3
    assert facts.subset(1).data_hash == facts.data_hash  # subsets keep what the hash covers
    assert load_task(str(p), preset="facts", prompt="Q: {input}").data_hash != facts.data_hash
    synthetic = load_task("synthetic:facts")
    assert load_task("synthetic:facts", preset="facts").data_hash == synthetic.data_hash
    assert load_task("synthetic:facts", preset="jsonl").data_hash != synthetic.data_hash


def test_presets_and_synthetic_keep_their_data_hash():
    """A task without prompt settings hashes as before prompts existed (cards made then stay valid)."""
    from layercard.artifacts import sha256_json

    t = load_task("synthetic:facts")
    assert t.data_hash == sha256_json([e.to_dict() for e in t.examples])
    assert "chat_template" not in t.format.to_dict() and "messages" not in t.examples[0].to_dict()
    assert PRESETS["text"].to_dict()["completion"] is True


# ---------------------------------------------------------------- run config and command line


def test_task_spec_carries_fields_and_prompt_settings():
    spec = TaskSpec.from_mapping(
        {
            "train": "qa.csv",
            "fields": {"input": "question", "target": "answer"},
            "prompt": "Q: {input}",
            "system": "Be terse.",
            "chat_template": False,
        }
    )
    assert spec.fields == "input=question,target=answer"
    assert spec.load_kwargs() == {
        "field_map": {"input": "question", "target": "answer"},
        "prompt": "Q: {input}",
        "system": "Be terse.",
        "chat_template": False,
    }
    assert TaskSpec.build("task", train="synthetic:facts").load_kwargs() == {}
    assert TaskSpec.from_mapping({"train": "x", "fields": ["input=q"]}).fields == "input=q"
    # a column whose name holds a comma survives the setting's text
    comma = TaskSpec.from_mapping({"train": "x", "fields": {"input": "Question, text", "target": "a"}})
    assert comma.load_kwargs()["field_map"] == {"input": "Question, text", "target": "a"}
    with pytest.raises(ConfigError, match=re.escape("task.fields: 'input' is not NAME=COLUMN")):
        TaskSpec.from_mapping({"train": "x", "fields": "input"})
    with pytest.raises(ConfigError, match="task.chat_template: must be true or false"):
        TaskSpec.from_mapping({"train": "x", "chat_template": "yes"})


def test_task_options_become_load_task_keywords(tmp_path):
    import typer
    from typer.testing import CliRunner

    from layercard.cli.app import guard
    from layercard.cli.task_options import task_options

    app = typer.Typer()
    seen: list[dict] = []

    @app.command()
    @guard
    @task_options
    def cmd(task: str = "x", task_kw: dict | None = None) -> None:
        seen.append(task_kw or {})

    @app.command()
    def other() -> None:  # a second command keeps typer's subcommand form
        pass

    runner = CliRunner()
    args = ["--prompt", r"Summarize:\n{input}", "--system", "@s.txt", "--no-chat-template"]
    args += ["--field", "input=question", "--field", "target=answer"]
    assert runner.invoke(app, ["cmd", *args]).exit_code == 0
    assert runner.invoke(app, ["cmd"]).exit_code == 0
    assert seen == [
        {
            "field_map": {"input": "question", "target": "answer"},
            "prompt": "Summarize:\n{input}",  # \n from the shell is a newline
            "system": "@s.txt",  # a file is read by load_task, as it is
            "chat_template": False,
        },
        {},
    ]
    bad = runner.invoke(app, ["cmd", "--field", "input"])
    assert bad.exit_code != 0 and "--field: 'input' is not NAME=COLUMN" in bad.output


def test_a_held_out_split_that_exists_but_is_malformed_is_an_error_not_skipped(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    row = {"id": "a", "input": "fine", "target": "positive"}
    (root / "sst2" / "train.jsonl").write_text(json.dumps(row) + "\n")
    (root / "sst2" / "validation.jsonl").write_text(json.dumps(row) + "\n" + '{"id": "b", "input": "x"}\n')
    monkeypatch.setenv("LAYERCARD_DATA", str(root))
    with pytest.raises(LayercardError, match="validation.jsonl:2"):
        held_out("sst2:train", exclude="train")
    (root / "sst2" / "validation.jsonl").unlink()  # absent, it is skipped: sst2 has no test split here
    assert held_out("sst2:train", exclude="train") is None


def test_a_single_file_is_its_own_split_and_refuses_any_other(tmp_path):
    p = tmp_path / "tr.jsonl"
    p.write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    assert load_task(str(p)).split == "tr" and load_task(str(p), split="tr").split == "tr"
    # scoring (or validating on) the training rows as if they were a test split: refused, in one line
    with pytest.raises(
        MissingSplit, match=re.escape(f"{p}: one file, no split 'test' (its own: 'tr'); leave the split")
    ):
        load_task(str(p), split="test")
    csv_file = write_csv(tmp_path / "val.csv", [{"input": "a", "target": "b"}])
    assert load_task(str(csv_file), split="val").split == "val"
    with pytest.raises(MissingSplit, match="one file, no split 'train'"):
        load_task(str(csv_file), split="train")
    # a held-out lookup passes a file over (it has no other split) rather than failing
    assert held_out(str(p), exclude="tr") is None and held_out(str(p), exclude="train") is None


def test_a_single_saved_dataset_refuses_a_split_it_does_not_record(tmp_path):
    datasets = pytest.importorskip("datasets")
    plain, split = tmp_path / "plain", tmp_path / "recorded"
    datasets.Dataset.from_list(QA).save_to_disk(str(plain))
    datasets.Dataset.from_list(QA, split="train").save_to_disk(str(split))
    fields = {"field_map": {"input": "question", "target": "answer"}}
    assert len(load_task(str(plain), split="plain", **fields)) == 2
    assert len(load_task(str(split), split="train", **fields)) == 2  # the split it records
    with pytest.raises(MissingSplit, match=re.escape(f"{plain}: one saved Dataset, no split 'test'")):
        load_task(str(plain), split="test", **fields)
    with pytest.raises(MissingSplit, match="no split 'validation'"):
        load_task(str(split), split="validation", **fields)


def test_tsv_quotes_are_text_and_csv_keeps_its_quoting(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text(
        'input\ttarget\n"Great" movie, he said\tpositive\n"unclosed quote\tnegative\nok\tpositive\n'
    )
    rows = [(e.input, e.target) for e in load_task(str(tsv)).examples]
    assert rows == [
        ('"Great" movie, he said', "positive"),
        ('"unclosed quote', "negative"),
        ("ok", "positive"),
    ]
    assert [where for where, _, _ in read_records(tsv).rows] == [f"{tsv}:{n}" for n in (2, 3, 4)]
    # as Python's csv writes it: quoted cells holding quotes, tabs and newlines
    written = tmp_path / "w.tsv"
    with written.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(
            [["input", "target"], ['He said "hi"', "positive"], ["line1\nline2", "negative"], ["a\tb", "x"]]
        )
    rows = [(e.input, e.target) for e in load_task(str(written)).examples]
    assert rows == [('He said "hi"', "positive"), ("line1\nline2", "negative"), ("a\tb", "x")]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('input,target\n"Great, he said",positive\n')
    assert load_task(str(csv_file)).examples[0].input == "Great, he said"


def test_a_compressed_data_file_is_named_so(tmp_path):
    """A .jsonl.gz given as a task is compressed, not text that is not UTF-8: the error says which and how
    to undo it."""
    import gzip

    from layercard.tasks import load_task

    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"input": "a", "target": "b"}\n' * 200)
    with pytest.raises(LayercardError, match=re.escape(f"{path}: gzip-compressed, not text; decompress it")):
        load_task(str(path))
    import lzma

    xz = tmp_path / "data.jsonl.xz"
    xz.write_bytes(lzma.compress(b'{"input": "a", "target": "b"}\n' * 200))
    with pytest.raises(LayercardError, match=re.escape(f"{xz}: xz-compressed, not text")):
        load_task(str(xz))


def _shards(folder: Path, split: str, rows: list, sizes: list[int]) -> list[Path]:
    """``rows`` written as Parquet shards of ``split`` of the given sizes, named as the hub names them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for k, size in enumerate(sizes):
        paths.append(folder / f"{split}-{k:05d}-of-{len(sizes):05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[start : start + size]), paths[-1])
        start += size
    return paths


@pytest.mark.parametrize("lazy", [False, True])
def test_a_split_in_parquet_shards_reads_as_one_file_of_its_rows(tmp_path, monkeypatch, lazy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import layercard.tasks.lazy as lazy_data

    monkeypatch.setattr(lazy_data, "LAZY_BYTES", 0 if lazy else 1 << 40)
    rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(7)]  # no ids: named by row number
    _shards(tmp_path / "sharded", "train", rows, [3, 1, 3])
    _shards(tmp_path / "sharded", "test", rows[:2], [2])  # one shard of one
    (tmp_path / "whole").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "whole" / "train.parquet")
    joined, whole = load_task(str(tmp_path / "sharded")), load_task(str(tmp_path / "whole"))
    assert joined.split == "train" and len(joined) == 7
    assert [e.to_dict() for e in joined.examples] == [e.to_dict() for e in whole.examples]
    assert joined.data_hash == whole.data_hash
    assert joined.source == str((tmp_path / "sharded").resolve())
    test = load_task(str(tmp_path / "sharded"), split="test")
    assert [e.input for e in test.examples] == ["q0", "q1"] and test.split == "test"
    # a record is named by its own shard and its row there
    bad = [*rows[:4], {"nothing": "here"}, *rows[5:]]
    _shards(tmp_path / "bad", "train", bad, [3, 4])
    where = re.escape(f"{tmp_path / 'bad' / 'train-00001-of-00002.parquet'}:2: field 'input' missing")
    with pytest.raises(LayercardError, match=where):
        list(load_task(str(tmp_path / "bad")).examples)


def test_shard_sets_that_cannot_be_read_whole_are_refused(tmp_path):
    rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(4)]
    paths = _shards(tmp_path / "gap", "train", rows, [1, 1, 2])
    paths[1].unlink()
    with pytest.raises(
        LayercardError,
        match=re.escape("split 'train' is in 3 shards and shard 1 (train-00001-of-00003.parquet)"),
    ):
        load_task(str(tmp_path / "gap"))
    _shards(tmp_path / "twice", "train", rows, [2, 2])
    write_jsonl(tmp_path / "twice" / "train.jsonl", rows)
    with pytest.raises(
        LayercardError,
        match=re.escape(
            "two files of split 'train' (train.jsonl, 2 Parquet shards from train-00000-of-00002.parquet)"
        ),
    ):
        load_task(str(tmp_path / "twice"))
    _shards(tmp_path / "mixed", "train", rows, [2, 2])
    _shards(tmp_path / "mixed" / "x", "train", rows, [1, 1, 2])
    (tmp_path / "mixed" / "x" / "train-00002-of-00003.parquet").rename(
        tmp_path / "mixed" / "train-00002-of-00003.parquet"
    )
    with pytest.raises(
        LayercardError, match="a shard of 3, beside shards of split 'train' of 2; keep one set"
    ):
        load_task(str(tmp_path / "mixed"))
    other = _shards(tmp_path / "columns", "train", rows, [2, 2])
    _shards(tmp_path / "columns" / "x", "train", [{"question": "q", "answer": "a"}] * 2, [2])
    (tmp_path / "columns" / "x" / "train-00000-of-00001.parquet").replace(other[1])
    with pytest.raises(
        LayercardError, match=re.escape("train-00001-of-00002.parquet: its columns (question, answer)")
    ):
        load_task(str(tmp_path / "columns"))


def test_real_data_in_shards_is_the_same_task_as_its_file(tmp_path):
    """sst2's validation split, written as three Parquet shards in a folder named as its own, is the task
    its JSONL file is: the same examples and data hash, so a card or run made from either serves both."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import shared_data

    jsonl = shared_data("sst2/validation.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    folder = tmp_path / "sst2"
    _shards(folder, "validation", rows, [300, 300, len(rows) - 600])
    pq.write_table(pa.Table.from_pylist(rows[:5]), folder / "train.parquet")
    file_task = load_task(str(jsonl))
    shard_task = load_task(str(folder), split="validation")
    assert (
        (shard_task.name, shard_task.format.name)
        == (file_task.name, file_task.format.name)
        == ("sst2", "sst2")
    )
    assert len(shard_task) == len(file_task) == len(rows) > 600
    assert shard_task.data_hash == file_task.data_hash


def test_one_shard_given_alone_says_where_the_rest_of_its_split_is(tmp_path, capsys):
    from layercard.cli.app import note_task

    rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(4)]
    paths = _shards(tmp_path / "sharded", "train", rows, [2, 2])
    alone = load_task(str(paths[1]))
    assert len(alone) == 2  # read alone, as before
    said = (
        f"task sharded: train-00001-of-00002.parquet is shard 2 of 2 of split 'train', read alone; give its "
        f"folder, {tmp_path / 'sharded'}, to read all 2 as split 'train'"
    )
    assert alone.shard_note() == said
    note_task(alone)
    assert said in " ".join(capsys.readouterr().err.split())
    assert load_task(str(tmp_path / "sharded")).shard_note() is None  # the folder reads them all
    one = _shards(tmp_path / "one", "train", rows, [4])
    assert load_task(str(one[0])).shard_note() is None  # a split of one shard is whole
    write_jsonl(tmp_path / "text" / "train-00000-of-00003.jsonl", rows)
    text = load_task(str(tmp_path / "text" / "train-00000-of-00003.jsonl")).shard_note()
    assert text is not None and text.endswith(
        "shard 1 of 3 of split 'train', read alone; join the shards into one file to read the whole split"
    )
    write_jsonl(tmp_path / "plain" / "train.jsonl", rows)
    assert load_task(str(tmp_path / "plain" / "train.jsonl")).shard_note() is None
