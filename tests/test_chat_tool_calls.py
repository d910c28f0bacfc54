"""Chat data in OpenAI's layout beyond role and content: an assistant turn's ``tool_calls`` (content
null) and ``weight``, a tool turn's ``tool_call_id`` and ``name``."""

from __future__ import annotations

import dataclasses
import json

import pytest
from data_files import write_format
from tiny_tok import CHAT_TEMPLATE, tiny_tokenizer

from layercard.errors import LayercardError
from layercard.tasks import PRESETS
from layercard.tasks.data import examples_from_records
from layercard.tasks.encode import IGNORE_INDEX, encode_example, encode_prompt, scored_as_written
from layercard.tasks.metrics import exact_match
from layercard.tasks.schemas import record_to_example

FMT = dataclasses.replace(PRESETS["chat"], max_input_tokens=256, max_target_tokens=64)
CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}


def _record(*, first: dict | None = None, last: dict | None = None) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "sum 2 2"},
            {"role": "assistant", "content": None, "tool_calls": [CALL], **(first or {})},
            {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "4"},
            {"role": "assistant", "content": "it is 4.", **(last or {})},
        ]
    }


def _example(rec: dict):
    return record_to_example(rec, "chat", {}, "f.jsonl:1", "0")


def _trained(tok, enc) -> str:
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


def test_an_openai_tool_call_record_is_read_with_its_calls_and_the_tool_turns_ids():
    ex = _example(_record())
    assert ex.messages == (("user", "sum 2 2"), ("assistant", ""), ("tool", "4"), ("assistant", "it is 4."))
    assert ex.target == "it is 4." and ex.input == "sum 2 2"
    # the arguments' JSON text is parsed: chat templates take a mapping
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}, "id": "c1"}
    assert ex.turn_fields == ({}, {"tool_calls": [call]}, {"tool_call_id": "c1", "name": "add"}, {})
    # the bare {name, arguments} layout and the list as JSON text read the same
    bare = _record(
        first={"tool_calls": json.dumps([{"id": "c1", "name": "add", "arguments": {"a": 2, "b": 2}}])}
    )
    assert _example(bare) == ex


def test_weight_one_is_the_default_and_leaves_the_data_hash_as_it_was():
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    weighted = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "weight": 1},
        ]
    }
    a, b = _example(plain), _example(weighted)
    assert a == b and a.turn_fields is None and a.to_dict() == b.to_dict()
    assert "weight" not in json.dumps(a.to_dict())


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [
        (
            {"tool_calls": [{"function": {"arguments": "{}"}}]},
            None,
            r"\[1\].tool_calls\[0\]: a tool call needs",
        ),
        (
            {"tool_calls": [{"name": "add", "arguments": "{a: 2}"}]},
            None,
            r"\[1\].tool_calls\[0\].arguments: not JSON",
        ),
        (
            {"tool_calls": [{"name": "add", "arguments": "[2]"}]},
            None,
            r"\[1\].tool_calls\[0\].arguments: must be",
        ),
        ({"tool_calls": "add(2, 2)"}, None, r"\[1\].tool_calls: not JSON"),
        ({"tool_calls": [], "content": None}, None, r"\[1\].content: must be a non-empty string"),
        ({"weight": 2}, None, r"\[1\].weight: must be 0 .* got 2"),
        ({"weight": True}, None, r"\[1\].weight: must be 0"),
        (None, {"weight": 0}, r"\[3\].weight: the last turn is the target"),
    ],
)
def test_bad_tool_calls_and_weights_are_refused_by_file_line_and_field(first, last, message):
    with pytest.raises(LayercardError, match=r"^f\.jsonl:1: field 'messages'" + message):
        _example(_record(first=first, last=last))


