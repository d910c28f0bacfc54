"""Weight SNR in the card and the ``spectrum`` policy (docs/design.md §3, §6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

from layercard.card import Card, CardConfig, GroupRow, UnitRow, compute_card
from layercard.card.stats import weight_snr
from layercard.config import SEARCH_POLICIES
from layercard.errors import LayercardError
from layercard.models import LoadedModel, linear_weight, weights_hash
from layercard.plan import POLICIES, Plan, PlanConfig, check_plan, make_plan
from layercard.tasks import load_task

N_LAYERS = 8

# ---------------------------------------------------------------------------------------------------------
# The statistic
# ---------------------------------------------------------------------------------------------------------


def _snr(w: np.ndarray) -> float:
    return weight_snr(np.linalg.svd(w.astype(np.float32), compute_uv=False), w.shape)


def test_weight_snr_by_hand():
    # Quartiles of [1, 2, 3, 4, 8] are 2 and 4: σ̂ = 2/1.349; β = 5/20 gives ε = σ̂·1.5 ≈ 2.22, so 8, 4, 3
    # are signal and 2, 1 noise: (15 / 3) / 8. The ratio m/n = 4 instead of min/max would give ε ≈ 4.45.
    s = np.array([8.0, 4.0, 3.0, 2.0, 1.0])
    assert weight_snr(s, (5, 20)) == pytest.approx(15 / 3 / 8)
    assert weight_snr(s, (20, 5)) == pytest.approx(15 / 3 / 8)  # the aspect ratio, whichever side is long
    # Equal bulk (IQR 0): everything is signal and the empty noise sum counts as 1.
    assert weight_snr(np.array([10.0, 1, 1, 1, 1]), (5, 5)) == pytest.approx(14 / 10)
    assert weight_snr(np.zeros(4), (4, 4)) == 0.0


def test_weight_snr_sees_low_rank_signal_over_noise():
    """At equal spectral norm (the statistic is normalised by it) a strong rank-4 signal reads higher."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((64, 64))
        u, _ = np.linalg.qr(rng.standard_normal((64, 4)))
        v, _ = np.linalg.qr(rng.standard_normal((64, 4)))
        signal = noise + 64.0 * u @ v.T  # singular values 4× the noise bulk's edge (2·√64)
        a, b = (w / np.linalg.norm(w, 2) for w in (noise, signal))
        assert _snr(b) > 1.3 * _snr(a)
    w = np.random.default_rng(0).standard_normal((32, 48))
    assert _snr(3.0 * w) == pytest.approx(_snr(w) / 3.0, rel=1e-5)  # divided by the largest singular value


# ---------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=N_LAYERS)


@pytest.fixture(scope="module")
def card(llama) -> Card:
    loaded = LoadedModel(llama, tiny_tokenizer(), "tiny", weights_hash(llama), "memory")
    cfg = CardConfig(
        roles="all-linear", examples=8, max_length=48, batch_size=4, calibrate=False, weight_snr=True
    )
    return compute_card(loaded, load_task("synthetic:facts", split="train"), cfg, progress=False)


def test_card_records_the_weight_snr_of_every_unit(card, llama):
    assert len(card.units) == 7 * N_LAYERS and "weight_snr_s" in card.timings
    assert 0 < card.timings["stats_s"] <= card.timings["probe_s"] <= card.timings["total_s"]
    for u in card.units:
        assert u.weight_snr is not None and math.isfinite(u.weight_snr) and u.weight_snr > 0
    # the card takes singular values from the smaller Gram matrix: the same SNR as an SVD, for wide
    # (down), tall (gate, up) and square matrices
    for u in card.units:
        w = linear_weight(llama, u.name).detach().numpy()
        assert w.shape == (u.d_out, u.d_in)
        assert u.weight_snr == pytest.approx(_snr(w), rel=1e-4), u.key


