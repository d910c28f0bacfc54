"""Inference primitives shared by the trimming and evaluation stages: greedy generation and target loss.

:func:`generate` produces greedy completions for a task's prompts (exactly the prompts training used,
:func:`layercard.tasks.encode_prompt`) and stops at the chat template's turn-end token, which is what the
targets were trained to end with. :func:`eval_loss` is the teacher-forced cross-entropy per target token,
the quantity training measures. Both run the model in eval mode without autograd and leave the caller's
mode as it was.

Timing (``s_per_example``, ``tokens_per_s``) is wall time of the batched ``generate`` calls only, with
adapters unmerged: this is the inference latency the trimming stage compares before and after
(docs/design.md §8). ``s_per_example`` is amortised over a batch (wall time / examples at ``batch_size``),
not the latency of a single request; compare it only between runs with the same batch size and machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from layercard.errors import LayercardError, setting_name
from layercard.progress import track
from layercard.tasks import (
    Encoded,
    Example,
    Task,
    batches,
    encode_prompt,
    encode_task,
    forward_row_losses,
    turn_end_token_id,
)

__all__ = [
    "as_float64",
    "device_of",
    "eval_example_losses",
    "eval_loss",
    "eval_mode",
    "generate",
    "pad_id",
    "restore_modes",
    "synchronize",
    "training_modes",
]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters, where its inputs go."""
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (CUDA, Apple's MPS) to finish, so that a clock read next
    times the work and not its queueing; nothing on a CPU, which computes as it goes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, on its device where that holds float64; Apple's MPS holds none, so there on the
    CPU."""
    return t.cpu().double() if t.device.type == "mps" else t.double()


def training_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each submodule's train/eval flag, for :func:`restore_modes`: a model may mix the two (a frozen
    part kept in eval mode), which ``model.train(was)`` would overwrite."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back the flags :func:`training_modes` read, module by module."""
    for module, training in modes:
        module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: greedy outputs must be deterministic) and no autograd for the block,
    restoring each submodule's mode as the caller had it."""
    modes = training_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        restore_modes(modes)


def pad_id(tokenizer: Any) -> int:
    """Pad id of right-padded teacher-forced batches (padding is masked out, so 0 serves when unset)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``: every row's last prompt token lines up at the end,
    where generation continues. Done here rather than by flipping ``tokenizer.padding_side``, so the
    shared tokenizer (right-padded for training) is never mutated and no pad token is required."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[k, width - len(r) :] = 1
    return ids, mask


def _stop_ids(tokenizer: Any) -> list[int]:
    """Turn-end token first (what targets end with), then the tokenizer's eos if different."""
    ids = [turn_end_token_id(tokenizer)]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return ids


def _generation_pad_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(stop_ids[-1])


def _generation_config(max_new_tokens: int, stop_ids: Sequence[int], pad: int) -> Any:
    from transformers import GenerationConfig

    # Greedy. The sampling knobs are set to their neutral values explicitly: left as None, generate()
    # fills them from the checkpoint's generation_config.json (e.g. temperature=0.2), and some
    # transformers versions then warn that do_sample=False ignores them.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
    )


