"""The card's hook pass against autograd, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from layercard import models
from layercard.card import stats
from layercard.card.coupling import layer_effects
from layercard.card.probe import compute_dtype, make_accumulators, run_probe, symmetric_gram
from layercard.tasks.loss import loss_sum


def _batches(vocab: int, seed: int = 0, n_batches: int = 3, bsz: int = 3, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (bsz, length), generator=g)
        mask = torch.ones(bsz, length, dtype=torch.long)
        labels = ids.clone()
        labels[:, : length // 2] = -100  # prompt tokens
        # Right padding on some rows: masked out of inputs and labels.
        mask[0, -3:] = 0
        labels[0, -3:] = -100
        ids[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _n_target(batches) -> int:
    return int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_hook_gradients_equal_autograd(family: str):
    model = tiny_model(family).double()
    specs = models.units(model, "all-linear")
    batches = _batches(model.config.vocab_size)
    n_tgt = _n_target(batches)
    accs = make_accumulators(
        specs, lora_rank=2, a_draws=1, seed=0, sketch=None, device=torch.device("cpu"), dtype=torch.float64
    )
    loss = run_probe(model, batches, accs, n_target_tokens=n_tgt)
    assert np.isfinite(loss)
    # Reference: autograd's weight gradients of the same mean loss.
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {s.key: models.get_module(model, s.name).weight for s in specs}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    ref_loss = 0.0
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        ls, _ = loss_sum(out.logits, b["labels"])
        (ls / n_tgt).backward()
        ref_loss += float(ls.detach()) / n_tgt
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for acc in accs:
        g = weights[acc.spec.key].grad
        if acc.spec.module_kind == "conv1d":
            g = g.T
        torch.testing.assert_close(acc.grad, g.double(), rtol=1e-9, atol=1e-12)
    # Σ excludes padding: n equals the unpadded positions.
    n_unpadded = int(sum(int(b["attention_mask"].sum()) for b in batches))
    assert all(acc.group.n == n_unpadded for acc in accs)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_a_pass_above_a_layer_stops_backward_there(family: str):
    """Measuring layers ≥ 2 only: the same gradients as a full pass, and no backward below layer 2."""
    model = tiny_model(family).double()
    upper = [s for s in models.units(model, "all-linear") if s.layer >= 2]
    batches = _batches(model.config.vocab_size)
    n_tgt = _n_target(batches)

    def measured(start: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        reached: list[int] = []
        layers = models.decoder_layers(model)
        hooks = [
            layers[i].register_full_backward_hook(lambda *_a, i=i: reached.append(i))
            for i in range(len(layers))
        ]
        try:
            accs = make_accumulators(
                upper,
                lora_rank=2,
                a_draws=1,
                seed=0,
                sketch=None,
                device=torch.device("cpu"),
                dtype=torch.float64,
            )
            run_probe(model, batches, accs, n_target_tokens=n_tgt, start_layer=start)
        finally:
            for h in hooks:
                h.remove()
        return {a.spec.key: a.grad for a in accs}, sorted(set(reached))

    full, reached_full = measured(0)
    cut, reached_cut = measured(2)
    assert 0 in reached_full and min(reached_cut) == 2  # backward ran below layer 2 only without the cut
    for key, g in full.items():
        torch.testing.assert_close(cut[key], g, rtol=1e-12, atol=1e-15)


def test_covariance_matches_direct_inputs():
    model = tiny_model("llama").double()
    specs = models.units(model, "q,v", layers=[1])
    batches = _batches(model.config.vocab_size, n_batches=2)
    accs = make_accumulators(
        specs, lora_rank=2, a_draws=1, seed=0, sketch=None, device=torch.device("cpu"), dtype=torch.float64
    )
    run_probe(model, batches, accs, n_target_tokens=_n_target(batches))
    seen: list[torch.Tensor] = []
    mod = models.get_module(model, specs[0].name)
    h = mod.register_forward_hook(lambda _m, i, _o: seen.append(i[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    h.remove()
    x = torch.cat([s[b["attention_mask"].bool()] for s, b in zip(seen, batches, strict=True)])
    torch.testing.assert_close(symmetric_gram(accs[0].group.xtx), x.T @ x)
    assert accs[0].group is accs[1].group  # q and v share their input


@pytest.mark.parametrize("k", [5, 8, 9, 13, 24])
def test_blocked_gram_equals_the_whole_product(k: int):
    """Summing only the blocks on and above the diagonal, then mirroring them, gives XᵀX (block 4: widths
    that are and are not multiples of it, and one at the 2-block threshold that takes the plain product)."""
    from layercard.card.probe import add_gram

    gen = torch.Generator().manual_seed(k)
    acc = torch.zeros(k, k, dtype=torch.float64)
    xs = [torch.randn(7, k, generator=gen, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        add_gram(acc, x, block=4)
    full = sum(x.T @ x for x in xs)
    torch.testing.assert_close(symmetric_gram(acc), full)
    if k > 8:  # the blocked path never wrote below the diagonal
        assert float(acc.tril(-4).abs().max()) == 0.0


def test_float32_sums_match_a_float64_pass():
    """A float32 model's card sums in float32; they must agree with a float64 pass over the same weights."""
    model = tiny_model("llama")
    specs = models.units(model, "all-linear")
    batches = _batches(model.config.vocab_size, n_batches=3)
    n_tgt = _n_target(batches)
    cpu = torch.device("cpu")
    single = make_accumulators(specs, lora_rank=2, a_draws=2, seed=0, sketch=None, device=cpu)
    assert compute_dtype(next(model.parameters()).dtype) == torch.float32
    assert all(a.grad.dtype == torch.float32 for a in single)
    run_probe(model, batches, single, n_target_tokens=n_tgt)
    double = make_accumulators(
        specs, lora_rank=2, a_draws=2, seed=0, sketch=None, device=cpu, dtype=torch.float64
    )
    run_probe(model.double(), batches, double, n_target_tokens=n_tgt)
    for a, b in zip(single, double, strict=True):
        for x, y in (
            (a.grad, b.grad),
            (symmetric_gram(a.group.xtx), symmetric_gram(b.group.xtx)),
            (a.asa, b.asa),
        ):
            assert float((x.double() - y).norm() / y.norm()) < 1e-5, a.spec.key


