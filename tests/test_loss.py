"""The target loss with the LM head run only where the loss reads it, against every position's logits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import FAMILIES, tiny_model

from layercard.tasks.loss import (
    IGNORE_INDEX,
    forward_loss,
    forward_row_losses,
    keeps_target_logits,
    logits_mask,
    loss_sum,
)


def _needs_kept_logits() -> None:
    import transformers.modeling_utils as mu

    if not hasattr(mu, "slice_logits_to_keep"):  # transformers before 5.21: the full logits are computed
        pytest.skip("this transformers computes no logits at a mask of positions (5.21 and later do)")


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three right-padded rows whose prompts end at different positions, so the kept positions differ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, length) in enumerate([(5, 14), (9, 12), (3, 8)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length:] = IGNORE_INDEX
        mask[row, length:] = 0
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _full(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return loss_sum(out.logits, b["labels"])


def test_logits_mask_marks_the_positions_before_each_target():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 7, 9]])
    assert logits_mask(labels).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_logits_give_the_full_loss_and_gradients(family):
    _needs_kept_logits()
    model = tiny_model(family, seed=1).double()
    assert keeps_target_logits(model)
    b = _batch(model.config.vocab_size)
    model.zero_grad()
    ref, n_ref = _full(model, b)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, n = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
    loss.backward()
    assert n == n_ref == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for k, p in model.named_parameters():
        if k in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-9, atol=1e-12)


def test_peft_wrapped_model_keeps_only_target_logits():
    _needs_kept_logits()
    model = tiny_model("llama", seed=2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert keeps_target_logits(peft_model)
    b = _batch(model.config.vocab_size, seed=3)
    seen = []
    head = peft_model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        loss, n = forward_loss(peft_model, b["input_ids"], b["attention_mask"], b["labels"])
    finally:
        hook.remove()
    assert seen == [(n, model.config.vocab_size)]  # one row of logits per target token, no more
    ref, _ = _full(peft_model, b)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


class _OwnForward(torch.nn.Module):
    """A model whose forward does not take a position mask: every position's logits are computed."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_other_models_fall_back_to_every_position():
    wrapped = _OwnForward(tiny_model("llama", seed=4))
    assert not keeps_target_logits(wrapped)
    b = _batch(96, seed=5)
    loss, n = forward_loss(wrapped, b["input_ids"], b["attention_mask"], b["labels"])
    ref, n_ref = _full(wrapped, b)
    assert n == n_ref and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_a_batch_without_targets_is_zero_not_nan():
    model = tiny_model("llama", seed=6)
    b = _batch(model.config.vocab_size)
    labels = torch.full_like(b["labels"], IGNORE_INDEX)
    loss, n = forward_loss(model, b["input_ids"], b["attention_mask"], labels)
    assert n == 0 and loss.item() == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_row_losses_split_the_batch_loss_by_example(family):
    model = tiny_model(family, seed=3).double()
    b = _batch(model.config.vocab_size, seed=4)
    with torch.no_grad():
        total, n = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        sums, counts = forward_row_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
        # each row alone, without the others' padding: the same sum
        alone = [
            forward_loss(
                model, b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1], b["labels"][i : i + 1]
            )
            for i in range(3)
        ]
    assert counts.tolist() == [9, 3, 5] and int(counts.sum()) == n  # targets: positions prompt .. length - 1
    assert sums.sum().item() == pytest.approx(total.item(), rel=1e-12)
    for i, (loss, k) in enumerate(alone):
        assert k == counts[i] and sums[i].item() == pytest.approx(loss.item(), rel=1e-9)


def test_row_losses_without_kept_logits_match(monkeypatch):
    import layercard.tasks.loss as L

    model = tiny_model("llama", seed=5).double()
    b = _batch(model.config.vocab_size, seed=6)
    with torch.no_grad():
        kept = forward_row_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
        monkeypatch.setattr(L, "keeps_target_logits", lambda m: False)  # every position's logits
        full = L.forward_row_losses(model, b["input_ids"], b["attention_mask"], b["labels"])
    torch.testing.assert_close(full[0], kept[0], rtol=1e-10, atol=1e-12)
    assert full[1].tolist() == kept[1].tolist()
