"""Hand-made cases with known answers for every metric in layercard.tasks.metrics."""

from __future__ import annotations

import json

import pytest

from layercard.errors import LayercardError
from layercard.tasks import (
    METRICS,
    Example,
    bleu,
    check_gold,
    compute_metrics,
    exact_match,
    extract_final_number,
    gsm8k_accuracy,
    label_accuracy,
    metric_scale,
    normalize_text,
    rouge_l,
    strict_match,
    token_f1,
)


def test_normalize_text_squad_style():
    assert normalize_text("The  Cat, sat!\n on a mat.") == "cat sat on mat"
    assert normalize_text("An apple; THE end") == "apple end"
    assert normalize_text("theatre") == "theatre"  # articles only as whole words
    assert normalize_text("  ") == ""


def test_exact_match_normalised_and_max_over_refs():
    assert exact_match("The cat.", ["a cat"]) == 1.0
    assert exact_match("cat", ["dog", "CAT!"]) == 1.0
    assert exact_match("black cat", ["cat"]) == 0.0


def test_an_answer_that_is_only_punctuation_is_matched_by_itself_alone():
    # normalised away, ":(" and an empty answer would both equal the label ":)"
    for wrong in (":(", "", "+", "...", ">&"):
        assert exact_match(wrong, [":)"]) == 0.0 and token_f1(wrong, [":)"]) == 0.0
    assert exact_match(" :) ", [":)"]) == 1.0 and token_f1(":)", [":)"]) == 1.0
    assert exact_match("+", ["-", "+"]) == 1.0 and exact_match("cat", [":)", "Cat!"]) == 1.0


def test_one_text_composed_or_decomposed_normalises_alike():
    assert normalize_text("cafe\u0301") == normalize_text("caf\u00e9") == "caf\u00e9"
    assert exact_match("cafe\u0301", ["Caf\u00e9"]) == 1.0 and token_f1("ﬁne", ["fine"]) == 1.0


def test_unicode_punctuation_is_dropped_like_ascii():
    # curly apostrophes and quotes, dashes, Spanish and CJK marks: a model writes them as readily as ASCII
    assert exact_match("Don\u2019t panic\u2026", ["don't panic"]) == 1.0
    assert exact_match("\u201cParis\u201d", ['"Paris"']) == 1.0
    assert token_f1("\u00bfS\u00ed?", ["s\u00ed"]) == 1.0
    assert normalize_text("well\u2014known \u00abcat\u00bb\u3002") == "wellknown cat"
    # symbols are not punctuation: a different symbol is a different answer
    assert exact_match("5 \u20ac", ["5 $"]) == 0.0
    # an answer of Unicode punctuation alone is compared as written, like an ASCII one
    assert exact_match("\u2026", ["\u2026"]) == 1.0 and exact_match("\u2014", ["\u2026"]) == 0.0


def test_an_answer_that_is_an_article_is_not_matched_by_nothing():
    # multiple-choice letters: without its article rule the reference "A" would equal an empty answer
    assert (
        exact_match("", ["A"]) == 0.0 and exact_match("The", ["A"]) == 0.0 and exact_match("B", ["A"]) == 0.0
    )
    assert (
        exact_match("A", ["A"]) == 1.0
        and exact_match("(a).", ["A"]) == 1.0
        and exact_match("a", ["B", "a"]) == 1.0
    )
    assert token_f1("", ["A"]) == 0.0 and token_f1("A", ["A"]) == 1.0
    assert exact_match("the cat", ["A", "cat"]) == 1.0  # other references keep SQuAD's rule
    assert exact_match("", [""]) == 1.0


def test_strict_match_keeps_punctuation():
    assert strict_match(" [name=A | age=3] ", ["[name=A | age=3]"]) == 1.0
    assert strict_match("name=A, age=3", ["[name=A | age=3]"]) == 0.0
    # what normalised EM would forgive
    assert exact_match("[name=A | age=3]", ["name=A age=3"]) == 1.0


