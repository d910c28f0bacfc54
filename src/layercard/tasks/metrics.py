"""Task metrics: pure functions over predictions and references.

Scales: every metric is in [0, 1] except ``bleu``, which keeps sacrebleu's 0–100 scale because that is
the number every BLEU table in the literature reports. :data:`METRICS` records each metric's scale.

Per-example functions (``exact_match``, ``strict_match``, ``token_f1``, ``tool_call_match``) take one
prediction and its references and take the maximum over references. Corpus functions (``rouge_l``, ``bleu``,
``gsm8k_accuracy``, ``label_accuracy``) take parallel lists. :func:`compute_metrics` dispatches by name
over a list of :class:`~layercard.tasks.example.Example`.
Every metric declares its direction (``higher_is_better``); so does the teacher-forced ``loss``, which
is not a text metric but is selected on beside them.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layercard.errors import LayercardError
from layercard.tasks.example import Example

__all__ = [
    "METRICS",
    "Metric",
    "bleu",
    "check_gold",
    "compute_metrics",
    "default_metrics",
    "exact_match",
    "extract_final_number",
    "LOSS",
    "gsm8k_accuracy",
    "higher_is_better",
    "label_accuracy",
    "normalize_text",
    "rouge_l",
    "strict_match",
    "token_f1",
    "tool_call_match",
    "tool_call_split",
    "tool_calls_in",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Japanese kana, CJK
# ideographs): each of their characters is counted as a word.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0003134f]"
)
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


def _spaced(text: str) -> str:
    """``text`` with each character of a script written without spaces set apart as a word."""
    return _UNSPACED.sub(r" \g<0> ", text)


def _is_punct(ch: str) -> bool:
    """ASCII punctuation (symbols such as ``$`` and ``+`` included, as SQuAD drops them) or any Unicode
    punctuation: curly quotes and apostrophes, dashes, « », ¿, 。 — the forms a model writes as readily
    as the ASCII ones."""
    return ch in _PUNCT or unicodedata.category(ch).startswith("P")


def normalize_text(text: str, *, articles: bool = True) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (ASCII and Unicode's) and (unless
    ``articles=False``) the articles a/an/the, collapse whitespace; first Unicode's compatibility
    composition (NFKC), so that one text stored composed or decomposed ("café" either way) normalises
    alike."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    if articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _plain(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _normalized_pairs(prediction: str, references: Sequence[str]) -> list[tuple[str, str]]:
    """(prediction, reference) normalised alike, per reference. A reference that is nothing but articles
    (the answer "A" of a multiple-choice item) keeps them on both sides: dropped, it would equal an empty
    or wrong answer. One that is nothing but punctuation (a ":)" or "+" label) is compared with its
    punctuation, lowercased with whitespace collapsed: normalised, every such answer, an empty one
    included, would equal every other."""
    pairs = []
    for ref in references:
        norm = normalize_text(ref)
        if norm:
            pairs.append((normalize_text(prediction), norm))
        elif normalize_text(ref, articles=False):
            pairs.append((normalize_text(prediction, articles=False), normalize_text(ref, articles=False)))
        else:
            pairs.append((_plain(prediction), _plain(ref)))
    return pairs


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    return float(any(p == r for p, r in _normalized_pairs(prediction, references)))


def strict_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the prediction equals a reference after stripping outer whitespace only.

    For tasks where punctuation *is* the answer (the synthetic ``format`` task), SQuAD normalisation
    would forgive exactly the errors being measured.
    """
    pred = prediction.strip()
    return float(any(pred == r.strip() for r in references))


