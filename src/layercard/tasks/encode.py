"""Token encoding of task examples: loss on target tokens only, exactly as training sees them.

An encoded example is ``prompt ids + target ids``. The prompt is the rendered chat template (user turn
plus the generation prompt) or, with the chat template off or a tokenizer without one,
``"{instruction}\\n"``; it is tokenized with ``add_special_tokens=False`` because the template already
writes its special tokens. The target is the target text followed by the turn-end token (the eos token
without a chat template). Labels are ``-100`` on every prompt token.

Prompt and target are tokenized *separately*, the way generation sees them (the model continues the
prompt ids); for SmolLM2 this equals tokenizing the whole chat text (checked in the tests).

Truncation keeps what matters for the loss and for generation: an over-long prompt loses tokens from
the start of the example's *input* (the system prompt, the instruction's start and the generation prompt
stay); where the input is too short to absorb the cut, the prompt keeps its end (the input's end and the
generation prompt) and loses its start. A target is cut from the right.

Two more layouts: a chat example (``Example.messages``) is the whole conversation, each segment
tokenized separately (``layercard.tasks.chat``), with loss on every assistant reply and its turn-end
token (a reply of weight 0 excepted) and on nothing else; an over-long conversation loses its oldest
tokens. Plain text (a ``completion`` format) is the BOS token (else EOS) followed by the text and EOS,
all of it target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layercard.errors import LayercardError, setting_name
from layercard.tasks.chat import (
    calls_text,
    chat_segments,
    has_chat_template,
    render_chat,
    uses_chat_template,
)
from layercard.tasks.example import Example
from layercard.tasks.loss import IGNORE_INDEX
from layercard.tasks.presets import TaskFormat
from layercard.tasks.task import Task

__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "batches",
    "build_prompt",
    "collate",
    "count_target_tokens",
    "encode_example",
    "encode_prompt",
    "encode_task",
    "end_token_id",
    "plug_in_entropy",
    "prompt_cut",
    "scored_as_written",
    "target_entropy",
    "turn_end_token",
    "turn_end_token_id",
]

_MARK = "LAYERCARDTURNMARK"
# Target tokens a task's target entropy is read from: a fixed count, so that a task with long targets is
# not credited with more token types for having more tokens (docs/design.md §4).
TARGET_ENTROPY_SAMPLE = 2048


@dataclass(frozen=True)
class Encoded:
    """One training sequence. ``labels[i] == -100`` for the ``prompt_len`` prompt tokens (and, in a
    conversation, for the text between assistant replies)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int
    cut: bool = False  # whether max_length cut it (its prompt first, then its target)
    clipped: bool = False  # whether the task format's own limits (max_input/target_tokens) cut it

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise LayercardError(f"Encoded: {len(self.input_ids)} input_ids but {len(self.labels)} labels")
        if not 0 <= self.prompt_len < len(self.input_ids):
            raise LayercardError(f"Encoded.prompt_len: {self.prompt_len} leaves no target token")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.input_ids[: self.prompt_len]

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.prompt_len :]


# ---------------------------------------------------------------- prompts


def build_prompt(tokenizer: Any, fmt: TaskFormat, text: str) -> str:
    """The prompt text the model continues: chat template with generation prompt, or ``instruction\\n``."""
    user = fmt.render_instruction(text)
    if not uses_chat_template(tokenizer, fmt):
        return (f"{fmt.system}\n\n" if fmt.system else "") + user + "\n"
    messages = [{"role": "user", "content": user}]
    if fmt.system:
        try:
            return render_chat(
                tokenizer, [{"role": "system", "content": fmt.system}, *messages], generation_prompt=True
            )
        except Exception:  # e.g. Gemma's template refuses a system turn: fold it into the user turn
            messages = [{"role": "user", "content": f"{fmt.system}\n\n{user}"}]
    try:
        return render_chat(tokenizer, messages, generation_prompt=True)
    except Exception as e:
        raise LayercardError(f"chat template failed on task {fmt.name!r}: {e}") from None