def test_identical_directions_have_coupling_one():
    model = tiny_model("llama")
    specs = models.units(model, "q,v", layers=[0])
    g = torch.Generator().manual_seed(0)
    d = {s.name: torch.randn(s.d_out, s.d_in, generator=g) for s in specs}
    other = {
        s.name: torch.randn(s.d_out, s.d_in, generator=g) for s in models.units(model, "q,v", layers=[2])
    }
    batches = _batches(model.config.vocab_size, n_batches=1)
    # Same direction under two keys (and a scaled copy): cosine 1; another layer: less.
    _, eff = layer_effects(model, {0: d, 1: {k: 3 * v for k, v in d.items()}, 2: other}, batches)
    c = stats.coupling_matrix(eff)
    assert c[0, 1] == pytest.approx(1.0, abs=1e-4)
    assert abs(c[0, 2]) < 0.99


def _probed_tiny(n_batches: int):
    """A tiny model's units and their float32 sums after a probe pass (lora rank 2, two draws, exact)."""
    model = tiny_model("llama")
    specs = models.units(model, "all-linear")
    batches = _batches(model.config.vocab_size, n_batches=n_batches)
    n_tgt = _n_target(batches)
    accs = make_accumulators(specs, lora_rank=2, a_draws=2, seed=0, sketch=None, device=torch.device("cpu"))
    run_probe(model, batches, accs, n_target_tokens=n_tgt)
    return specs, accs, n_tgt