def test_tool_calls_and_weight_belong_to_assistant_turns_and_tool_ids_are_strings():
    for key, value in (("tool_calls", [CALL]), ("weight", 0)):
        rec = _record()
        rec["messages"][0][key] = value
        with pytest.raises(
            LayercardError, match=rf"\[0\].{key}: only an assistant turn has one \(this turn is 'user'"
        ):
            _example(rec)
    rec = _record()
    rec["messages"][2]["tool_call_id"] = 7
    with pytest.raises(LayercardError, match=r"\[2\].tool_call_id: must be a string, got 7"):
        _example(rec)


# a template that writes an assistant turn's calls, as tool-calling models' templates do
CALLS_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% else %}{{ '<|assistant|>' + message['content']",
    "{% else %}{{ '<|assistant|>' + message['content'] }}"
    "{% for c in message.get('tool_calls', []) %}"
    "{{ 'call ' + c.function.name + (c.function.arguments | tojson) }}"
    "{% endfor %}{{ ''",
)


def test_a_template_that_writes_tool_calls_trains_them_as_it_writes_them():
    tok = tiny_tokenizer()
    tok.chat_template = CALLS_TEMPLATE
    enc = encode_example(tok, FMT, _example(_record()))
    assert _trained(tok, enc) == 'call add{"a": 2, "b": 2}<eos>it is 4.<eos>'
    # the tool's answer is context; generation continues after it
    assert tok.decode(encode_prompt(tok, FMT, _example(_record()))).endswith(
        "<|assistant|>4<eos>\n<|assistant|>"
    )


def test_a_template_that_refuses_a_turn_without_content_or_calls_is_taken_to_write_them():
    tok = tiny_tokenizer()
    guard = (
        "{% for m in messages %}{% if m.role == 'assistant' and not m.content and not m.tool_calls %}"
        "{{ raise_exception('an assistant turn needs content or tool calls') }}{% endif %}{% endfor %}"
    )
    tok.chat_template = guard + CALLS_TEMPLATE
    enc = encode_example(tok, FMT, _example(_record()))
    assert _trained(tok, enc) == 'call add{"a": 2, "b": 2}<eos>it is 4.<eos>'


def test_a_template_that_drops_tool_calls_gets_them_as_text():
    tok = tiny_tokenizer()  # its template writes the content alone
    as_text = '{"name": "add", "arguments": {"a": 2, "b": 2}}'
    enc = encode_example(tok, FMT, _example(_record()))
    assert _trained(tok, enc) == as_text + "<eos>it is 4.<eos>"
    # the same as a ShareGPT function_call turn holding that text
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "sum 2 2"},
            {"from": "function_call", "value": as_text},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "it is 4."},
        ]
    }
    (other,) = examples_from_records([sharegpt], source="f.jsonl")
    assert encode_example(tok, FMT, other).input_ids == enc.input_ids
    # content and calls together: the calls follow the content on a line of their own
    both = encode_example(tok, FMT, _example(_record(first={"content": "let me add."})))
    assert _trained(tok, both).startswith("let me add.\n" + as_text + "<eos>")
    # without a chat template the calls are text as well
    bare = tiny_tokenizer(with_chat_template=False)
    assert _trained(bare, encode_example(bare, FMT, _example(_record()))) == as_text + "<eos>it is 4.<eos>"


@pytest.mark.parametrize("template", [True, False])
def test_a_reply_of_weight_zero_is_context_with_its_end_token(template):
    tok = tiny_tokenizer(with_chat_template=template)
    rec = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "bad reply", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "good reply"},
        ]
    }
    weighted = encode_example(tok, FMT, _example(rec))
    rec["messages"][1].pop("weight")
    whole = encode_example(tok, FMT, _example(rec))
    # the same sequence, the first reply and its end token untrained
    assert weighted.input_ids == whole.input_ids
    assert _trained(tok, whole) == "bad reply<eos>good reply<eos>"
    assert _trained(tok, weighted) == "good reply<eos>"
    assert weighted.prompt_len > whole.prompt_len