def turn_end_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn, which the target must end with (and generation stop at).

    Read off the chat template (what it writes right after an assistant message: ``<|im_end|>`` for
    SmolLM2/Qwen, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma), falling back to
    ``tokenizer.eos_token``.
    """
    if has_chat_template(tokenizer):
        try:
            rendered = render_chat(
                tokenizer,
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                generation_prompt=False,
            )
        except Exception:  # a template we cannot probe: the eos token is the safe default
            rendered = ""
        pos = rendered.rfind(_MARK)
        if pos >= 0:
            after = rendered[pos + len(_MARK) :].lstrip(" ")
            specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
            decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
            specials |= {str(t) for t in decoder.values()}
            matches = [s for s in specials if s and after.startswith(s)]
            if matches:
                return max(matches, key=len)
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        templated = (
            "its chat template names no turn-end token"
            if has_chat_template(tokenizer)
            else "no chat template"
        )
        raise LayercardError(
            f"tokenizer has no eos_token and {templated}: nothing would end a target; give it an eos_token"
        )
    return str(eos)


def turn_end_token_id(tokenizer: Any) -> int:
    """Id of :func:`turn_end_token` (pass it as ``eos_token_id`` when generating)."""
    tok = turn_end_token(tokenizer)
    tid = tokenizer.convert_tokens_to_ids(tok)
    if tid is None or (tid == getattr(tokenizer, "unk_token_id", None) and tok != tokenizer.unk_token):
        raise LayercardError(f"turn-end token {tok!r} is not in the tokenizer's vocabulary")
    return int(tid)


def _plain_bos(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer would add a BOS by itself (Llama-style), for template-free prompts."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def _tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers have no offsets
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None


def _input_span(prompt: str, fmt: TaskFormat, text: str) -> tuple[int, int] | None:
    """Character span of the example's input inside the rendered prompt, or None if not found."""
    user = fmt.render_instruction(text)
    pos = prompt.rfind(user)  # rfind: a default system prompt comes before the user turn
    if pos >= 0:
        start = pos + fmt.instruction.index("{input}")
        return start, start + len(text)
    # Templates that trim a message's content (``| trim``) change the rendered turn; the input itself,
    # trimmed alike, is still there.
    core = text.strip()
    pos = prompt.rfind(core) if core else -1
    return (pos, pos + len(core)) if pos >= 0 else None


def _truncate_prompt(
    ids: list[int], offsets: list[tuple[int, int]] | None, span: tuple[int, int] | None, budget: int
) -> list[int]:
    """Cut ``len(ids) - budget`` tokens: first from the start of the input span, then from the left."""
    excess = len(ids) - budget
    if excess <= 0:
        return ids
    if offsets is not None and span is not None:
        inside = [k for k, (s, e) in enumerate(offsets) if s >= span[0] and e <= span[1] and e > s]
        if excess <= len(inside):
            drop = set(inside[:excess])
            return [t for k, t in enumerate(ids) if k not in drop]
    # The input cannot absorb the cut (or was not found): keep the prompt's end, i.e. the end of the
    # input and the generation prompt, which matter more than the template's head.
    return ids[len(ids) - budget :] if budget > 0 else []


def end_token_id(tokenizer: Any, fmt: TaskFormat) -> int:
    """Id of the token every target ends with: the turn-end token, or EOS with the chat template off."""
    if fmt.chat_template:
        return turn_end_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LayercardError("tokenizer has no eos_token: targets without a chat template end with it")
    return int(eos)