def test_a_card_without_weight_snr_has_the_same_scores_and_refuses_spectrum(card, llama):
    loaded = LoadedModel(llama, tiny_tokenizer(), "tiny", weights_hash(llama), "memory")
    cfg = CardConfig(
        roles="all-linear", examples=8, max_length=48, batch_size=4, calibrate=False, weight_snr=False
    )
    bare = compute_card(loaded, load_task("synthetic:facts", split="train"), cfg, progress=False)
    assert all(u.weight_snr is None for u in bare.units)
    assert [u.grad_norm for u in bare.units] == [u.grad_norm for u in card.units]
    with pytest.raises(LayercardError, match="weight_snr off"):
        make_plan(bare, PlanConfig("spectrum", budget="params=0.25x"))


def test_card_round_trip_keeps_weight_snr_and_old_cards_load(card, tmp_path):
    path = card.save(tmp_path / "card.json")
    again = Card.load(path)
    assert again == card and [u.weight_snr for u in again.units] == [u.weight_snr for u in card.units]
    old = json.loads(path.read_text())
    for u in old["units"]:
        del u["weight_snr"]  # a card written before the field existed
    loaded = Card.from_dict(old, source="old.json")
    assert all(u.weight_snr is None for u in loaded.units)
    assert Card.from_dict(loaded.to_dict()) == loaded  # None round-trips too


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "high"])
def test_card_refuses_a_bad_weight_snr(card, bad):
    d = card.to_dict()
    d["units"][3]["weight_snr"] = bad
    with pytest.raises(LayercardError, match=r"card\.json: units\[3\]\.weight_snr: must be a finite") as e:
        Card.from_dict(d, source="card.json")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------

# Known SNRs per role over 8 layers: q peaks at layers 6 and 1, v at 0 and 4.
SNR = {
    "q": [0.5, 3.0, 0.2, 0.4, 0.1, 0.3, 5.0, 0.6],
    "v": [9.0, 0.1, 0.2, 0.3, 4.0, 0.5, 0.6, 0.7],
}
TOP = {role: sorted(range(N_LAYERS), key=lambda i: -snrs[i]) for role, snrs in SNR.items()}