def test_a_special_token_inside_a_tool_call_or_a_tool_turns_name_is_refused():
    tok = tiny_tokenizer()
    rec = _record(first={"tool_calls": [{"name": "add", "arguments": {"a": "<eos>"}}]})
    with pytest.raises(LayercardError, match=r"its messages\[1\].tool_calls holds '<eos>'"):
        encode_example(tok, FMT, _example(rec))
    rec = _record()
    rec["messages"][2]["name"] = "add<eos>"
    with pytest.raises(LayercardError, match=r"its messages\[2\].name holds '<eos>'"):
        encode_example(tok, FMT, _example(rec))


def test_turn_fields_are_one_mapping_per_message():
    from layercard.tasks import Example

    turns = (("user", "hi"), ("assistant", "hello"))
    for fields in (({},), ({}, "weight")):
        with pytest.raises(LayercardError, match="turn_fields must hold one mapping per message"):
            Example("e", "hi", "hello", messages=turns, turn_fields=fields)


def _task(ex):
    from layercard.tasks import Task

    return Task(name="t", source="f.jsonl", split="train", format=FMT, examples=(ex,), schema="chat")


def test_conversations_that_differ_only_in_a_call_are_not_the_same_data():
    one = _example(_record())
    other = _example(_record(first={"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}))
    assert one.messages == other.messages and one != other
    a, b = _task(one), _task(other)
    assert a.shared_with(b) == 0 and a.shared_with(_task(one)) == 1
    assert a.data_hash != b.data_hash


def test_smol_tool_calls_in_openai_layout_train_on_the_call_as_text_and_the_answer(smollm2):
    tok = smollm2.tokenizer  # SmolLM2's template writes the content alone
    ex = _example(_record())
    enc = encode_example(tok, FMT, ex)
    as_text = '{"name": "add", "arguments": {"a": 2, "b": 2}}'
    assert _trained(tok, enc) == as_text + "<|im_end|>" + "it is 4.<|im_end|>"
    chat = tok.apply_chat_template(
        [{"role": r, "content": as_text if k == 1 else c} for k, (r, c) in enumerate(ex.messages)],
        tokenize=False,
    )
    assert tok.decode(enc.input_ids) + "\n" == chat and "<|im_start|>tool\n4<|im_end|>" in chat


def _ends_in_a_call(content=None) -> dict:
    rec = _record()
    rec["messages"][1:] = [{"role": "assistant", "content": content, "tool_calls": [CALL]}]
    return rec


def test_a_conversation_may_end_in_a_tool_call_whose_text_is_the_target():
    as_text = '{"name": "add", "arguments": {"a": 2, "b": 2}}'
    ex = _example(_ends_in_a_call())
    assert ex.target == ex.references[0] == as_text and ex.messages[-1] == ("assistant", "")
    assert _example(_ends_in_a_call("adding.")).target == "adding.\n" + as_text
    # trained as the template writes it, or as that text where it leaves calls out
    tok = tiny_tokenizer()
    assert _trained(tok, encode_example(tok, FMT, ex)) == as_text + "<eos>"
    tok.chat_template = CALLS_TEMPLATE
    assert _trained(tok, encode_example(tok, FMT, ex)) == 'call add{"a": 2, "b": 2}<eos>'


def test_a_final_tool_call_is_scored_as_the_chat_template_writes_it():
    ex = _example(_ends_in_a_call())
    plain, bare, calls = tiny_tokenizer(), tiny_tokenizer(with_chat_template=False), tiny_tokenizer()
    calls.chat_template = CALLS_TEMPLATE
    # where the calls are written as text, that text is the reference already
    assert scored_as_written(plain, FMT, ex) is ex and scored_as_written(bare, FMT, ex) is ex
    written = scored_as_written(calls, FMT, ex)
    assert written.references == (written.target,) == ('call add{"a": 2, "b": 2}',)
    assert exact_match('call add{"a": 2, "b": 2}', written.references) == 1.0
    # a conversation that ends in an answer keeps its target
    answered = _example(_record())
    assert scored_as_written(calls, FMT, answered) is answered


def _loaded(tok):
    """A tiny Llama with ``tok``, as evaluate takes a model."""
    import torch
    from tiny import tiny_model

    from layercard.models import LoadedModel

    model = tiny_model("llama", seed=0).to(torch.float32)
    return LoadedModel(model=model, tokenizer=tok, model_id="tiny", model_hash="0" * 64, source="memory")


def test_evaluate_and_the_trim_sweep_score_a_final_call_as_the_template_writes_it(monkeypatch):
    import layercard.inference as inference
    from layercard.evaluate import EvalConfig, evaluate
    from layercard.trim.sweep import task_scorer

    tok = tiny_tokenizer()
    tok.chat_template = CALLS_TEMPLATE
    loaded = _loaded(tok)
    model = loaded.model
    task = _task(_example(_ends_in_a_call()))
    res = evaluate(
        loaded, task, EvalConfig(examples=1, max_new_tokens=3, loss=False, metrics=("exact_match",))
    )
    assert res.predictions[0]["references"] == ['call add{"a": 2, "b": 2}']
    scorer = task_scorer(
        tok, task, task.examples, metrics=["exact_match"], batch_size=1, max_new_tokens=3, max_length=None,
        loss=False,
    )  # fmt: skip
    # what the scorer compares a generation with: a model that writes the call exactly scores 1
    timing = {"s_per_example": 0.0, "tokens_per_s": 0.0, "new_tokens": 3, "capped": 0}
    monkeypatch.setattr(inference, "generate", lambda *a, **k: (['call add{"a": 2, "b": 2}'], timing))
    assert scorer(model, 0)["metrics"]["exact_match"] == 1.0


def test_data_of_tool_calls_is_scored_by_its_calls_unless_metrics_are_given():
    from layercard.tasks import default_metrics

    text = PRESETS["chat"].metrics
    call, answer = _example(_ends_in_a_call()), _example(_record())
    assert default_metrics("chat", text, [call, call]) == ("tool_call_match", *text)
    assert default_metrics("jsonl", ("exact_match",), [call]) == ("tool_call_match", "exact_match")
    # a set that also ends in answers: the text metrics lead and tool_call_match follows them
    assert default_metrics("chat", text, [call, answer]) == (*text, "tool_call_match")
    # no call at all, a preset's data, or no examples: the format's metrics as they are
    assert default_metrics("chat", text, [answer, answer]) == text
    assert default_metrics("gsm8k", ("gsm8k_accuracy",), [call]) == ("gsm8k_accuracy",)
    assert default_metrics("chat", text, []) == text
    assert default_metrics("chat", ("tool_call_match", "exact_match"), [call]) == (
        "tool_call_match",
        "exact_match",
    )


def test_evaluate_leads_with_tool_call_match_where_every_reference_as_scored_holds_a_call():
    from layercard.evaluate import EvalConfig, evaluate

    task = _task(_example(_ends_in_a_call()))
    cfg = EvalConfig(examples=1, max_new_tokens=2, loss=False)
    tok = tiny_tokenizer()  # its template leaves calls out: they are scored as their JSON text
    loaded = _loaded(tok)
    assert list(evaluate(loaded, task, cfg).metrics) == ["tool_call_match", *PRESETS["chat"].metrics]
    # a template that writes calls in a form of its own holds no call to compare: text metrics, and
    # tool_call_match asked for is refused before anything is generated
    tok.chat_template = CALLS_TEMPLATE
    assert list(evaluate(loaded, task, cfg).metrics) == list(PRESETS["chat"].metrics)
    with pytest.raises(
        LayercardError, match="tool_call_match: no reference of the 1 examples holds a tool call"
    ):
        evaluate(loaded, task, dataclasses.replace(cfg, metrics=("tool_call_match",)))


# ---------------------------------------------------------------- train_turns: the final reply alone


def _chat_file(tmp_path):
    return write_format("chat", tmp_path)


@pytest.mark.parametrize("template", [True, False])
def test_train_turns_last_trains_the_final_reply_alone(tmp_path, template):
    from layercard.tasks import load_task

    tok = tiny_tokenizer(with_chat_template=template)
    every = load_task(str(_chat_file(tmp_path)))
    last = load_task(str(_chat_file(tmp_path)), train_turns="last")
    assert last.format.train_turns == "last" and every.format.train_turns == "all"
    a, b = (
        encode_example(tok, every.format, every.examples[0]),
        encode_example(tok, last.format, last.examples[0]),
    )
    assert a.input_ids == b.input_ids
    assert _trained(tok, a) == "hello 0<eos>then 1<eos>" and _trained(tok, b) == "then 1<eos>"
    # the task's identity says so, and "all" is the default's
    assert last.data_hash != every.data_hash
    assert load_task(str(_chat_file(tmp_path)), train_turns="all").data_hash == every.data_hash


def test_train_turns_round_trips_and_is_checked(tmp_path):
    from layercard.tasks import TaskFormat, load_task

    fmt = dataclasses.replace(FMT, train_turns="last")
    assert TaskFormat.from_dict(fmt.to_dict()) == fmt and "train_turns" not in FMT.to_dict()
    assert "train_turns" not in FMT.prompt() and fmt.prompt()["train_turns"] == "last"
    with pytest.raises(LayercardError, match="TaskFormat.train_turns: must be one of all, last, got 'first'"):
        dataclasses.replace(FMT, train_turns="first")
    with pytest.raises(LayercardError, match="^train_turns: must be one of all, last, got 'first'"):
        load_task(str(_chat_file(tmp_path)), train_turns="first")
    # data of one target per record has no turns to choose among
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    with pytest.raises(LayercardError, match=r"^train_turns: 'last' chooses among .* holds alpaca records"):
        load_task(str(alpaca), train_turns="last")
    with pytest.raises(
        LayercardError, match=r"^train_turns: 'last' chooses among .* the facts preset's data"
    ):
        load_task("synthetic:facts", train_turns="last")
    assert load_task(str(alpaca), train_turns="all").format.train_turns == "all"


def test_train_turns_from_the_command_line_and_a_run_config():
    from layercard.cli.task_options import task_kwargs
    from layercard.config.schema import ConfigError
    from layercard.pipeline import parse_config

    assert task_kwargs(train_turns="last") == {"train_turns": "last"} and task_kwargs() == {}
    with pytest.raises(ConfigError, match="--train-turns"):
        task_kwargs(train_turns="first")
    base = {"placements": [{"name": "all", "policy": "all"}]}
    cfg = parse_config({**base, "task": {"train": "chat.jsonl", "train_turns": "last"}})
    assert cfg.task.load_kwargs() == {"train_turns": "last"}
    with pytest.raises(
        LayercardError, match="^config: task.train_turns: must be one of all, last; got 'first'"
    ):
        parse_config({**base, "task": {"train": "chat.jsonl", "train_turns": "first"}})


def test_prompt_changes_names_each_setting_that_moved():
    from layercard.tasks import prompt_changes

    fmt = PRESETS["chat"]
    last = dataclasses.replace(fmt, train_turns="last", system="Be brief.", chat_template=False)
    assert prompt_changes(fmt.prompt(), fmt.prompt()) == []
    assert prompt_changes(fmt.prompt(), last.prompt()) == [
        "system prompt none, here 'Be brief.'",
        "chat template on, here off",
        "train_turns all, here last",
    ]
    # a record from before train_turns existed reads as all; one without a prompt is not compared
    assert prompt_changes({"template": fmt.instruction}, last.prompt()) == ["train_turns all, here last"]
    assert prompt_changes(None, last.prompt()) == []
    long = dataclasses.replace(fmt, instruction="x" * 100 + "{input}")
    assert prompt_changes(fmt.prompt(), long.prompt()) == [
        f"prompt template '{{input}}', here '{'x' * 57}...'"
    ]
