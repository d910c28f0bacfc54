"""The noise-scale benchmark's estimator against a direct computation on a tiny model."""

from __future__ import annotations

import pytest
import torch
from benchscripts import benchmark_script
from tiny import tiny_model


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("noise_scale") as module:
        yield module


def _examples(lengths, vocab=96, seed=0):
    """Random prompts, each followed by the first ``target`` tokens of one shared answer: the examples'
    gradients differ but share a direction."""
    from layercard.tasks.encode import IGNORE_INDEX, Encoded

    g = torch.Generator().manual_seed(seed)
    answer = torch.randint(3, vocab, (8,), generator=g).tolist()
    out = []
    for prompt, target in lengths:
        ids = torch.randint(3, vocab, (prompt,), generator=g).tolist() + answer[:target]
        labels = (IGNORE_INDEX,) * prompt + tuple(ids[prompt:])
        out.append(Encoded(input_ids=tuple(ids), labels=labels, prompt_len=prompt))
    return out


def _weights(model):
    from layercard import models

    mods = dict(model.named_modules())
    return [mods[s.name].weight for s in models.units(model, "all-linear")]


def test_two_passes_agree_with_the_stored_gradients(bench):
    from layercard.tasks import batches
    from layercard.tasks.loss import forward_loss

    torch.manual_seed(0)
    model = tiny_model("llama")
    enc = _examples([(4, 3), (6, 1), (3, 5), (5, 2), (2, 4)])
    weights = _weights(model)
    got = bench.example_noise(model, weights, enc, pad_id=0)

    h, n = [], []
    for b in batches(enc, 1, 0):
        model.zero_grad()
        for w in weights:
            w.requires_grad_(True)
        loss, count = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        h.append(torch.cat([w.grad.flatten() for w in weights]).double())
        n.append(count)
    hs, ns = torch.stack(h), torch.tensor(n, dtype=torch.float64)
    mean = hs.sum(0) / ns.sum()
    spread = ((hs - ns[:, None] * mean) ** 2).sum() / (len(n) - 1)
    signal = mean @ mean - spread / (len(n) * ns.mean() ** 2)
    assert signal > 0  # the shared answer gives the mean gradient a direction the noise does not swamp
    assert got["example_spread"] == pytest.approx(float(spread), rel=1e-4)
    assert got["mean_grad_sq_unbiased"] == pytest.approx(float(signal), rel=1e-4)
    assert got["b_noise"] == pytest.approx(float(spread / (ns.mean() ** 2 * signal)), rel=1e-4)
    assert got["mean_grad_sq_unbiased"] < got["mean_grad_sq"]


def test_one_example_repeated_has_no_noise_and_the_model_is_left_as_it_was(bench):
    model = tiny_model("llama")
    enc = _examples([(4, 3)]) * 4
    weights = _weights(model)
    before = [p.requires_grad for p in model.parameters()]
    got = bench.example_noise(model, weights, enc, pad_id=0)
    assert got["b_noise"] == pytest.approx(0.0, abs=1e-6)
    assert got["mean_grad_sq"] > 0
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(w.grad is None for w in weights)