def _start_id(tokenizer: Any) -> int:
    """The token plain text follows, so that its first token is predicted too: BOS, else EOS (the
    document separator of tokenizers without BOS)."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise LayercardError("tokenizer has neither a bos_token nor an eos_token to start plain text with")


_SPECIAL: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], re.Pattern[str] | None]] = (
    weakref.WeakKeyDictionary()
)


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """One pattern for every special token's text (None: the tokenizer has none), kept per tokenizer
    while it gains no tokens and its special tokens stay the same (a token of its vocabulary made special
    leaves its size as it was)."""
    specials = tuple(getattr(tokenizer, "all_special_tokens", ()) or ())
    key = (len(tokenizer), specials)
    try:
        kept = _SPECIAL.get(tokenizer)
    except TypeError:  # a stand-in that takes no weak reference: made each time
        kept = None
    if kept is not None and kept[0] == key:
        return kept[1]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = set(specials)
    texts |= {str(t) for t in added.values() if getattr(t, "special", False)}
    texts = {t for t in texts if t}
    pattern = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None
    try:
        _SPECIAL[tokenizer] = (key, pattern)
    except TypeError:
        pass
    return pattern


def check_text(tokenizer: Any, ex: Example) -> None:
    """Refuse an example whose own text holds a special token's text (``<|im_end|>``, ``</s>``): the
    tokenizer reads it as that control token, not as text, so a target could end before it starts and an
    input could forge a turn. The prompt template's own special tokens are not the example's."""
    if getattr(tokenizer, "split_special_tokens", False):
        return  # a tokenizer told to split them reads their text as text
    pattern = _special_pattern(tokenizer)
    if pattern is None:
        return
    fields = [("input", ex.input), ("target", ex.target)]
    fields += [(f"messages[{k}]", content) for k, (_, content) in enumerate(ex.messages or ())]
    for k, turn in enumerate(ex.turn_fields or ()):  # what a template may write of a turn's other fields
        if turn.get("tool_calls"):
            fields.append((f"messages[{k}].tool_calls", calls_text(turn["tool_calls"])))
        fields += [(f"messages[{k}].{key}", turn[key]) for key in ("tool_call_id", "name") if key in turn]
    tools = ex.meta.get("tools") if ex.messages is not None else None
    if tools:  # the chat template writes them into the sequence too
        fields.append(("tools", tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)))
    for name, text in fields:
        found = pattern.search(text)
        if found:
            raise LayercardError(
                f"example {ex.id!r}: its {name} holds {found.group()!r}, a special token of the tokenizer, "
                "which would be read as that control token and not as text; remove it from the data"
            )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _conversation_ids(
    tokenizer: Any, fmt: TaskFormat, ex: Example, end_id: int
) -> tuple[list[int], list[int], list[int], bool]:
    """(context ids, their labels, final reply ids + end id, whether ``max_target_tokens`` cut a reply):
    earlier replies carry their labels."""
    end_token = tokenizer.convert_ids_to_tokens(end_id)
    segments = chat_segments(tokenizer, fmt, ex, end_token)
    ids = [] if uses_chat_template(tokenizer, fmt) else _plain_bos(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    clipped = False
    for text, is_reply, trained in segments[:-1]:
        part = _ids(tokenizer, text)
        if trained:
            clipped |= len(part) + 1 > fmt.max_target_tokens
            part = (part + [end_id])[: fmt.max_target_tokens]
            labels += part
        else:  # context, or a reply of weight 0: whole, its end token too, with no loss
            part += [end_id] if is_reply else []
            labels += [IGNORE_INDEX] * len(part)
        ids += part
    reply = _ids(tokenizer, segments[-1][0]) + [end_id]
    clipped |= len(reply) > fmt.max_target_tokens
    return ids, labels, reply[: fmt.max_target_tokens], clipped


def scored_as_written(tokenizer: Any, fmt: TaskFormat, ex: Example) -> Example:
    """``ex`` with the reference evaluation scores a generation against: its target, except where its last
    turn calls tools and the chat template writes calls in its own form; the reference is then that turn
    as the template writes it, decoded as generation decodes (special tokens left out)."""
    if not ex.turn_fields or not ex.turn_fields[-1].get("tool_calls") or fmt.completion:
        return ex
    end_token = tokenizer.convert_ids_to_tokens(end_token_id(tokenizer, fmt))
    reply = chat_segments(tokenizer, fmt, ex, end_token)[-1][0]
    ids = _ids(tokenizer, reply)
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    return ex if text == ex.target else dataclasses.replace(ex, target=text, references=(text,))


def encode_prompt(
    tokenizer: Any, fmt: TaskFormat, text: str | Example, *, max_tokens: int | None = None
) -> list[int]:
    """Prompt token ids as training and generation use them (truncated to ``max_input_tokens``).

    ``text`` is an example's input, or the example itself: a chat example's prompt is its whole
    conversation up to the final assistant reply (its oldest tokens cut first).
    """
    budget = min(fmt.max_input_tokens, max_tokens) if max_tokens is not None else fmt.max_input_tokens
    if budget < 1:
        raise LayercardError(f"prompt budget must be >= 1 token, got {budget}")
    if fmt.completion:
        return [_start_id(tokenizer)]
    if isinstance(text, Example):
        check_text(tokenizer, text)
        if text.messages is not None:
            context = _conversation_ids(tokenizer, fmt, text, end_token_id(tokenizer, fmt))[0]
            return context[-budget:]
        text = text.input
    return _prompt_ids(tokenizer, fmt, text, budget)[0]


def prompt_cut(tokenizer: Any, fmt: TaskFormat, ex: Example) -> bool:
    """Whether the format's ``max_input_tokens`` cuts the prompt :func:`encode_prompt` gives ``ex`` (the
    prompt generation continues): a model answering a cut prompt may lack what the answer needs."""
    if fmt.completion:
        return False
    check_text(tokenizer, ex)
    if ex.messages is not None:
        context = _conversation_ids(tokenizer, fmt, ex, end_token_id(tokenizer, fmt))[0]
        return len(context) > fmt.max_input_tokens
    return _prompt_ids(tokenizer, fmt, ex.input, fmt.max_input_tokens)[1] > fmt.max_input_tokens


def _prompt_ids(tokenizer: Any, fmt: TaskFormat, text: str, budget: int) -> tuple[list[int], int]:
    """The rendered prompt's ids cut to ``budget``, and its length before the cut."""
    prompt = build_prompt(tokenizer, fmt, text)
    prefix = [] if uses_chat_template(tokenizer, fmt) else _plain_bos(tokenizer)
    ids, offsets = _tokenize_with_offsets(tokenizer, prompt)
    body = _truncate_prompt(ids, offsets, _input_span(prompt, fmt, text), budget - len(prefix))
    return prefix + body, len(prefix) + len(ids)