def _f1_one(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # SQuAD convention: two empty answers agree, one empty answer scores 0
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 over normalised whitespace tokens (bag of words), max over references; each
    character of a script written without spaces (Chinese, Japanese, Thai) is a token."""
    pairs = _normalized_pairs(prediction, references)
    return max((_f1_one(_spaced(p).split(), _spaced(r).split()) for p, r in pairs), default=0.0)


_ROUGE_SCORER = None


def _rouge_scorer():  # built lazily: importing rouge_score pulls in nltk, which is slow
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from nltk.stem import porter
        from rouge_score import rouge_scorer, tokenizers

        class WordTokenizer(tokenizers.Tokenizer):
            """rouge_score's default tokenizer on ASCII text (lowercased runs of letters and digits, words
            of four characters or more Porter-stemmed), keeping the letters of every script: the default
            drops every character outside a-z and 0-9, so that a text in Russian or Chinese has no
            words and every prediction scores 0. Words with letters beyond ASCII are not stemmed (the
            stemmer is English's); each character of a script written without spaces is a word."""

            def __init__(self) -> None:
                self._stemmer = porter.PorterStemmer()

            def tokenize(self, text: str) -> list[str]:
                words = _WORD.findall(_spaced(text.lower()))
                return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]

        # Porter stemming as in the SAMSum/CNN-DM literature and Google's reference scripts. The tokenizer
        # is given: left to choose it, the scorer logs through absl, which gives the process's root logger
        # a handler of its own (and a caller's logging.basicConfig then does nothing).
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WordTokenizer())
    return _ROUGE_SCORER


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (not ×100); per example the best reference counts.

    Uses ``rouge_score`` with its default tokenization on ASCII text (lowercased letters and digits,
    Porter stemming), kept for the letters of every script (words beyond ASCII unstemmed; a character
    of Chinese, Japanese or Thai a word of its own).
    """
    _check_parallel(predictions, references, "rouge_l")
    scorer = _rouge_scorer()
    total = 0.0
    for pred, refs in zip(predictions, references, strict=True):
        total += scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
    return total / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU on sacrebleu's 0–100 scale, with every example's references.

    sacrebleu wants reference *streams* of equal length; examples with fewer references are padded
    with ``None``, which sacrebleu skips (so padding does not change the score).
    """
    import sacrebleu

    _check_parallel(predictions, references, "bleu")
    n_streams = max(len(r) for r in references)
    if n_streams == 0:
        raise LayercardError("bleu: every example has an empty reference list")
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]
    # clipped: exp(log 100) makes a perfect score 100.00000000000004
    return min(float(sacrebleu.corpus_bleu(list(predictions), streams).score), 100.0)


# A number: a minus sign unless it joins two words ("3-4" is a range, not -4), digits in thousands groups
# ("1,000"; "1,2,3" is three numbers) or plain, optional decimals; or decimals alone (".5"); an exponent
# ("1e3") when no letter follows it.
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+(?![A-Za-z]))?"
)
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # the minus sign and the en dash as a minus


def extract_final_number(text: str) -> float | None:
    """The answer number in a GSM8K-style solution, or None.

    Takes the first number after the last ``####`` when the text has one (a model that keeps writing
    after its answer line is still scored on that line), else the last number in the text.
    Thousands commas are removed; a trailing full stop is not part of the number.
    """
    text = text.translate(_MINUS)
    tail = text.rsplit("####", 1)[1] if "####" in text else None
    if tail is not None:
        found = _NUMBER.findall(tail)
        if found:
            return _to_float(found[0])
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _to_float(token: str) -> float | None:
    token = token.replace(",", "")
    try:
        return float(token)
    except ValueError:  # e.g. "-," cannot happen with the regex, but stay total
        return None


def _gold_value(ans: str | float | int) -> float | None:
    """A gold answer as a finite number, else None: "nan" and "inf" parse as floats but no prediction
    can equal them, so every example would silently score 0."""
    gold = float(ans) if isinstance(ans, (int, float)) else _to_float(str(ans))
    return gold if gold is not None and math.isfinite(gold) else None


def gsm8k_accuracy(predictions: Sequence[str], answers: Sequence[str | float | int]) -> float:
    """Share of predictions whose final number (see :func:`extract_final_number`) equals the answer.

    ``answers`` are the ``final_answer`` values (commas allowed); compared numerically (1e-6 tolerance,
    so "18.0" and "18" agree).
    """
    _check_parallel(predictions, answers, "gsm8k_accuracy")
    correct = 0
    for pred, ans in zip(predictions, answers, strict=True):
        gold = _gold_value(ans)
        if gold is None:
            raise LayercardError(f"gsm8k_accuracy: answer {ans!r} is not a number")
        got = extract_final_number(pred)
        correct += int(got is not None and math.isclose(got, gold, rel_tol=0.0, abs_tol=1e-6))
    return correct / len(predictions)


def label_accuracy(
    predictions: Sequence[str],
    labels: Sequence[str | int],
    label_set: Sequence[str] = ("negative", "positive"),
) -> float:
    """Share of predictions whose first label (case-insensitive, not part of a longer word) is the gold
    label.

    ``labels`` are label words (or punctuated labels such as ``(A)``) or integer indices into
    ``label_set``. A prediction with no label counts as wrong.
    """
    _check_parallel(predictions, labels, "label_accuracy")
    words = [w.lower() for w in label_set]
    # (?<!\w)/(?!\w), not \b: a label that starts or ends with punctuation ("(a)") has no word boundary
    # there. Longest first, so a label that begins another ("not", "not bad") does not take its place.
    alternatives = sorted(words, key=len, reverse=True)
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in alternatives) + r")(?!\w)")
    correct = 0
    for pred, gold in zip(predictions, labels, strict=True):
        if isinstance(gold, int) and not isinstance(gold, bool):
            if not 0 <= gold < len(words):
                raise LayercardError(f"label_accuracy: label index {gold} outside label_set {tuple(words)}")
            gold_word = words[gold]
        else:
            gold_word = str(gold).strip().lower()
        m = pattern.search(pred.lower())
        correct += int(m is not None and m.group(1) == gold_word)
    return correct / len(predictions)