def synthetic_card(snr: dict[str, list[float]] | None = SNR, d: int = 32) -> Card:
    """q (32 → 32) and v (32 → 16) units on 8 layers with the given weight SNRs, like a tiny Llama's."""
    units, groups = [], []
    for i in range(N_LAYERS):
        groups.append(
            GroupRow(
                key=f"{i}.attn_in", layer=i, input_group="attn_in", d_in=d, n=10, sketched=None,
                eigenvalues=[1.0] * d, energy=1.0, kappa=1.0, effective_rank=float(d),
                noise_amplification=1.0,
            )
        )  # fmt: skip
        for role, d_out in (("q", d), ("v", d // 2)):
            units.append(
                UnitRow(
                    key=f"{i}.{role}", layer=i, role=role, name=f"model.layers.{i}.self_attn.{role}_proj",
                    d_in=d, d_out=d_out, group=f"{i}.attn_in", grad_norm=1.0 + i, resnorm=1.0,
                    captured={str(r): 1 - 2.0**-r for r in (1, 2, 4, 8, 16, 32)}, rate=1.0, rate_linear=1.0,
                    rate_quadratic=0.0, lora_params=8 * (d + d_out), grad_eig_energy=[1.0] * d,
                    weight_snr=None if snr is None else snr[role][i],
                )
            )  # fmt: skip
    return Card(
        provenance={}, config={"delta": 1e-3}, model={"id": "synthetic", "hash": "h" * 64, "family": "llama",
        "n_layers": N_LAYERS, "d_model": d}, task={"name": "t", "data_hash": "d" * 64}, roles=["q", "v"],
        n_positions=10, n_target_tokens=10, loss=1.0, units=units, groups=groups,
    )  # fmt: skip


def _layers_of(plan: Plan, role: str) -> list[int]:
    return sorted(u.layer for u in plan.units if u.role == role)


def _params(plan: Plan, card: Card) -> int:
    dims = {u.key: u.d_in + u.d_out for u in card.units}
    return sum(p.rank * dims[p.key] for p in plan.units)


def test_spectrum_is_a_search_policy():
    assert "spectrum" in POLICIES and "spectrum" in SEARCH_POLICIES
    with pytest.raises(LayercardError, match="policy spectrum needs a budget"):
        PlanConfig("spectrum")
    with pytest.raises(LayercardError, match="adapts the card's roles"):
        PlanConfig("spectrum", budget="params=0.25x", roles="q")
    with pytest.raises(LayercardError, match="target"):
        PlanConfig("spectrum", budget="params=0.25x", target=0.5)


def test_spectrum_takes_the_highest_snr_layers_within_the_budget(llama):
    card = synthetic_card()
    reference = 8 * sum(u.d_in + u.d_out for u in card.units)  # a q,v card's own units at rank 8
    plan = make_plan(card, PlanConfig("spectrum", budget="params=0.25x"))
    assert _params(plan, card) <= 0.25 * reference
    # The same share for every role (2 of 8 layers), the two highest-SNR layers of each.
    assert {role: _layers_of(plan, role) for role in SNR} == {r: sorted(TOP[r][:2]) for r in SNR}
    assert plan.layers == sorted(set(TOP["q"][:2]) | set(TOP["v"][:2]))
    assert plan.config["policy"] == "spectrum" and plan.config["roles"] == ["q", "v"]
    assert plan.predicted["candidate"]["layers"] == "snr-top-2"
    assert {u.rank for u in plan.units} == {8}
    assert plan.lora_config["target_modules"] == [u.name for u in plan.units]
    assert check_plan(plan, llama)["ok"]  # PEFT adapts exactly these modules
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(
    "budget, rank, share",
    [("params=0.25x", 4, 4), ("params=0.3x", 8, 2), ("modules=0.5x", 8, 4), ("modules=3", 8, 1)],
)
def test_spectrum_takes_the_largest_share_that_fits(budget, rank, share):
    card = synthetic_card()
    plan = make_plan(card, PlanConfig("spectrum", budget=budget, rank=rank))
    assert {role: _layers_of(plan, role) for role in SNR} == {r: sorted(TOP[r][:share]) for r in SNR}
    assert {u.rank for u in plan.units} == {rank}


def test_spectrum_says_when_nothing_fits():
    with pytest.raises(LayercardError, match="policy spectrum: nothing it can place fits modules=1") as e:
        make_plan(synthetic_card(), PlanConfig("spectrum", budget="modules=1"))
    assert "\n" not in str(e.value)


def test_spectrum_needs_the_weight_snr():
    with pytest.raises(LayercardError, match="re-measure the card") as e:
        make_plan(synthetic_card(snr=None), PlanConfig("spectrum", budget="params=0.25x"))
    assert "\n" not in str(e.value) and "weight_snr" in str(e.value)


def test_spectrum_on_a_measured_card(card):
    """Every linear role of a real card: the same share per role, within a relative budget."""
    plan = make_plan(card, PlanConfig("spectrum", budget="params=0.25x"))
    reference = plan.predicted["reference"]["params"]
    assert plan.predicted["params"] == _params(plan, card) <= 0.25 * reference * (1 + 1e-9)
    per_role = {role: len(_layers_of(plan, role)) for role in card.roles}
    assert len(set(per_role.values())) == 1, per_role
    n = next(iter(per_role.values()))
    for role in card.roles:
        best = sorted((u for u in card.units if u.role == role), key=lambda u: -u.weight_snr)[:n]
        assert _layers_of(plan, role) == sorted(u.layer for u in best)
    assert plan.predicted["candidate"]["matrices"] == "all-linear"


def test_spectrum_plan_restricts_like_any_plan(card):
    plan = make_plan(card, PlanConfig("spectrum", budget="params=0.5x"))
    sub = plan.restricted(plan.layers[:2], card, policy="lora-drop")
    assert sub.config["policy"] == "lora-drop" and sub.layers == plan.layers[:2]
    assert Plan.from_dict(sub.to_dict()) == sub