def _target_ids(tokenizer: Any, fmt: TaskFormat, ex: Example, end_id: int) -> tuple[list[int], bool]:
    """The target's ids and end id, cut to ``max_target_tokens``, and whether that cut them."""
    ids = list(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) + [end_id]
    return ids[: fmt.max_target_tokens], len(ids) > fmt.max_target_tokens


def _prompt_budget(prompt_len: int, target_len: int, max_length: int) -> int:
    """Tokens the prompt keeps when prompt + target exceed ``max_length``: cut the prompt first, but
    never below half the budget (a prompt of a few tokens teaches nothing); at least one target token."""
    budget = max(max_length - target_len, min(prompt_len, max_length // 2))
    return min(budget, max_length - 1)


def _encode_conversation(
    tokenizer: Any, fmt: TaskFormat, ex: Example, end_id: int, max_length: int | None
) -> Encoded:
    """Every assistant reply is a target; the context before the final one is cut from the left."""
    ids, labels, target, clipped = _conversation_ids(tokenizer, fmt, ex, end_id)
    keep = fmt.max_input_tokens
    clipped |= len(ids) > keep
    cut = max_length is not None and min(len(ids), keep) + len(target) > max_length
    if max_length is not None and cut:
        keep = min(keep, _prompt_budget(min(len(ids), keep), len(target), max_length))
        target = target[: max_length - min(len(ids), keep)]
    ids, labels = ids[-keep:], labels[-keep:]
    labels[0] = IGNORE_INDEX  # nothing predicts the first token
    labels += target
    return Encoded(
        input_ids=tuple(ids + target),
        labels=tuple(labels),
        prompt_len=next(k for k, t in enumerate(labels) if t != IGNORE_INDEX),
        cut=cut,
        clipped=clipped,
    )


def _encode_text(
    tokenizer: Any, fmt: TaskFormat, ex: Example, end_id: int, max_length: int | None
) -> Encoded:
    """Plain text: the start token, then the whole text and the end token as target."""
    body, clipped = _target_ids(tokenizer, fmt, ex, end_id)
    cut = max_length is not None and len(body) > max_length - 1
    if max_length is not None:
        body = body[: max_length - 1]
    return Encoded(
        input_ids=(_start_id(tokenizer), *body),
        labels=(IGNORE_INDEX, *body),
        prompt_len=1,
        cut=cut,
        clipped=clipped,
    )


def _encode(tokenizer: Any, fmt: TaskFormat, ex: Example, end_id: int, max_length: int | None) -> Encoded:
    check_text(tokenizer, ex)
    if ex.messages is not None:
        return _encode_conversation(tokenizer, fmt, ex, end_id, max_length)
    if fmt.completion:
        return _encode_text(tokenizer, fmt, ex, end_id, max_length)
    target, clipped = _target_ids(tokenizer, fmt, ex, end_id)
    if not target:
        raise LayercardError(f"example {ex.id!r}: target {ex.target!r} encodes to no tokens")
    prompt, whole = _prompt_ids(tokenizer, fmt, ex.input, fmt.max_input_tokens)
    clipped |= whole > fmt.max_input_tokens
    cut = max_length is not None and len(prompt) + len(target) > max_length
    if max_length is not None and cut:
        prompt = encode_prompt(
            tokenizer, fmt, ex.input, max_tokens=_prompt_budget(len(prompt), len(target), max_length)
        )
        target = target[: max_length - len(prompt)]
    if not target:
        raise LayercardError(f"example {ex.id!r}: no target token left after truncation")
    return Encoded(
        input_ids=tuple(prompt + target),
        labels=(IGNORE_INDEX,) * len(prompt) + tuple(target),
        prompt_len=len(prompt),
        cut=cut,
        clipped=clipped,
    )


def encode_example(tokenizer: Any, fmt: TaskFormat, ex: Example) -> Encoded:
    """Encode one example: prompt (labels -100) + target + turn-end token (see the module docstring)."""
    return _encode(tokenizer, fmt, ex, end_token_id(tokenizer, fmt), None)


def _check_max_length(max_length: int | None) -> None:
    if max_length is not None and max_length < 2:
        raise LayercardError(f"max_length: must be >= 2 (one prompt and one target token), got {max_length}")


def encode_task(tokenizer: Any, task: Task, *, max_length: int | None = None) -> list[Encoded]:
    """Encode every example of ``task``; ``max_length`` (≥ 2) caps prompt + target tokens."""
    _check_max_length(max_length)
    end_id = end_token_id(tokenizer, task.format)
    return [_encode(tokenizer, task.format, ex, end_id, max_length) for ex in task.examples]


# A training set larger than this is encoded as a run reads it (:class:`EncodedTask`), not ahead.
ENCODE_AHEAD = 10_000


class EncodedTask(Sequence[Encoded]):
    """A task's encoded examples, each encoded when first read: of a large training set, a run encodes
    the examples it reads alone. :meth:`read` gives those encoded so far."""

    def __init__(self, tokenizer: Any, task: Task, *, max_length: int | None = None) -> None:
        _check_max_length(max_length)
        self._tok, self._task, self._max_length = tokenizer, task, max_length
        self._end_id = end_token_id(tokenizer, task.format)
        self._done: dict[int, Encoded] = {}

    def __len__(self) -> int:
        return len(self._task)

    def __repr__(self) -> str:
        return f"EncodedTask({self._task.name!r}, {len(self._done)} of {len(self)} encoded)"

    def __getitem__(self, j: int) -> Encoded:  # type: ignore[override]
        n = len(self)
        if not isinstance(j, int) or not -n <= j < n:
            raise IndexError(j)
        j %= n
        if j not in self._done:
            self.fill([j])
        return self._done[j]

    def __iter__(self) -> Iterator[Encoded]:
        for start in range(0, len(self), 256):
            part = range(start, min(start + 256, len(self)))
            self.fill(part)
            yield from (self._done[j] for j in part)

    def fill(self, indices: Iterable[int]) -> None:
        """Encode the examples at ``indices`` not yet encoded (a large file's read in a few passes)."""
        missing = sorted({j for j in indices if j not in self._done})
        for start in range(0, len(missing), 4096):
            part = missing[start : start + 4096]
            for j, ex in zip(part, self._task.at(part).examples, strict=True):
                self._done[j] = _encode(self._tok, self._task.format, ex, self._end_id, self._max_length)

    def read(self) -> list[Encoded]:
        """The examples encoded so far, in the task's order."""
        return [self._done[j] for j in sorted(self._done)]


def encoded_so_far(encoded: Sequence[Encoded]) -> Sequence[Encoded]:
    """What of ``encoded`` has been encoded: all of a list, the examples read of an :class:`EncodedTask`."""
    return encoded.read() if isinstance(encoded, EncodedTask) else encoded


def cut_note(
    encoded: Sequence[Encoded],
    max_length: int | None,
    what: str,
    fmt: TaskFormat | None = None,
    *,
    setting: str | None = None,
) -> str | None:
    """Lines saying how many of ``what``'s encoded examples ``max_length`` cut and how many the task
    format's own limits cut (given ``fmt``), or None where none; ``setting`` names the length setting
    (default :func:`setting_name`)."""
    limits = (fmt.max_input_tokens, fmt.max_target_tokens) if fmt is not None else None
    n_clipped = sum(e.clipped for e in encoded)
    return cut_text(
        sum(e.cut for e in encoded), len(encoded), max_length, what, n_clipped, limits, setting=setting
    )


def cut_text(
    n: int,
    total: int,
    max_length: int | None,
    what: str,
    clipped: int = 0,
    limits: tuple[int, int] | None = None,
    *,
    setting: str | None = None,
) -> str | None:
    """The lines of :func:`cut_note` from the counts: ``n`` of ``total`` examples cut to ``max_length``,
    ``clipped`` cut to the format's ``limits`` (prompt tokens, target tokens)."""
    setting = setting or setting_name("max_length")
    lines = []
    if n and max_length is not None:
        lines.append(
            f"note: {n} of {total} {what} examples are longer than max_length {max_length} tokens and "
            f"were cut to it (the prompt first; raise {setting} to keep them whole)"
        )
    if clipped and limits is not None:
        lines.append(
            f"note: {clipped} of {total} {what} examples exceed the task format's limits of {limits[0]} "
            f"prompt and {limits[1]} target tokens and were cut to them (a prompt from its input's start, "
            "or from its own start where the input is too short to absorb the cut; a target from its end, "
            f"which then lacks its end token); {setting} does not lift these"
        )
    return "\n".join(lines) or None


def capped_generations_text(count: str | int, total: int, max_new_tokens: int | None) -> str:
    """That ``count`` of ``total`` generations reached ``max_new_tokens`` before an end token, and what
    that means for their scores (eval's note, and the trim sweep's per K)."""
    return (
        f"{count} of {total} generations reached max_new_tokens {max_new_tokens} before an end token and "
        f"were scored as cut there (raise {setting_name('max_new_tokens')} to let them finish)"
    )


# ---------------------------------------------------------------- batching


def collate(batch: Sequence[Encoded], pad_id: int, *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (or to ``pad_to``): ``input_ids``, ``attention_mask``, ``labels``."""
    if not batch:
        raise LayercardError("collate: empty batch")
    longest = max(len(e) for e in batch)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise LayercardError(f"collate: pad_to={pad_to} is shorter than the longest sequence ({longest})")
    input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, enc in enumerate(batch):
        n = len(enc)
        input_ids[row, :n] = torch.tensor(enc.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(enc.labels, dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batches(
    encoded: Sequence[Encoded], batch_size: int, pad_id: int, *, sort_by_length: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches in order, or longest-first (stable) with ``sort_by_length`` to cut padding."""
    if batch_size < 1:
        raise LayercardError(f"batch_size: must be >= 1, got {batch_size}")
    order = list(range(len(encoded)))
    if sort_by_length:
        order.sort(key=lambda i: -len(encoded[i]))  # sort is stable: ties keep source order
    for start in range(0, len(order), batch_size):
        yield collate([encoded[i] for i in order[start : start + batch_size]], pad_id)


def count_target_tokens(encoded: Sequence[Encoded]) -> int:
    """Number of tokens that carry loss (labels != -100)."""
    return sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in encoded)


def plug_in_entropy(ids: Sequence[int]) -> float:
    """Shannon entropy, in nats, of the empirical distribution of ``ids``."""
    if not ids:
        raise LayercardError("plug_in_entropy: no tokens")
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values())


def target_entropy(
    tokenizer: Any, task: Task, max_length: int, *, sample: int = TARGET_ENTROPY_SAMPLE, seed: int = 0
) -> tuple[float, int]:
    """The plug-in entropy (nats) of the first ``sample`` loss-carrying token ids of the task's examples,
    read in a seeded shuffle and encoded as training encodes them, and how many tokens it was read from
    (fewer than ``sample`` when the task has fewer). Only the examples it needs are encoded."""
    if sample < 1:
        raise LayercardError(f"target_entropy: sample must be >= 1, got {sample}")
    order = list(range(len(task.examples)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for start in range(0, len(order), 64):
        if len(ids) >= sample:
            break
        for e in encode_task(tokenizer, task.at(order[start : start + 64]), max_length=max_length):
            ids += [t for t in e.labels if t != IGNORE_INDEX]
    if not ids:
        raise LayercardError(f"task {task.name}: no target tokens to read the target entropy from")
    ids = ids[:sample]
    return plug_in_entropy(ids), len(ids)