def test_token_f1_by_hand():
    # pred -> {cat, sat, on, mat} (4), ref -> {cat, sat, on, red, mat} (5): overlap 4, P=1, R=4/5
    assert token_f1("the cat sat on the mat", ["cat sat on the red mat"]) == pytest.approx(2 * 0.8 / 1.8)
    # overlap 2 of 3 predicted, 2 of 4 reference: P=2/3, R=1/2, F1=4/7
    assert token_f1("red blue green", ["blue green yellow purple"]) == pytest.approx(4 / 7)
    assert token_f1("red blue green", ["nothing", "blue green yellow purple"]) == pytest.approx(4 / 7)
    # repeated tokens count with multiplicity: common = {x: 1, y: 1}, P = R = 2/3
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert token_f1("", [""]) == 1.0 and token_f1("", ["cat"]) == 0.0 and token_f1("dog", ["cat"]) == 0.0


def test_rouge_l_by_hand():
    assert rouge_l(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # LCS of 6-token sentences = "the cat on the mat" (5): P = R = F = 5/6
    assert rouge_l(["the cat sat on the mat"], [["the cat lay on the mat"]]) == pytest.approx(5 / 6)
    # best reference per example, then the mean over examples (0-1 scale)
    value = rouge_l(["the cat sat on the mat", "dog"], [["zzz", "the cat lay on the mat"], ["cat"]])
    assert value == pytest.approx((5 / 6 + 0.0) / 2)


def test_rouge_l_is_rouge_scores_own_on_ascii_text():
    """On ASCII text the words are those of rouge_score's default tokenizer (with Porter stemming), so
    scores match the literature's; checked on random ASCII text and, where present, SAMSum's summaries."""
    import json
    import os
    import random
    from pathlib import Path

    from rouge_score import rouge_scorer

    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    words = ["Running", "ran", "cats", "the", "A", "quickly", "it's", "U.S.", "x2", "3.5", "well-known", "_"]
    pairs = []
    for _ in range(200):
        pick = lambda: " ".join(rng.choice(words) + rng.choice(["", ",", "!", " --"]) for _ in range(8))  # noqa: E731
        pairs.append((pick(), pick()))
    root = Path(os.environ.get("LAYERCARD_DATA", "../shared/data")) / "samsum" / "validation.jsonl"
    if root.is_file():
        rows = [json.loads(line) for line in root.read_text(encoding="utf-8").splitlines()[:300]]
        texts = [r["target"] for r in rows if r["target"].isascii()]
        pairs += list(zip(texts, texts[1:], strict=False))
    for pred, ref in pairs:
        want = reference.score(ref, pred)["rougeL"].fmeasure
        assert rouge_l([pred], [[ref]]) == pytest.approx(want, abs=1e-12), (pred, ref)


def test_rouge_l_and_token_f1_read_every_script():
    """rouge_score alone keeps a-z and 0-9 only: Russian or Chinese text would have no words and score 0."""
    from rouge_score import rouge_scorer

    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ru = ("кошка спит на окне", "кошка сидит на окне")
    zh = ("今天天气很好", "今天天气不错")  # no spaces: each character a word
    assert reference.score(ru[1], ru[0])["rougeL"].fmeasure == 0.0
    assert rouge_l([ru[0]], [[ru[1]]]) == pytest.approx(3 / 4)
    assert rouge_l([zh[0]], [[zh[1]]]) == pytest.approx(4 / 6)
    assert rouge_l(["Größe"], [["größe"]]) == 1.0 and rouge_l(["Größe"], [["grosse"]]) == 0.0
    assert token_f1(zh[0], [zh[1]]) == pytest.approx(4 / 6)
    assert token_f1("東京 は 大きい", ["東京は大きい"]) == 1.0  # the same characters, spaced or not
    assert token_f1("the cat sat", ["a cat sat"]) == 1.0  # space-separated text as before


def test_bleu_multi_reference():
    preds = ["the cat sat on the mat today", "a dog barked at the mailman loudly"]
    refs = [
        ["something else entirely here", "the cat sat on the mat today"],
        ["a dog barked at the mailman loudly"],
    ]
    assert bleu(preds, refs) == pytest.approx(100.0)  # exact copy of one reference each, uneven ref counts
    # a perfect score is the scale itself, not a rounding past it (exp(log 100) = 100.00000000000004)
    twelve = ["one two three four five six seven eight nine ten eleven twelve"]
    assert bleu(twelve, [twelve]) <= METRICS["bleu"].scale
    assert bleu(preds, [[r[-1]] for r in refs]) == pytest.approx(100.0)
    assert bleu(["completely unrelated words"], [["the cat sat on the mat today"]]) == pytest.approx(0.0)
    partial = bleu(["the cat sat on the mat"], [["the cat sat on the mat today"]])
    assert 0.0 < partial < 100.0
    with pytest.raises(LayercardError, match="bleu: 2 predictions but 1 references"):
        bleu(preds, refs[:1])


def test_extract_final_number():
    assert extract_final_number("so 3 + 4 = 7 apples.") == 7.0
    assert extract_final_number("She paid $1,234 in total.") == 1234.0
    assert extract_final_number("The change is -5 degrees") == -5.0
    assert extract_final_number("It costs 3.50.") == 3.5
    assert extract_final_number("steps 2 and 3\n#### 18\nQuestion: 99 more") == 18.0  # the #### line wins
    assert extract_final_number("#### 1,000,000") == 1_000_000.0
    assert extract_final_number("no numbers here") is None
    # a range is not a negative number; commas that are not thousands groups separate numbers
    assert extract_final_number("between 3-4") == 4.0 and extract_final_number("pages 3–4") == 4.0
    assert extract_final_number("the list 1,2,3") == 3.0 and extract_final_number("half is .5") == 0.5
    assert extract_final_number("#### 1e3") == 1000.0 and extract_final_number("about 2.5e-2.") == 0.025
    assert extract_final_number("12e4abc") == 4.0  # a letter after the exponent: not one number
    assert extract_final_number("#### −5") == -5.0  # the minus sign, not a hyphen


def test_gsm8k_accuracy():
    preds = ["... = 1,234\n#### 1,234", "the answer is 18.0", "I get -3", "I think 7", "no idea"]
    answers = ["1234", "18", "-3", "8", "5"]
    assert gsm8k_accuracy(preds, answers) == pytest.approx(3 / 5)
    assert gsm8k_accuracy(["3.5"], [3.5]) == 1.0
    with pytest.raises(LayercardError, match="answer 'abc' is not a number"):
        gsm8k_accuracy(["1"], ["abc"])


def test_label_accuracy():
    preds = ["Positive.", "negative, not positive", "It is good", "NEGATIVELY so", "positive"]
    labels = ["positive", "negative", "positive", "negative", 1]
    # 1: yes; 2: first label word is "negative": yes; 3: no label word; 4: not a whole word; 5: index 1
    assert label_accuracy(preds, labels) == pytest.approx(3 / 5)
    assert label_accuracy(["B"], ["b"], label_set=("a", "b")) == 1.0
    with pytest.raises(LayercardError, match="label index 2 outside"):
        label_accuracy(["x"], [2])


@pytest.mark.parametrize("gold", ["nan", "inf", "-inf", "NaN", float("nan"), float("inf")])
def test_a_gold_answer_that_is_not_a_finite_number_is_refused(gold):
    # float() reads "nan" and "inf": accepted, every prediction would silently score 0
    with pytest.raises(LayercardError, match=r"gsm8k_accuracy: answer .* is not a number"):
        gsm8k_accuracy(["nan"], [gold])
    ex = [Example("g1", "q", "steps\n#### 5", meta={"final_answer": gold})]
    for run in (
        lambda: compute_metrics(["gsm8k_accuracy"], ["#### 5"], ex),
        lambda: check_gold(["gsm8k_accuracy"], ex),
    ):
        with pytest.raises(LayercardError, match=r"gsm8k_accuracy: example 'g1': answer .* is not a number"):
            run()
    with pytest.raises(LayercardError, match="example 'g2': no final_answer and no number in its target"):
        check_gold(["exact_match", "gsm8k_accuracy"], [Example("g2", "q", "steps\n#### 1e999")])


def test_check_gold_passes_good_gold_data_and_metrics_that_need_none():
    good = [Example("1", "q", "steps\n#### 12", meta={"final_answer": "1,200"}), Example("2", "q", "#### 7")]
    check_gold(["gsm8k_accuracy", "exact_match", "bleu", "label_accuracy"], good)
    check_gold(["exact_match", "label_accuracy"], [Example("3", "q", "no number at all")])


def test_label_accuracy_matches_labels_that_start_or_end_with_punctuation():
    labels = ("(a)", "(b)", "(c)")
    preds = ["The answer is (B).", "(A)", "(c) because", "b", "answer(a)", "(A)(B)"]
    gold = ["(b)", "(a)", "(c)", "(b)", "(a)", "(a)"]
    # 1-3: yes; 4: "b" is not the label "(b)"; 5: "(a)" glued to a word is not a label; 6: first is (a)
    assert label_accuracy(preds, gold, label_set=labels) == pytest.approx(4 / 6)
    # word labels keep their whole-word matching
    assert label_accuracy(
        ["positively", "a positive one", "negative!"], ["positive", "positive", "negative"]
    ) == (pytest.approx(2 / 3))
    # a label that begins a longer one does not take its place
    assert label_accuracy(["not bad at all"], ["not bad"], label_set=("not", "not bad")) == 1.0
    exs = [Example("1", "q", "(A)"), Example("2", "q", "(B)")]
    assert compute_metrics(["label_accuracy"], ["(A) it is", "I pick (B)"], exs) == {"label_accuracy": 1.0}


def test_compute_metrics_dispatch():
    exs = [
        Example("1", "q", "steps\n#### 12", meta={"final_answer": "12"}),
        Example("2", "q", "steps\n#### 7"),  # no final_answer: read from the target's #### line
    ]
    out = compute_metrics(["gsm8k_accuracy", "exact_match"], ["so #### 12", "#### 7"], exs)
    assert list(out) == ["gsm8k_accuracy", "exact_match"]
    assert out["gsm8k_accuracy"] == 1.0 and out["exact_match"] == 0.0

    sst = [Example("1", "s", "positive"), Example("2", "s", "positive")]
    # the other label is still recognised when only one class is present in the subset
    assert compute_metrics(["label_accuracy"], ["positive", "negative, positive"], sst) == {
        "label_accuracy": 0.5
    }

    e2e = [Example("1", "mr", "Zeta Diner is a pub.", ("Zeta Diner is a pub.", "A pub: Zeta Diner."))]
    scores = compute_metrics(["bleu", "rouge_l", "token_f1", "strict_match"], ["A pub: Zeta Diner."], e2e)
    assert scores == pytest.approx({"bleu": 100.0, "rouge_l": 1.0, "token_f1": 1.0, "strict_match": 1.0})


def test_compute_metrics_errors_and_registry():
    exs = [Example("1", "q", "a")]
    with pytest.raises(LayercardError, match="unknown metric 'meteor'; valid: exact_match, strict_match"):
        compute_metrics(["meteor"], ["a"], exs)
    with pytest.raises(LayercardError, match="exact_match: 2 predictions but 1 references"):
        compute_metrics(["exact_match"], ["a", "b"], exs)
    with pytest.raises(LayercardError, match="no predictions to score"):
        compute_metrics(["exact_match"], [], [])
    assert set(METRICS) == {
        "exact_match", "strict_match", "token_f1", "rouge_l", "bleu", "gsm8k_accuracy", "label_accuracy",
        "tool_call_match",
    }  # fmt: skip
    assert metric_scale("bleu") == 100.0 and all(m.scale == 1.0 for n, m in METRICS.items() if n != "bleu")


def test_train_predictions_take_the_first_step_figure_for_a_run_without_calibration():
    from layercard.train.metrics import predictions

    window = {"peak_mib": 3000.0, "activations_mib": 1000.0, "resident_mib": 1000.0}
    first = {"peak_mib": 2600.0, "activations_mib": 800.0, "resident_mib": 1000.0}
    predicted = {"calibration_batch_positions": 500, "memory": window | {"first_step": first}}
    args = (predicted, 1.0, 500.0, 2700.0, 1000.0)
    kept = predictions(*args, positions_per_step=500.0, max_positions=750)
    assert kept["predicted_memory_figure"] == "window"
    assert kept["predicted_peak_memory_scaled_mib"] == pytest.approx(3000 + 1000 * 0.5)
    fresh = predictions(*args, positions_per_step=500.0, max_positions=750, first_step=True)
    assert fresh["predicted_memory_figure"] == "first_step"
    assert fresh["predicted_peak_memory_mib"] == 2600.0
    assert fresh["predicted_peak_memory_scaled_mib"] == pytest.approx(2600 + 800 * 0.5)
    assert fresh["predicted_training_memory_mib"] == pytest.approx(2000.0)
    assert fresh["peak_memory_ratio"] == pytest.approx(2700 / 3000)
    # a plan without the first step's figure (a card made before it was kept) keeps the window's
    old = predictions({**predicted, "memory": window}, *args[1:], first_step=True)
    assert old["predicted_memory_figure"] == "window" and old["predicted_peak_memory_mib"] == 3000.0
    # no memory predicted: no figure
    assert predictions({}, *args[1:], first_step=True)["predicted_memory_figure"] is None


def test_train_predictions_scale_time_by_mean_and_memory_by_largest_batch():
    from layercard.train.metrics import predictions

    predicted = {
        "step_time_s": 2.0,
        "calibration_batch_size": 4,
        "calibration_batch_tokens": 400,
        "calibration_batch_positions": 500,
        "memory": {"peak_mib": 3000.0, "activations_mib": 1000.0, "resident_mib": 1000.0},
    }
    # steps average 400 positions, the largest micro-batch had 750
    out = predictions(predicted, 1.8, 350.0, 3400.0, 1000.0, positions_per_step=400.0, max_positions=750)
    assert out["predicted_step_time_scaled_s"] == pytest.approx(2.0 * 400 / 500)
    assert out["predicted_peak_memory_scaled_mib"] == pytest.approx(3000 + 1000 * (750 / 500 - 1))
    assert out["peak_memory_ratio"] == pytest.approx(3400 / 3500)
    assert out["training_memory_ratio"] == pytest.approx(2400 / 2500)
    # the peak restated from where this run began (1,000 MiB, here the card's own resident size): the same
    assert out["predicted_peak_memory_at_start_mib"] == pytest.approx(3500)
    # a run that began 100 MiB above the card's resident size: the restated peak moves with it
    later = predictions(predicted, 1.8, 350.0, 3400.0, 1100.0, positions_per_step=400.0, max_positions=750)
    assert later["predicted_peak_memory_at_start_mib"] == pytest.approx(1100 + 2500)
    assert later["peak_memory_at_start_ratio"] == pytest.approx(3400 / 3600)
    assert later["peak_memory_ratio"] == out["peak_memory_ratio"]  # the plan's own figure is unchanged
    # no start (no per-run window on this system): nothing to restate
    none = predictions(predicted, 1.8, 350.0, 3400.0, None, positions_per_step=400.0, max_positions=750)
    assert none["predicted_peak_memory_at_start_mib"] is None and none["peak_memory_at_start_ratio"] is None
    assert out["max_batch_positions"] == 750
    # without the largest batch (files written before it was recorded) memory follows the mean
    old = predictions(predicted, 1.8, 350.0, 3400.0, 1000.0, positions_per_step=400.0)
    assert old["predicted_peak_memory_scaled_mib"] == pytest.approx(3000 + 1000 * (400 / 500 - 1))
    # a card that measured how much of a step grows with positions: only that part is rescaled
    affine = predictions(
        predicted | {"step_time_position_share": 0.25}, 1.8, 350.0, 3400.0, 1000.0, positions_per_step=1000.0
    )
    assert affine["predicted_step_time_scaled_s"] == pytest.approx(2.0 * (0.75 + 0.25 * 1000 / 500))


def test_over_budget_names_each_budget_the_runs_batches_exceed():
    from layercard.train.metrics import over_budget, priced_at

    predicted = {
        "step_time_s": 2.0,
        "calibration_batch_positions": 500,
        "step_time_position_share": 1.0,
        "memory": {"peak_mib": 3000.0, "activations_mib": 1000.0, "resident_mib": 1000.0},
        "reference": {"memory": 4000.0, "step_time": 3.0, "params": 1e6},
    }
    # the largest micro-batch 600 positions: peak 3,000 + 1,000 × 0.2; steps of 550 on average: 2.2 s
    at = priced_at(predicted, 550.0, 600)
    assert at["peak_scaled_mib"] == pytest.approx(3200) and at["step_time_scaled_s"] == pytest.approx(2.2)
    [line] = over_budget("memory=3100", predicted, at)
    assert "memory=3100" in line and "3,200 MiB" in line and "3,100 MiB" in line and "3,000 MiB" in line
    assert "600 padded positions" in line and "500" in line
    assert over_budget("memory=3300", predicted, at) == []  # fits at the largest micro-batch too
    # relative budgets are resolved against the reference: 0.78x of 4,000 MiB is 3,120
    assert len(over_budget("memory=0.78x", predicted, at)) == 1
    assert over_budget("memory=0.81x", predicted, at) == []
    lines = over_budget("params=0.1x,step_time=2.1,memory=3100", predicted, at)
    assert [x.split(":")[0] for x in lines] == ["budget step_time=2.1 s", "budget memory=3100 MiB"]
    assert "2.2 s" in lines[0] and "550 padded positions per step" in lines[0]
    # no budget, or a relative one without a reference to resolve it: nothing to say
    assert over_budget(None, predicted, at) == []
    assert over_budget("memory=0.5x", {k: v for k, v in predicted.items() if k != "reference"}, at) == []
    # shorter batches than the card's: under a budget the plan met, never over it
    assert over_budget("memory=3000,step_time=2.0", predicted, priced_at(predicted, 400.0, 450)) == []


# ---------------------------------------------------------------- tool calls


def test_tool_call_match_compares_calls_not_their_json_text():
    from layercard.tasks.metrics import tool_call_match, tool_calls_in

    ref = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    # another key order, spacing and wrapping: the same call
    assert tool_call_match('{"arguments":{"b":3,"a":2},"name":"add"}', [ref]) == 1.0
    assert tool_call_match('[{"name": "add", "parameters": {"a": 2, "b": 3}}]', [ref]) == 1.0  # Llama's key
    assert (
        tool_call_match('{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}', [ref]) == 1.0
    )  # as text
    # another argument, another function, a missing or an extra call, no call: not the same
    assert tool_call_match('{"name": "add", "arguments": {"a": 2, "b": 4}}', [ref]) == 0.0
    assert tool_call_match('{"name": "sub", "arguments": {"a": 2, "b": 3}}', [ref]) == 0.0
    assert tool_call_match(ref + "\n" + ref, [ref]) == 0.0
    # the calls of one turn are made together: another order is the same calls, a call twice is not two
    paris, london = (json.dumps({"name": "w", "arguments": {"city": c}}) for c in ("Paris", "London"))
    assert tool_call_match(london + "\n" + paris, [paris + "\n" + london]) == 1.0
    assert tool_call_match(f"[{london}, {paris}]", [paris + "\n" + london]) == 1.0
    assert tool_call_match(paris + "\n" + paris, [paris + "\n" + london]) == 0.0
    assert tool_call_match(paris, [paris + "\n" + london]) == 0.0
    assert tool_call_match("it is 5", [ref]) == 0.0
    assert tool_call_match('{"name": "add"}', [ref]) == 0.0  # no arguments: not a call
    # a whole number however written is that number; a string, a bool or another number is not
    for same in ("2.0", "2e0", "20e-1"):
        assert tool_call_match('{"name": "add", "arguments": {"a": ' + same + ', "b": 3}}', [ref]) == 1.0
    for other in ('"2"', "true", "2.5"):
        assert tool_call_match('{"name": "add", "arguments": {"a": ' + other + ', "b": 3}}', [ref]) == 0.0
    deep = '{"name": "f", "arguments": {"xs": [1.0, {"y": 3.0}]}}'
    assert tool_calls_in(deep) == [("f", '{"xs": [1, {"y": 3}]}')]
    # several calls keep their order; an object inside a call's arguments is not a call of its own
    two = '{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {"x": 1}}'
    assert tool_calls_in(two) == [("a", "{}"), ("b", '{"x": 1}')]
    nested = '{"name": "f", "arguments": {"inner": {"name": "g", "arguments": {}}}}'
    assert [name for name, _ in tool_calls_in(nested)] == ["f"]
    # OpenAI's layout written out: the call inside "function"
    assert tool_calls_in('{"id": "c1", "function": {"name": "f", "arguments": "{}"}}') == [("f", "{}")]
    assert tool_calls_in("{not json} and {}") is None


def test_tool_call_match_refuses_gold_without_a_call_before_generating():
    from layercard.tasks import Example, check_gold, compute_metrics

    good = Example("g", "q", '{"name": "f", "arguments": {"x": 1}}')
    answer = Example("b", "q", "just text")
    with pytest.raises(
        LayercardError, match=r"^tool_call_match: no reference of the 2 examples holds a tool call.*'b'"
    ):
        check_gold(["tool_call_match"], [answer, answer])
    scores = compute_metrics(["tool_call_match"], ['{"name":"f","arguments":{"x":1}}', "no"], [good, good])
    assert scores == {"tool_call_match": 0.5}
    # a mixed set: where the reference makes no call, the prediction is right when it makes none either
    check_gold(["tool_call_match"], [good, answer])
    call, text = '{"name":"f","arguments":{"x":1}}', "other words"
    for preds, want in (([call, text], 1.0), ([call, call], 0.5), ([text, text], 0.5), ([text, call], 0.0)):
        assert compute_metrics(["tool_call_match"], preds, [good, answer]) == {"tool_call_match": want}


def test_tool_call_split_counts_calls_and_answers_of_a_mixed_set():
    from layercard.tasks import tool_call_split

    call = '{"name": "f", "arguments": {"x": 1}}'
    other = '{"name": "f", "arguments": {"x": 2}}'
    refs = [[call], [call], [call], ["positive"], ["negative"]]
    preds = [call, other, "no call", "positive", other]
    assert tool_call_split(preds, refs) == {
        "calls_right": 1, "calls_other": 1, "calls_missing": 1, "answers_right": 1, "answers_called": 1,
    }  # fmt: skip
    # the counts are tool_call_match's: right calls and answers without a call, over every example
    assert compute_metrics(
        ["tool_call_match"], preds, [Example(str(i), "q", r[0]) for i, r in enumerate(refs)]
    ) == {"tool_call_match": 2 / 5}
    assert tool_call_split(preds[:3], refs[:3]) is None  # every reference a call: not mixed
    assert tool_call_split(preds[3:], refs[3:]) is None  # none