_DECODER = json.JSONDecoder()


def tool_calls_in(text: str) -> list[tuple[str, str]] | None:
    """The tool calls written in ``text`` as (name, arguments as sorted JSON) pairs, in order: every JSON
    object with a string ``name`` and ``arguments`` (or ``parameters``, Llama's key) that is an object
    or its JSON text, wherever it stands (bare, one a line, inside a template's tags or a JSON list).
    None where the text holds none. An object inside a call is part of it, not a call of its own."""
    calls: list[tuple[str, str]] = []
    k = text.find("{")
    while k >= 0:
        try:
            obj, end = _DECODER.raw_decode(text, k)
        except json.JSONDecodeError:
            k = text.find("{", k + 1)
            continue
        call = _as_call(obj)
        if call is not None:
            calls.append(call)
            k = text.find("{", end)
        else:
            k = text.find("{", k + 1)
    return calls or None


def _as_call(obj: object) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(_whole_numbers(args), sort_keys=True, ensure_ascii=False)


def _whole_numbers(value: object) -> object:
    """``value`` with every whole float written as an int: an argument of 2.0 is the number 2, as a
    function taking a number reads it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def tool_call_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 where the prediction's tool calls (:func:`tool_calls_in`) are those of a reference: the same
    functions with the same arguments, each as often, in any order (the calls of one turn are made
    together, so their order carries nothing), whatever the JSON's key order and spacing, the text
    around it or how a whole number is written (2, 2.0, 2e0); else 0.0. A string argument is compared
    as written: "2" is not the number 2. Against a reference that makes no call, a prediction is right
    when it makes none either (whatever its text, which the text metrics score)."""
    calls = _call_set(prediction)
    return float(any(calls == _call_set(r) for r in references))


def _call_set(text: str) -> list[tuple[str, str]] | None:
    """The calls of ``text`` sorted: two turns making the same calls in another order compare equal."""
    calls = tool_calls_in(text)
    return None if calls is None else sorted(calls)


def tool_call_split(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, int] | None:
    """What :func:`tool_call_match` is made of on a set whose references mix calls and answers, or None
    where they do not mix: of the examples due a call (some reference makes one), ``calls_right``,
    ``calls_other`` (another call) and ``calls_missing`` (no call); of those due an answer,
    ``answers_right`` (no call made) and ``answers_called``."""
    _check_parallel(predictions, references, "tool_call_split")
    out = dict.fromkeys(("calls_right", "calls_other", "calls_missing", "answers_right", "answers_called"), 0)
    for pred, refs in zip(predictions, references, strict=True):
        made = tool_calls_in(pred)
        if not any(tool_calls_in(r) for r in refs):
            key = "answers_right" if made is None else "answers_called"
        elif made is None:
            key = "calls_missing"
        else:
            key = "calls_right" if tool_call_match(pred, refs) else "calls_other"
        out[key] += 1
    due = out["calls_right"] + out["calls_other"] + out["calls_missing"]
    return out if 0 < due < len(predictions) else None


# The formats of data no preset names, whose metrics compare text: data of tool calls is scored by its calls.
_GENERIC_FORMATS = ("chat", "jsonl")


def default_metrics(format_name: str, metrics: Sequence[str], examples: Sequence[Example]) -> tuple[str, ...]:
    """The metrics an evaluation scores when none are asked for: the format's ``metrics``, for data no
    preset names (chat or input/target records) led by ``tool_call_match`` where every reference of
    every example holds a tool call (a function-calling set), and followed by it where some do (a set
    that ends now in a call, now in an answer: the text metrics lead, as most of it is text)."""
    if format_name not in _GENERIC_FORMATS or not examples or "tool_call_match" in metrics:
        return tuple(metrics)
    holds = [bool(ex.references) and all(tool_calls_in(r) for r in ex.references) for ex in examples]
    if all(holds):
        return ("tool_call_match", *metrics)
    some = any(tool_calls_in(r) for ex in examples for r in ex.references)
    return (*metrics, "tool_call_match") if some else tuple(metrics)


def _tool_call_gold(examples: Sequence[Example]) -> None:
    """A set where no reference holds a call would score only that none is made: refused."""
    if examples and not any(tool_calls_in(r) for ex in examples for r in ex.references):
        ex = examples[0]
        raise LayercardError(
            f"tool_call_match: no reference of the {len(examples)} examples holds a tool call (a JSON "
            f"object with a name and arguments); example {ex.id!r}'s is {ex.target!r:.80}"
        )