def test_float32_statistics_match_float64_statistics_of_the_same_sums():
    """The per-unit statistics run in the sums' precision after a float64 eigen-decomposition; they must
    agree with an all-float64 evaluation of the very same sums."""
    import copy

    from layercard.card.compute import _finish_pass
    from layercard.config import CardConfig

    _, accs, n_tgt = _probed_tiny(n_batches=3)
    widened, groups = [], {}
    for a in accs:
        if id(a.group) not in groups:
            groups[id(a.group)] = copy.copy(a.group)
            groups[id(a.group)].xtx = a.group.xtx.double()
        b = copy.copy(a)
        b.group, b.grad, b.asa, b.a_stack = (
            groups[id(a.group)],
            a.grad.double(),
            a.asa.double(),
            a.a_stack.double(),
        )
        widened.append(b)
    cfg = CardConfig(roles="all-linear", lora_rank=2, a_draws=2, coupling=False, calibrate=False)
    rows32, groups32, _, spectra32 = _finish_pass(accs, cfg, n_tgt)
    rows64, groups64, _, _ = _finish_pass(widened, cfg, n_tgt)
    assert next(iter(spectra32.values())).eigenvectors.dtype == np.float32
    for u, v in zip(rows32, rows64, strict=True):
        for f in ("grad_norm", "resnorm", "rate", "rate_linear"):
            assert getattr(u, f) == pytest.approx(getattr(v, f), rel=1e-5), (u.key, f)
        for k in v.captured:
            assert u.captured[k] == pytest.approx(v.captured[k], rel=1e-5, abs=1e-12), (u.key, k)
    for g, h in zip(groups32, groups64, strict=True):
        assert g.eigenvalues == h.eigenvalues and g.kappa == h.kappa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_input_has_its_own_seeded_sketch(dtype: torch.dtype):
    import math

    from layercard.card.probe import _stable_seed

    model = tiny_model("llama", seed=0)
    specs = models.units(model, models.parse_roles("all-linear"))
    k = min(s.d_in for s in specs) - 1  # every input is projected
    accs = make_accumulators(
        specs, lora_rank=2, a_draws=1, seed=3, sketch=k, device=torch.device("cpu"), dtype=dtype
    )
    groups = list({id(a.group): a for a in accs}.values())
    assert len(groups) > 2
    # one projection per input, none sharing memory with another (the draws pass through one buffer)
    assert len({a.group.sketch.data_ptr() for a in groups}) == len(groups)
    for a in groups:
        gen = torch.Generator().manual_seed(_stable_seed(3, f"sketch.{a.spec.layer}.{a.spec.input_group}"))
        want = torch.randn(a.spec.d_in, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
        assert a.group.sketch.dtype == dtype and torch.equal(a.group.sketch, want.to(dtype))


def test_statistics_on_several_threads_match_one_thread():
    """The statistics run per input and per unit on a pool of threads; the rows come back in the pass's
    order and with the values one thread gives."""
    from layercard.card.compute import _finish_pass
    from layercard.config import CardConfig

    specs, accs, n_tgt = _probed_tiny(n_batches=2)
    cfg = CardConfig(roles="all-linear", lora_rank=2, a_draws=2, coupling=False, calibrate=False)
    one = _finish_pass(accs, cfg, n_tgt, workers=1)
    three = _finish_pass(accs, cfg, n_tgt, workers=3, keep_grads=True)
    assert [u.key for u in three[0]] == [s.key for s in specs] == [u.key for u in one[0]]
    assert [g.key for g in three[1]] == [g.key for g in one[1]] and len(three[1]) < len(three[0])
    for u, v in zip(one[0], three[0], strict=True):
        assert u.group == v.group
        for f in ("grad_norm", "resnorm", "rate", "rate_quadratic"):
            assert getattr(u, f) == pytest.approx(getattr(v, f), rel=1e-6), (u.key, f)
        assert u.captured == pytest.approx(v.captured, rel=1e-6)
    for g, h in zip(one[1], three[1], strict=True):
        assert g.eigenvalues == pytest.approx(h.eigenvalues, rel=1e-9, abs=1e-12)
    # the gradients the coupling probe reads, one per unit
    assert set(three[2]) == {s.key for s in specs} and not one[2]


def test_a_non_finite_loss_names_the_micro_batch_of_the_whole_probe_set():
    from layercard.card.probe import shard
    from layercard.errors import LayercardError

    model = tiny_model("llama")
    batches = _batches(model.config.vocab_size, n_batches=5)
    batches[3]["input_ids"][1, 0] = 2  # no other batch holds token 2 (drawn from 3 up); its row is NaN
    with torch.no_grad():
        model.get_input_embeddings().weight[2] = float("nan")
    for rank, world, bad in ((0, 1, 3), (1, 2, 3)):  # micro-batch 3 is the second of rank 1's share
        mine = shard(batches, rank, world)
        with pytest.raises(LayercardError, match=rf"non-finite loss on probe micro-batch {bad} \(loss=nan\)"):
            run_probe(model, mine, [], n_target_tokens=_n_target(batches), numbering=(rank, world))
