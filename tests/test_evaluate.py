"""evaluate: batched greedy generation, target loss, adapters, the eval artifact and the eval command."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import shared_data
from tiny import tiny_model
from tiny_tok import CHAT_TEMPLATE, tiny_tokenizer
from typer.testing import CliRunner

from layercard.cli import app
from layercard.errors import LayercardError
from layercard.evaluate import (
    EvalConfig,
    EvalResult,
    difference_standard_error,
    evaluate,
    fraction_standard_error,
)
from layercard.inference import eval_example_losses, eval_loss, generate
from layercard.models import LoadedModel
from layercard.tasks import (
    Example,
    Task,
    TaskFormat,
    encode_example,
    encode_prompt,
    load_task,
    turn_end_token_id,
)

# Short instruction and inputs of different lengths, so batches really are left-padded.
FMT = TaskFormat(
    name="tiny",
    instruction="q: {input}",
    metrics=("token_f1", "exact_match"),
    max_input_tokens=48,
    max_target_tokens=8,
    max_new_tokens=6,
)
INPUTS = ("ab", "hello there", "x", "the cat sat on a mat", "zz top", "what is 2+2")
TASK = Task(
    "tiny",
    "memory",
    "test",
    FMT,
    tuple(Example(f"e{i}", text, f"ans {i}") for i, text in enumerate(INPUTS)),
)


def _model(dtype: torch.dtype = torch.float64, seed: int = 0):
    # A larger init scale than the default makes greedy outputs depend on the input; float64 rules out
    # argmax ties flipping between padded and unpadded runs. SDPA attention (what real loads use): in
    # transformers 5.23 eager attention in float64 turns left-padded rows into NaN.
    model = tiny_model("llama", initializer_range=0.2, seed=seed).to(dtype)
    model.set_attn_implementation("sdpa")
    return model


def _loaded(model, tok=None) -> LoadedModel:
    return LoadedModel(
        model=model, tokenizer=tok or tiny_tokenizer(), model_id="tiny", model_hash="0" * 64, source="memory"
    )


# ---------------------------------------------------------------- generate


def test_greedy_predictions_ignore_the_checkpoints_generation_defaults():
    """generate() fills what layercard's config leaves unset from the model's generation_config.json: a
    no-repeat size or suppressed tokens there would change predictions by a file no artifact hashes."""
    tok, model = tiny_tokenizer(), _model()
    plain, _ = generate(model, tok, TASK, TASK.examples, batch_size=3, max_new_tokens=6)
    own = model.generation_config
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.suppress_tokens = list(range(4, 200))
    got, _ = generate(model, tok, TASK, TASK.examples, batch_size=3, max_new_tokens=6)
    assert got == plain and model.generation_config is own and own.no_repeat_ngram_size == 1


def test_generate_order_and_left_padding():
    tok, model = tiny_tokenizer(), _model()
    lengths = {len(encode_prompt(tok, FMT, ex.input)) for ex in TASK.examples}
    assert len(lengths) > 3  # the batches below do need padding
    one, timing = generate(model, tok, TASK, TASK.examples, batch_size=1, max_new_tokens=6)
    three, _ = generate(model, tok, TASK, TASK.examples, batch_size=3, max_new_tokens=6)
    assert len(one) == len(TASK.examples) and all(isinstance(t, str) for t in one)
    assert len(set(one)) > 2  # outputs differ by input, so an order mix-up would show
    assert three == one
    rev, _ = generate(model, tok, TASK, TASK.examples[::-1], batch_size=4, max_new_tokens=6)
    assert rev == one[::-1]
    assert tok.padding_side == "right"  # restored
    assert 0 < timing["new_tokens"] <= 6 * len(INPUTS)
    assert timing["gen_s"] > 0 and timing["s_per_example"] == pytest.approx(timing["gen_s"] / len(INPUTS))
    assert timing["tokens_per_s"] == pytest.approx(timing["new_tokens"] / timing["gen_s"])


def test_generated_text_is_decoded_as_generated_whatever_the_tokenizers_default(monkeypatch):
    """A tokenizer that tidies spaces before punctuation by default (transformers 4's) gives the same text
    as one that does not: what the metrics score does not hang on the library's version."""
    tok, model = tiny_tokenizer(), _model()
    plain, _ = generate(model, tok, TASK, TASK.examples, batch_size=4, max_new_tokens=6)
    decode = type(tok).decode

    def tidying(self, ids, **kw):
        kw.setdefault("clean_up_tokenization_spaces", True)
        text = decode(self, ids, **kw)
        return text + "~tidied" if kw["clean_up_tokenization_spaces"] else text  # shows wherever it ran

    monkeypatch.setattr(type(tok), "decode", tidying)
    assert generate(model, tok, TASK, TASK.examples, batch_size=4, max_new_tokens=6)[0] == plain


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    """Reference greedy decoding with no stopping: full forward each step, argmax."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def test_generate_stops_at_turn_end_token():
    # A turn-end token that is not eos, so stopping on eos alone would fail this test.
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE.replace("'<eos>'", "'<|end|>'")
    end = turn_end_token_id(tok)
    assert end == tok.convert_tokens_to_ids("<|end|>") != tok.eos_token_id
    model = _model()
    ex = TASK.examples[1]
    prompt = encode_prompt(tok, FMT, ex.input)
    free = _greedy(model, prompt, 4)
    with torch.no_grad():  # make the turn-end token win wherever the 3rd generated token would have
        model.lm_head.weight[end] = 3.0 * model.lm_head.weight[free[2]]
    raw = _greedy(model, prompt, 12)
    assert end in raw and raw.index(end) <= 2
    cut = raw.index(end)
    (text,), timing = generate(model, tok, TASK, [ex], batch_size=1, max_new_tokens=12)
    assert text == tok.decode(raw[:cut], skip_special_tokens=True).strip()
    assert timing["new_tokens"] == cut + 1  # the stop token is generated, nothing after it


# ---------------------------------------------------------------- loss


def test_eval_loss_matches_hand_computation():
    tok, model = tiny_tokenizer(), _model()
    ex = TASK.examples[3]
    enc = encode_example(tok, FMT, ex)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([enc.input_ids])).logits[0], dim=-1)
    # token t is predicted from position t-1; only the target tokens (prompt_len ..) count
    nll = [-float(logp[t - 1, enc.input_ids[t]]) for t in range(enc.prompt_len, len(enc))]
    got = eval_loss(model, tok, TASK, [ex], batch_size=1, max_length=None)
    assert got == pytest.approx(sum(nll) / len(nll), rel=1e-10)
    # padding does not change the mean per target token
    many = [eval_loss(model, tok, TASK, TASK.examples, batch_size=b, max_length=None) for b in (1, 4)]
    assert many[0] == pytest.approx(many[1], rel=1e-9)


def test_example_losses_keep_the_examples_order_and_total_the_loss():
    tok, model = tiny_tokenizer(), _model()
    sums, counts = eval_example_losses(model, tok, TASK, TASK.examples, batch_size=3, max_length=None)
    # one at a time, in order: the same per-example values the sorted, padded batches gave
    alone = [
        eval_example_losses(model, tok, TASK, [ex], batch_size=1, max_length=None) for ex in TASK.examples
    ]
    assert counts == [c[0] for _, c in alone]
    lengths = [len(encode_example(tok, FMT, ex)) for ex in TASK.examples]
    assert lengths != sorted(lengths, reverse=True)  # the batches' longest-first order is not the task's
    assert sums == pytest.approx([s[0] for s, _ in alone], rel=1e-9)
    whole = eval_loss(model, tok, TASK, TASK.examples, batch_size=3, max_length=None)
    assert sum(sums) / sum(counts) == pytest.approx(whole, rel=1e-10)


def test_fraction_standard_error_on_a_known_case_and_against_resampling():
    # d = b - x = (1, 2, 3), e = b - r = (2, 2, 2): f = 6 / 6 = 1, residuals (-1, 0, 1)
    base, ref, run = [5.0, 5.0, 5.0], [3.0, 3.0, 3.0], [4.0, 3.0, 2.0]
    assert fraction_standard_error(base, ref, run) == pytest.approx((3 / 2 * 2) ** 0.5 / 6)
    assert fraction_standard_error(base, ref, base) == 0.0  # no drop at all: f = 0 on every example
    assert fraction_standard_error(base, base, run) is None  # no reference drop
    assert fraction_standard_error(base[:1], ref[:1], run[:1]) is None
    assert fraction_standard_error(base, ref, run[:2]) is None
    # examples drawn at random: the error it gives on one draw against the spread of f over many draws
    rng = np.random.default_rng(0)

    def draw(n):
        b = rng.gamma(2.0, 1.0, n) * 10
        e = b * rng.uniform(0.2, 0.6, n)  # the reference's drop, per example
        d = e * rng.normal(0.8, 0.3, n)  # a placement's: 0.8 of it on average, noisily
        return b, b - e, b - d

    fs, ses = [], []
    for _ in range(2000):
        b, r, x = draw(64)
        fs.append((b - x).sum() / (b - r).sum())
        ses.append(fraction_standard_error(list(b), list(r), list(x)))
    assert np.mean(ses) == pytest.approx(np.std(fs), rel=0.1)


def test_difference_standard_error_pairs_the_examples():
    rng = np.random.default_rng(1)
    diffs, ses, unpaired = [], [], []
    for _ in range(2000):
        b = rng.gamma(2.0, 1.0, 48) * 10
        e = b * rng.uniform(0.2, 0.6, 48)
        shared = rng.normal(0.9, 0.3, 48)  # how hard each example is for both placements
        xa, xb = b - e * (shared + 0.05), b - e * (shared + rng.normal(0.0, 0.05, 48))
        r = b - e
        fa, fb = (b - xa).sum() / e.sum(), (b - xb).sum() / e.sum()
        diffs.append(fa - fb)
        ses.append(difference_standard_error(list(b), list(r), list(xa), list(xb)))
        unpaired.append(np.hypot(fraction_standard_error(b, r, xa), fraction_standard_error(b, r, xb)))
    # it matches the spread of the difference over draws, which is far under the unpaired errors' sum
    assert np.mean(ses) == pytest.approx(np.std(diffs), rel=0.1)
    assert np.mean(ses) < 0.3 * np.mean(unpaired)
    assert difference_standard_error([1.0, 2.0], [0.5, 1.0], [0.8, 1.5], [0.9]) is None


# ---------------------------------------------------------------- evaluate, config, artifact


def test_eval_config_validation_and_metric_defaults():
    with pytest.raises(LayercardError, match=r"unknown metric 'bogus'; valid: .*exact_match"):
        EvalConfig(metrics=("token_f1", "bogus"))
    for field, value in (("batch_size", 0), ("examples", 0), ("max_new_tokens", -1), ("max_length", 1)):
        with pytest.raises(LayercardError, match=field):
            EvalConfig(**{field: value})
    assert EvalConfig(metrics="bleu").metrics == ("bleu",)
    fmt_task = load_task("synthetic:format", split="test")
    run = EvalConfig().resolved(fmt_task)
    assert run.metrics == fmt_task.format.metrics and run.max_new_tokens == fmt_task.format.max_new_tokens
    assert EvalConfig(metrics=("bleu",), max_new_tokens=3).resolved(fmt_task).max_new_tokens == 3


def test_evaluate_defaults_and_round_trip(tmp_path):
    loaded = _loaded(_model(torch.float32))
    res = evaluate(loaded, TASK, EvalConfig(examples=4, batch_size=2))
    assert list(res.metrics) == list(FMT.metrics)  # the task format's, in order (first = primary)
    assert res.config["max_new_tokens"] == FMT.max_new_tokens
    assert res.n == 4 == len(res.predictions) and res.loss is not None and res.loss > 0
    assert {"id", "input", "prediction", "references", "scores"} <= set(res.predictions[0])
    assert set(res.predictions[0]["scores"]) == {"exact_match", "token_f1"}
    mean_f1 = sum(p["scores"]["token_f1"] for p in res.predictions) / res.n
    assert res.metrics["token_f1"] == pytest.approx(mean_f1)
    assert res.provenance["stage"] == "eval" and res.task["n_examples"] == 4
    assert {k: res.provenance["config"][k] for k in ("dtype", "device")} == {
        "dtype": "float32",
        "device": "cpu",
    }
    assert res.provenance["data_hash"] == res.task["data_hash"]

    path = res.save(tmp_path / "ev")
    d = json.loads(path.read_text())
    assert d["kind"] == "eval" and d["schema_version"] == 1 and "predictions" not in d
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [p["id"] for p in res.predictions]
    assert EvalResult.load(tmp_path / "ev") == res
    assert EvalResult.load(path) == res
    # texts with line separators JSON keeps raw (U+2028, U+2029, U+0085) read back whole
    odd = dataclasses.replace(
        res, predictions=[{**p, "input": p["input"] + "\u2028 a\u2029b\x85c"} for p in res.predictions]
    )
    odd.save(tmp_path / "odd")
    assert EvalResult.load(tmp_path / "odd") == odd
    assert EvalResult.from_dict(res.to_dict()) == res
    # the loss per example: its sums over its token counts are the loss
    assert len(res.example_loss_sums) == len(res.example_tokens) == res.n
    assert sum(res.example_loss_sums) / sum(res.example_tokens) == pytest.approx(res.loss, rel=1e-12)
    # an eval.json from before the per-example losses still loads; a malformed one names its file
    old = {k: v for k, v in d.items() if k not in ("example_loss_sums", "example_tokens")}
    path.write_text(json.dumps(old))
    assert EvalResult.load(path).example_loss_sums is None
    path.write_text(json.dumps({**d, "example_tokens": d["example_tokens"][:-1]}))
    with pytest.raises(
        LayercardError, match=r"eval\.json: example_tokens: must hold one value per example \(n = 4\)"
    ):
        EvalResult.load(path)
    path.write_text(json.dumps({**d, "example_loss_sums": [float("nan")] * 4}))
    with pytest.raises(LayercardError, match="finite"):
        EvalResult.load(path)

    only = evaluate(loaded, TASK, EvalConfig(examples=2, metrics=("exact_match",), loss=False))
    assert list(only.metrics) == ["exact_match"] and only.loss is None and "loss_s" not in only.timing
    assert only.example_loss_sums is None and only.example_tokens is None


def test_a_task_spec_is_scored_on_its_test_split_as_the_command_scores_it():
    loaded = _loaded(_model(torch.float32))
    res = evaluate(loaded, "synthetic:facts", EvalConfig(examples=2, max_new_tokens=2, loss=False))
    assert res.task["split"] == "test"  # load_task's default is the training split: never scored unasked
    named = evaluate(loaded, "synthetic:facts:train", EvalConfig(examples=2, max_new_tokens=2, loss=False))
    assert named.task["split"] == "train"  # a split written in the spec is taken


def test_bad_gold_answers_fail_before_anything_is_generated(monkeypatch):
    import layercard.evaluate as ev

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started before the gold answers were checked")

    monkeypatch.setattr(ev, "generate", no_generation)
    fmt = dataclasses.replace(FMT, metrics=("gsm8k_accuracy",))
    examples = (Example("g1", "2+2", "#### 4", meta={"final_answer": "4"}), Example("g2", "1/0", "#### ?"))
    bad = [dataclasses.replace(examples[1], meta={"final_answer": "nan"}), examples[1]]
    errors = ("example 'g2': answer 'nan' is not a number", "example 'g2': no final_answer")
    for second, said in zip(bad, errors, strict=True):
        task = Task("math", "memory", "test", fmt, (examples[0], second))
        with pytest.raises(LayercardError, match=said):
            evaluate(_loaded(_model(torch.float32)), task, EvalConfig())


def test_cut_prompts_and_loss_examples_are_counted_and_said(tmp_path):
    loaded = _loaded(_model(torch.float32))
    lengths = [len(encode_prompt(loaded.tokenizer, FMT, ex)) for ex in TASK.examples]  # none cut at 48
    limit = sorted(lengths)[2]  # the prompts longer than the third shortest are cut
    short = Task("tiny", "memory", "test", dataclasses.replace(FMT, max_input_tokens=limit), TASK.examples)
    res = evaluate(loaded, short, EvalConfig(batch_size=3, max_length=limit))
    cut = res.task["cut"]
    assert cut["prompts"] == sum(n > limit for n in lengths) > 0
    assert cut["loss_to_max_length"] > 0  # the prompts that fit leave no room for their targets
    assert cut["loss_to_format_limits"] >= cut["prompts"]  # a cut prompt is cut for the loss too
    note = res.cut_note()
    said = f"note: {cut['prompts']} of 6 eval prompts are longer than the task format's limit of {limit} "
    assert said in note
    assert (
        f"note: {cut['loss_to_max_length']} of 6 eval loss examples are longer than max_length {limit}"
        in note
    )
    assert EvalResult.load(res.save(tmp_path / "ev")).cut_note() == note
    # a second save cut after its predictions: no eval.json is left to pair with them
    from layercard import evaluate as E

    def cut(path, d):
        raise KeyboardInterrupt

    real = E.write_json
    E.write_json = cut
    try:
        with pytest.raises(KeyboardInterrupt):
            res.save(tmp_path / "ev")
    finally:
        E.write_json = real
    assert not (tmp_path / "ev" / "eval.json").exists() and (tmp_path / "ev" / "predictions.jsonl").is_file()
    whole = evaluate(loaded, TASK, EvalConfig(batch_size=3, loss=False))
    assert {k: v for k, v in whole.task["cut"].items() if k != "generations"} == {
        "prompts": 0, "loss_to_max_length": None, "loss_to_format_limits": None,
    }  # fmt: skip
    whole = dataclasses.replace(whole, task={**whole.task, "cut": {**whole.task["cut"], "generations": 0}})
    assert whole.cut_note() is None
    old = dataclasses.replace(whole, task={k: v for k, v in whole.task.items() if k != "cut"})
    assert old.cut_note() is None  # an eval.json from before the counts


def test_generations_stopped_at_max_new_tokens_are_counted_and_said(tmp_path):
    """A completion reaching max_new_tokens with no end token is scored as cut: eval counts and says it."""
    from layercard.inference import turn_end_token_id

    loaded = _loaded(_model(torch.float32))
    stop = turn_end_token_id(loaded.tokenizer)
    other = next(
        i for i in range(loaded.tokenizer.vocab_size) if i != stop and i != loaded.tokenizer.eos_token_id
    )

    def forced(token: int):
        def hook(module, args, out):  # every position predicts ``token``
            return torch.zeros_like(out).index_fill_(-1, torch.tensor([token]), 1.0)

        return loaded.model.lm_head.register_forward_hook(hook)

    cfg = EvalConfig(batch_size=4, max_new_tokens=3, loss=False)
    for token, capped in ((stop, 0), (other, len(TASK))):
        handle = forced(token)
        try:
            res = evaluate(loaded, TASK, cfg)
        finally:
            handle.remove()
        assert res.task["cut"]["generations"] == capped
        said = f"note: {capped} of {len(TASK)} generations reached max_new_tokens 3 before an end token"
        assert (said in (res.cut_note() or "")) is (capped > 0)
        assert EvalResult.load(res.save(tmp_path / str(token))).cut_note() == res.cut_note()
    assert "raise --max-new-tokens" in res.cut_note()


def test_a_mixed_function_calling_set_says_what_tool_call_match_is_made_of(tmp_path):
    res = evaluate(
        _loaded(_model(torch.float32)), TASK, EvalConfig(batch_size=6, max_new_tokens=2, loss=False)
    )
    call = '{"name": "f", "arguments": {"x": 1}}'
    rows = [
        {"id": "a", "input": "q", "prediction": call, "references": [call], "scores": {}},
        {"id": "b", "input": "q", "prediction": "no", "references": [call], "scores": {}},
        {"id": "c", "input": "q", "prediction": "yes", "references": ["yes"], "scores": {}},
    ]
    mixed = dataclasses.replace(res, metrics={"tool_call_match": 2 / 3}, predictions=rows, n=3)
    assert mixed.tool_call_note() == (
        "note: tool_call_match mixes two counts here: of 2 conversations due a call, 1 made the right one "
        "(0 another, 1 none); of 1 due an answer, 1 made no call (0 called)"
    )
    assert dataclasses.replace(mixed, metrics={"exact_match": 0.0}).tool_call_note() is None
    assert dataclasses.replace(mixed, predictions=rows[:2], n=2).tool_call_note() is None  # calls alone
    assert res.tool_call_note() is None


@pytest.fixture()
def lora_dir(tmp_path):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random, so the adapter changes the outputs
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(_model(torch.float32), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)  # a large update, so the loss moves well beyond float noise
    peft_model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


def test_evaluate_with_lora_adapter_leaves_base_clean(lora_dir):
    from peft import PeftModel

    loaded = _loaded(_model(torch.float32))
    base = loaded.model
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits.clone()
    cfg = EvalConfig(batch_size=3, max_new_tokens=4)
    plain = evaluate(loaded, TASK, cfg)
    adapted = evaluate(loaded, TASK, cfg, adapter=lora_dir)

    assert adapted.adapter == str(lora_dir) and plain.adapter is None
    assert len(adapted.provenance["config"]["adapter_hash"]) == 64
    assert abs(adapted.loss - plain.loss) > 1e-3  # the adapter was really on
    assert not any("lora" in name for name, _ in base.named_modules())
    assert not any(type(m).__module__.startswith("peft") for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())  # PEFT froze them; evaluate restores
    with torch.no_grad():
        assert torch.equal(base(ids).logits, before)
    again = evaluate(loaded, TASK, cfg)
    assert again.loss == plain.loss and again.predictions == plain.predictions

    # model= evaluates a caller-owned adapted model as it is (and leaves it attached)
    own = PeftModel.from_pretrained(_model(torch.float32), str(lora_dir))
    via_model = evaluate(loaded, TASK, cfg, model=own, adapter=lora_dir)
    assert via_model.loss == pytest.approx(adapted.loss, rel=1e-6)
    assert [p["prediction"] for p in via_model.predictions] == [p["prediction"] for p in adapted.predictions]
    assert any("lora" in name for name, _ in own.named_modules())


def test_evaluate_with_bottleneck_adapter_leaves_base_clean(tmp_path):
    adapters = pytest.importorskip("layercard.adapters")
    loaded = _loaded(_model(torch.float32))
    base = loaded.model
    aset = adapters.add_adapters(_model(torch.float32), "houlsby", [1, 2], bottleneck=4)
    with torch.no_grad():
        for name, p in aset.named_parameters():
            if ".up." in name:
                p.normal_(0.0, 0.5)  # up starts at zero (a no-op adapter); make it do something
    adapters.save_adapters(aset, tmp_path / "houlsby")
    cfg = EvalConfig(batch_size=3, max_new_tokens=4)
    plain = evaluate(loaded, TASK, cfg)
    adapted = evaluate(loaded, TASK, cfg, adapter=tmp_path / "houlsby")
    assert abs(adapted.loss - plain.loss) > 1e-3
    assert adapters.attached_adapters(base) is None
    assert all(p.requires_grad for p in base.parameters())
    again = evaluate(loaded, TASK, cfg)
    assert again.loss == plain.loss and again.predictions == plain.predictions


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_eval_writes_artifacts(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_folder), "--task", "synthetic:facts",
            "--examples", "3", "--batch-size", "2", "--max-new-tokens", "3",
            "--metrics", "token_f1,exact_match", "--out", str(out), "--json"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert list(summary["metrics"]) == ["token_f1", "exact_match"] and summary["n"] == 3
    assert summary["task"]["split"] == "test"  # a task's default split is its training one: never eval's
    res = EvalResult.load(out)
    assert res.n == 3 and len(res.predictions) == 3 and res.loss is not None
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert res.provenance["model_id"] == str(tiny_folder)

    # the table output path (no --json), without loss
    r = CliRunner().invoke(app, [a for a in args if a != "--json"] + ["--no-loss"])
    assert r.exit_code == 0, r.output
    assert EvalResult.load(out).loss is None


def test_cli_eval_says_what_it_cut_and_refuses_a_split_a_file_lacks(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_folder), "--task", "synthetic:facts", "--examples", "3",
            "--max-new-tokens", "2", "--max-length", "8", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "of 3 eval loss examples are longer than max_length 8 tokens and were cut" in r.output
    assert EvalResult.load(out).task["cut"]["loss_to_max_length"] > 0

    train = tmp_path / "tr.jsonl"
    train.write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    out2 = tmp_path / "ev2"
    r = CliRunner().invoke(app, [*args[:4], str(train), "--split", "test", "--out", str(out2)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"{train}: one file, no split 'test'" in " ".join(r.output.split())
    assert not (out2 / "eval.json").exists()


def test_cli_task_and_split_help_name_every_form():
    import typer

    params = {p.name: p.help for p in typer.main.get_command(app).commands["eval"].params}
    forms = ("JSONL", "JSON,", "CSV", "TSV", "Parquet", "save_to_disk", "PRESET[:SPLIT]", "synthetic:facts")
    for form in (*forms, "hf:NAME[:CONFIG]"):
        assert form in params["task"], form
    assert "A single file has no splits" in params["split"]


def test_cli_eval_unknown_metric(tiny_folder, tmp_path):
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_folder), "--task", "synthetic:facts",
                                 "--metrics", "exact_match,bogus", "--out", str(out)])  # fmt: skip
    assert r.exit_code != 0
    assert "unknown metric 'bogus'" in r.output and "Traceback" not in r.output
    assert not out.exists()


# ---------------------------------------------------------------- real model


@pytest.mark.smollm2
def test_smollm2_sst2_eval(smollm2):
    task = load_task(str(shared_data("sst2/validation.jsonl")))
    # One thread, against conftest's all-cores default for smollm2: on the shared 2-core machine, with
    # other jobs running, this test took 26 s with 2 threads and 2.7 s with 1 (OpenMP oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = evaluate(smollm2, task, EvalConfig(examples=4, batch_size=4, max_new_tokens=4), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert res.n == 4
    assert all(isinstance(p["prediction"], str) and p["prediction"] for p in res.predictions)
    assert 0.0 <= res.metrics["label_accuracy"] <= 1.0
    assert res.loss is not None and res.loss > 0


def test_more_positions_than_the_model_reads_are_refused_in_one_line():
    """A learned position table has no row past its end: generation and the loss refuse to go there."""
    model = tiny_model("gpt2", n_positions=24)
    task = load_task("synthetic:facts", split="test")
    examples = task.examples[:2]
    with pytest.raises(LayercardError, match=r"--max-new-tokens 40: the model reads at most 24 positions"):
        generate(model, tiny_tokenizer(), task, examples, batch_size=2, max_new_tokens=40)
    with pytest.raises(
        LayercardError, match=r"^--max-length 64: the model reads at most 24 positions \(n_pos"
    ):
        eval_example_losses(model, tiny_tokenizer(), task, examples, batch_size=2, max_length=64)
    # within the table: both run
    assert (
        len(eval_example_losses(model, tiny_tokenizer(), task, examples, batch_size=2, max_length=20)[0]) == 2
    )


def test_eval_notes_a_synthetic_task_generated_otherwise_than_the_training_one(tmp_path):
    from layercard.cli.app import other_generation, trained_task

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    trained = "synthetic:facts(seed=1,n_entities=50)"
    (tmp_path / "run" / "train_metrics.json").write_text(json.dumps({"task": {"source": trained}}))
    record = trained_task(adapter)
    said = other_generation(record, "synthetic:facts(seed=0,n_entities=50)")
    assert said is not None and "synthetic:facts(seed=1,n_entities=50)" in said and "--seed" in said
    assert other_generation(record, trained) is None  # the same generation
    assert other_generation(record, "synthetic:format(seed=0)") is None  # another task: not this note
    elsewhere = trained_task(tmp_path / "elsewhere")
    assert other_generation(elsewhere, "synthetic:facts(seed=0,n_entities=50)") is None


def test_eval_notes_the_split_the_adapter_was_trained_on(tmp_path):
    from layercard.cli.app import trained_examples
    from layercard.tasks import load_task

    calls = tmp_path / "calls"
    calls.mkdir()
    for split, rows in (("train", ["a", "b", "c"]), ("test", ["d"])):
        text = "".join(json.dumps({"input": x, "target": x}) + "\n" for x in rows)
        (calls / f"{split}.jsonl").write_text(text)
    train, test = load_task(str(calls)), load_task(f"{calls}:test")
    record = {"source": train.source, "split": "train", "data_hash": train.data_hash}
    said = trained_examples(record, load_task(f"{calls}:train"))
    assert said is not None and "trained on this split (train of calls)" in said
    assert trained_examples(record, test) is None and trained_examples(None, train) is None
    # a subset of the split (train --train-examples) is still its split; the same data elsewhere is the same
    assert trained_examples({**record, "data_hash": "0" * 64}, train) is not None
    assert trained_examples({"source": "elsewhere", "split": "x", "data_hash": train.data_hash}, train)


def test_inference_and_the_forward_timing_restore_each_modules_mode():
    from layercard.cost import forward_seconds

    model = _model()
    model.train()
    model.model.layers[0].eval()  # a caller's mix of modes, which model.train(was) would overwrite
    modes = {n: m.training for n, m in model.named_modules()}
    ids = torch.randint(3, 90, (2, 8))
    forward_seconds(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, warm=True)
    assert {n: m.training for n, m in model.named_modules()} == modes
    generate(model, tiny_tokenizer(), TASK, TASK.examples[:1], batch_size=1, max_new_tokens=2)
    assert {n: m.training for n, m in model.named_modules()} == modes