@contextlib.contextmanager
def _own_generation_defaults(model: nn.Module) -> Iterator[None]:
    """The model's defaults for generation emptied for the block: generate() fills every setting the
    given config leaves unset from the checkpoint's generation_config.json (suppressed tokens, a
    no-repeat n-gram size, a length penalty), which would change greedy predictions by a file no artifact
    hashes."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    had = "generation_config" in vars(inner)
    saved = getattr(inner, "generation_config", None)
    if saved is None:
        yield
        return
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        if had:
            inner.generation_config = saved
        else:
            vars(inner).pop("generation_config", None)


def prompts_finite(model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example]) -> bool:
    """Whether the model's logits over the prompts of ``examples`` (one batch) are all finite: greedy
    decoding reads NaN logits as a token too, so generation alone cannot tell a broken model."""
    prompts = [encode_prompt(tokenizer, task.format, ex) for ex in examples]
    input_ids, attention = _left_pad(prompts, pad_id(tokenizer))
    device = device_of(model)
    with eval_mode(model), torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    return bool(torch.isfinite(logits[attention.to(device).bool()]).all())


def _check_context(model: nn.Module, positions: int, asked: str) -> None:
    """Refuse more positions than the model reads: past a learned position table a forward fails, and
    past any other the model reads positions it never saw."""
    from layercard.models import past_context

    if (over := past_context(model, positions)) is not None:
        raise LayercardError(f"{asked}: {over}, and {positions} were asked")


def generation_prompts(
    model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], max_new_tokens: int
) -> list[list[int]]:
    """The prompt ids :func:`generate` continues for ``examples``, refused where the longest of them and
    ``max_new_tokens`` are more positions than the model reads."""
    prompts = [encode_prompt(tokenizer, task.format, ex) for ex in examples]  # a chat example: all turns
    longest = max(len(p) for p in prompts)
    _check_context(
        model,
        longest + max_new_tokens,
        f"a prompt of {longest} tokens and {setting_name('max_new_tokens')} {max_new_tokens}",
    )
    return prompts


def generate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Greedy completions for ``examples`` (in their order) and the timing of the generate calls.

    Prompts are batched longest-first to cut padding, left-padded, and decoded up to the first stop
    token (turn-end or eos), special tokens skipped, outer whitespace stripped. Timing:
    ``gen_s`` (wall time in ``generate``), ``new_tokens`` (generated tokens up to and including the stop
    token), ``s_per_example`` and ``tokens_per_s``; beside them ``capped``, the completions that reached
    ``max_new_tokens`` with no stop token (their text ends where generation was stopped).
    """
    if batch_size < 1:
        raise LayercardError(f"batch_size: must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise LayercardError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not examples:
        raise LayercardError(f"task {task.name!r}: no examples to generate for")
    stops = _stop_ids(tokenizer)
    stop_set = set(stops)
    pad = _generation_pad_id(tokenizer, stops)
    gen_cfg = _generation_config(max_new_tokens, stops, pad)
    prompts = generation_prompts(model, tokenizer, task, examples, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties keep source order
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    texts: list[str] = [""] * len(prompts)
    new_tokens = 0
    capped = 0
    gen_s = 0.0
    device = device_of(model)
    with eval_mode(model), _own_generation_defaults(model):
        for group in track(groups, "generate", total=len(groups), enabled=progress):
            input_ids, attention = _left_pad([prompts[i] for i in group], pad)
            input_ids, attention = input_ids.to(device), attention.to(device)
            t0 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
            gen_s += time.perf_counter() - t0
            width = input_ids.shape[1]
            for row, i in enumerate(group):
                ids = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(ids) if t in stop_set), None)
                # finished rows are padded with pad_id after their stop token: count only real tokens
                new_tokens += len(ids) if cut is None else cut + 1
                capped += cut is None
                kept = ids if cut is None else ids[:cut]
                # the text as generated: transformers 4 tidied spaces before punctuation by default, 5 not
                text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                texts[i] = text.strip()
    timing = {
        "gen_s": gen_s,
        "new_tokens": new_tokens,
        "s_per_example": gen_s / len(prompts),
        "tokens_per_s": new_tokens / gen_s if gen_s > 0 else 0.0,  # JSON has no NaN
        "capped": capped,
    }
    return texts, timing


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


def eval_loss(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int | None,
) -> float:
    """Mean cross-entropy per target token (teacher forced, prompt masked), as training measures it."""
    sums, counts = eval_example_losses(
        model, tokenizer, task, examples, batch_size=batch_size, max_length=max_length
    )
    return math.fsum(sums) / sum(counts)


def eval_example_losses(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int | None,
    encoded: Sequence[Encoded] | None = None,
) -> tuple[list[float], list[int]]:
    """Each example's summed target cross-entropy and its target-token count, in ``examples``' order:
    :func:`eval_loss` is their sums' total over their counts' total. Kept per example so that a loss
    difference between two evaluations on the same examples has a sampling error. ``encoded``: the
    examples already encoded at ``max_length`` (else they are encoded here)."""
    if not examples:
        raise LayercardError(f"task {task.name!r}: no examples to score")
    if encoded is None:
        sub = dataclasses.replace(task, examples=tuple(examples))
        encoded = encode_task(tokenizer, sub, max_length=max_length)
    elif len(encoded) != len(examples):
        raise LayercardError(f"eval: {len(encoded)} encoded examples for {len(examples)} examples")
    longest = max((len(e.input_ids) for e in encoded), default=0)
    _check_context(model, longest, f"{setting_name('max_length')} {max_length}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: less padding
    sums, counts = [0.0] * len(encoded), [0] * len(encoded)
    device = device_of(model)
    done = 0
    with eval_mode(model):
        for batch in batches([encoded[i] for i in order], batch_size, pad_id(tokenizer)):
            row_sums, row_counts = forward_row_losses(
                model,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["labels"].to(device),
            )
            for k, (v, n) in enumerate(zip(row_sums.tolist(), row_counts.tolist(), strict=True)):
                sums[order[done + k]], counts[order[done + k]] = float(v), int(n)
            done += len(row_counts)
    return sums, counts
