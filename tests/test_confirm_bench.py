"""The quality-confirmation benchmark's pure part: the expected error set against the measured one."""

from __future__ import annotations

import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def confirm():
    with benchmark_script("quality_confirm") as module:
        yield module


def _row(coverage: float, measured: float, predicted: float, expected: float) -> dict:
    return {"coverage": coverage, "measured": measured, "predicted": predicted, "expected_error": expected}


def test_band_check_groups_by_coverage_and_scores_the_band_against_one_error(confirm):
    rows = [
        _row(1 / 6, 0.70, 0.90, 0.15),  # off by 0.20: outside its band
        _row(1 / 3, 0.85, 0.90, 0.13),  # off by 0.05: inside
        _row(2 / 3, 0.95, 0.96, 0.08),
        _row(1.0, 0.99, 0.99, 0.04),
        _row(1.0, 1.05, 0.99, 0.04),  # off by 0.06: outside
    ]
    out = confirm.band_check(rows, one_error=0.07)
    low, mid, full = (out[name] for name, _, _ in confirm.BAND_GROUPS)
    assert (low["placements"], mid["placements"], full["placements"]) == (2, 1, 2)
    assert low["measured"] == pytest.approx(0.125) and low["expected"] == pytest.approx(0.14)
    assert low["within"] == pytest.approx(0.5) and full["within"] == pytest.approx(0.5)
    assert mid["within"] == 1.0
    errs, expected = [0.20, 0.05, 0.01, 0.0, 0.06], [0.15, 0.13, 0.08, 0.04, 0.04]
    gaps = [abs(e - x) for e, x in zip(errs, expected, strict=True)]
    assert out["all"]["gap"] == pytest.approx(sum(gaps) / 5)
    assert out["all"]["gap_one"] == pytest.approx(sum(abs(e - 0.07) for e in errs) / 5)
    assert confirm.band_check([], one_error=0.07)["all"] == {"placements": 0}


def test_noise_coverage_forms_penalise_left_out_depth_more_on_noisier_tasks(confirm):
    import importlib

    from layercard.plan.quality import FORMS, Features

    quality = importlib.import_module("quality")  # beside quality_confirm, on the fixture's path
    forms = quality._noise_coverage_forms()

    def with_noise(f, b):
        return quality._WithScale(f, {quality.NOISE_KEY: b})

    f = Features(params=0.25, capacity=0.4, coverage=1 / 3, capacities=(0.3, 0.35, 0.4, 0.5))
    full = Features(params=0.25, capacity=0.4, coverage=1.0, capacities=(0.3, 0.35, 0.4, 0.5))
    cap_cov, share_cov, cov_only = (forms[n][0] for n in confirm.NOISE_COVERAGE_FORMS.values())
    # β·B_noise/B = β·1: the default's capacity × coverage form with the same exponent
    card_only = FORMS["capacity_coverage"].fn(f, (2.0, 0.1, 0.3))
    assert cap_cov(with_noise(f, 1.0), (2.0, 0.1, 0.3)) == pytest.approx(card_only)
    for fn, p in ((cap_cov, (2.0, 0.1, 0.3)), (share_cov, (0.1, 0.3)), (cov_only, (0.3,))):
        quiet, noisy = fn(with_noise(f, 0.2), p), fn(with_noise(f, 5.0), p)
        assert noisy < quiet < 1.0
        # a placement over every depth band pays no coverage penalty, however noisy the task
        assert fn(with_noise(full, 5.0), p) == pytest.approx(fn(with_noise(full, 0.2), p))
    assert cov_only(with_noise(f, 2.0), (0.5,)) == pytest.approx((1 / 3) ** 1.0)


def test_coupling_coverage_is_how_much_of_every_layers_effect_the_adapted_layers_reach(confirm):
    import importlib

    import numpy as np

    quality = importlib.import_module("quality")
    cov = quality.coupling_coverage
    c = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, -0.3], [0.1, -0.3, 1.0]])
    assert cov(c, [0, 1, 2]) == pytest.approx(1.0)
    assert cov(c, []) == 0.0
    # layer 0 alone reaches layer 1 at 0.8 and layer 2 at 0.1; a cosine's sign does not matter
    assert cov(c, [0]) == pytest.approx((1.0 + 0.8 + 0.1) / 3)
    assert cov(c, [1]) == pytest.approx((0.8 + 1.0 + 0.3) / 3)
    # weights: only the layers that carry capacity count
    assert cov(c, [0], [0.0, 1.0, 1.0]) == pytest.approx((0.8 + 0.1) / 2)
    assert cov(c, [0, 2]) > cov(c, [0, 1])  # layer 2 acts unlike the other two: covering it counts more
    with pytest.raises(ValueError, match="weights"):
        cov(c, [0], [1.0, -1.0, 1.0])
    # more alike layers: the same placement reaches more of the effect and so is penalised less
    alike = np.full((3, 3), 0.9) + 0.1 * np.eye(3)
    forms = quality._coupling_coverage_forms()
    from layercard.plan.quality import Features

    f = Features(params=0.3, capacity=0.4, coverage=1 / 3, capacities=(0.3, 0.35, 0.4, 0.5))
    low, high = (
        quality._WithCoupling(f, cov(c, [0]), cov(c, [0])),
        quality._WithCoupling(f, cov(alike, [0]), 0.0),
    )
    fn = forms["share × k^β"][0]
    assert fn(low, (0.1, 0.5)) < fn(high, (0.1, 0.5)) < 1.0
    assert fn(high, (0.1, 0.5)) == pytest.approx(0.3**0.1 * (cov(alike, [0]) ** 0.5))
    assert forms["k_w^β"][0](high, (0.5,)) == 0.0  # k_w = 0 reaches nothing