def _check_parallel(a: Sequence[object], b: Sequence[object], name: str) -> None:
    if len(a) != len(b):
        raise LayercardError(f"{name}: {len(a)} predictions but {len(b)} references")
    if len(a) == 0:
        raise LayercardError(f"{name}: no predictions to score")


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Metric:
    """A named metric over (predictions, examples); ``scale`` is its maximum (1 or 100)."""

    name: str
    fn: Callable[[Sequence[str], Sequence[Example]], float]
    scale: float
    description: str
    higher_is_better: bool = True
    # raises on gold data the metric cannot score: run before generation, which may take hours
    check_gold: Callable[[Sequence[Example]], None] | None = None

    def __call__(self, predictions: Sequence[str], examples: Sequence[Example]) -> float:
        _check_parallel(predictions, examples, self.name)
        return float(self.fn(predictions, examples))


def _mean_per_example(fn: Callable[[str, Sequence[str]], float]):
    def corpus(predictions: Sequence[str], examples: Sequence[Example]) -> float:
        return sum(fn(p, ex.references) for p, ex in zip(predictions, examples, strict=True)) / len(
            predictions
        )

    return corpus


def _gold_number(ex: Example) -> str:
    """``final_answer`` from the example's meta, else the number after ``####`` in its target; checked
    to be a finite number, so a bad gold answer is named with its example."""
    if "final_answer" in ex.meta:
        answer = str(ex.meta["final_answer"])
        if _gold_value(answer) is None:
            raise LayercardError(f"gsm8k_accuracy: example {ex.id!r}: answer {answer!r} is not a number")
        return answer
    value = extract_final_number(ex.target)
    if value is None or not math.isfinite(value):
        raise LayercardError(f"example {ex.id!r}: no final_answer and no number in its target")
    return repr(value)


def _gsm8k_gold(examples: Sequence[Example]) -> None:
    for ex in examples:
        _gold_number(ex)


def _label_accuracy_examples(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    # The gold label is the target word. The label set is every gold word seen plus SST-2's pair, so a
    # subset that happens to hold one class still recognises a prediction of the other.
    gold = [e.target.strip().lower() for e in examples]
    label_set = sorted(set(gold) | {"negative", "positive"})
    return label_accuracy(predictions, gold, label_set)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", _mean_per_example(exact_match), 1.0, "normalised exact match, max over refs"),
        Metric(
            "strict_match", _mean_per_example(strict_match), 1.0, "exact string match (outer spaces only)"
        ),
        Metric("token_f1", _mean_per_example(token_f1), 1.0, "SQuAD token F1, max over refs"),
        Metric(
            "rouge_l",
            lambda p, ex: rouge_l(p, [e.references for e in ex]),
            1.0,
            "ROUGE-L F-measure (0-1), max over refs",
        ),
        Metric(
            "bleu", lambda p, ex: bleu(p, [e.references for e in ex]), 100.0, "sacrebleu corpus BLEU (0-100)"
        ),
        Metric(
            "gsm8k_accuracy",
            lambda p, ex: gsm8k_accuracy(p, [_gold_number(e) for e in ex]),
            1.0,
            "final number equals final_answer",
            check_gold=_gsm8k_gold,
        ),
        Metric(
            "label_accuracy",
            _label_accuracy_examples,
            1.0,
            "first label word equals the gold label",
        ),
        Metric(
            "tool_call_match",
            _mean_per_example(tool_call_match),
            1.0,
            "the same tool calls (names and arguments) as a ref, whatever their JSON's key order or spacing; "
            "none where it makes none",
            check_gold=_tool_call_gold,
        ),
    )
}


def compute_metrics(
    names: Sequence[str], predictions: Sequence[str], examples: Sequence[Example]
) -> dict[str, float]:
    """Score ``predictions`` against ``examples`` with each named metric, in the order given."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise LayercardError(f"unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}")
    return {n: METRICS[n](predictions, examples) for n in names}


def check_gold(names: Sequence[str], examples: Sequence[Example]) -> None:
    """Raise on gold data a named metric cannot score (a GSM8K answer that is not a number), before any
    prediction is generated; unknown names are left to :func:`compute_metrics`."""
    for name in names:
        metric = METRICS.get(name)
        if metric is not None and metric.check_gold is not None:
            metric.check_gold(examples)


LOSS = "loss"  # the teacher-forced loss: selectable like a metric, lower is better


def higher_is_better(name: str) -> bool:
    """The direction of a metric, or of ``loss`` (lower is better)."""
    if name == LOSS:
        return False
    if name not in METRICS:
        raise LayercardError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}, {LOSS}")
    return METRICS[name].higher_is_better


def metric_scale(name: str) -> float:
    """The maximum value of a metric (1.0, or 100.0 for BLEU)."""
    if name not in METRICS:
        raise LayercardError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name].scale