def test_pair_check_scores_each_predicted_difference_against_the_larger_expected_error(confirm):
    rows = [
        _row(1.0, 0.95, 0.99, 0.04),
        _row(1.0, 0.90, 0.98, 0.04),  # against the first: predicted +0.01, measured +0.05: off by 0.04
        _row(1 / 3, 0.80, 0.90, 0.13),
    ]
    out = confirm.pair_check(rows)
    same, near, far = (out[name] for name, _, _ in confirm.PAIR_GROUPS)
    assert (same["pairs"], near["pairs"], far["pairs"], out["all"]["pairs"]) == (1, 0, 2, 3)
    assert same["error"] == pytest.approx(0.04) and same["threshold"] == pytest.approx(0.04)
    assert same["within"] == 1.0  # an error at the threshold is within it
    # first vs third: predicted 0.09, measured 0.15 -> 0.06; second vs third: 0.08 vs 0.10 -> 0.02
    assert far["error"] == pytest.approx(0.04) and far["threshold"] == pytest.approx(0.13)
    assert near == {"pairs": 0}
    pooled = confirm._pooled([out, confirm.pair_check(rows[:2])])
    assert pooled["the same"]["pairs"] == 2 and pooled["all"]["pairs"] == 4
    assert pooled["all"]["error"] == pytest.approx((0.04 + 0.06 + 0.02 + 0.04) / 4)


def test_seed_fractions_read_each_run_against_its_own_seeds_reference(confirm):
    import importlib

    quality = importlib.import_module("quality")
    losses = {("ref", 0): 1.0, ("ref", 1): 1.5, ("a", 0): 1.5, ("a", 1): 1.75, ("a", 2): 1.2, ("b", 1): 2.0}
    want = {"a": {0: 0.75, 1: 1.25 / 1.5}, "b": {1: 1 / 1.5}}
    got = quality.seed_fractions(3.0, losses)
    # base 3: the reference drops 2.0 at seed 0 and 1.5 at seed 1; seed 2 has no reference, so no fraction
    assert got == {k: {sd: pytest.approx(v) for sd, v in by.items()} for k, by in want.items()}
    assert "ref" not in got
    # against the mean of the reference's drops, (2.0 + 1.5) / 2, every seed gets a fraction
    mean = quality.seed_fractions(3.0, losses, "mean")
    want = {0: 1.5 / 1.75, 1: 1.25 / 1.75, 2: 1.8 / 1.75}
    assert mean["a"] == {sd: pytest.approx(v) for sd, v in want.items()}
    with pytest.raises(ValueError, match="reference"):
        quality.seed_fractions(3.0, losses, "median")


def test_decide_rule_takes_the_least_regret_among_forms_near_the_least_error(confirm):
    import importlib

    quality = importlib.import_module("quality")
    slack = quality.DECIDE_MAE_SLACK
    mae = {"a": 0.060, "b": 0.060 + slack / 2, "c": 0.060 + 2 * slack}
    eligible, chosen = quality.decide_rule(mae, {"a": 0.04, "b": 0.02, "c": 0.001})
    assert eligible == ["a", "b"] and chosen == "b"  # c has the least regret but is too far off in error
    assert quality.decide_rule(mae, {"a": 0.02, "b": 0.02, "c": 0.0})[1] == "a"  # a tie goes to the first


def test_gain_calls_leave_out_the_tasks_the_model_was_fitted_on(confirm):
    import importlib

    from layercard.artifacts import read_json
    from layercard.plan.quality import TWO_TASK_MODEL

    placement_v2 = importlib.import_module("placement_v2")
    tight = read_json(placement_v2.RESULTS / "tight" / "tight.json")
    trained = {task for cells in tight["budgets"].values() for task in cells}
    assert "e2e_nlg" in trained and "e2e_nlg" in confirm.FITTED_ON  # the committed runs hold a fitted task
    called = {c["task"] for c in confirm.gain_calls(TWO_TASK_MODEL)}
    assert called == trained - set(confirm.FITTED_ON)
