"""The target statistics of the benchmark tasks: entropy and length of what carries loss."""

from __future__ import annotations

import pytest
from benchscripts import benchmark_script

from layercard.tasks import plug_in_entropy


@pytest.fixture(scope="module")
def stats():
    with benchmark_script("target_stats") as module:
        yield module


def test_target_statistics_read_only_loss_carrying_tokens_and_a_fixed_sample(stats):
    from layercard.tasks.encode import Encoded

    ignored = -100
    enc = [
        Encoded(input_ids=(5, 6, 1, 2), labels=(ignored, ignored, 1, 2), prompt_len=2),
        Encoded(input_ids=(5, 3, 3, 3, 3), labels=(ignored, 3, 3, 3, 3), prompt_len=1),
    ]
    out = stats.target_statistics(enc, sample=4)
    assert out["tokens_per_example"] == pytest.approx(3.0)  # 2 and 4 target tokens; prompts never count
    assert out["entropy_tokens"] == 4
    assert out["entropy"] == pytest.approx(plug_in_entropy([1, 2, 3, 3]))  # the first 4 in order
    assert stats.target_statistics(enc, sample=100)["entropy_tokens"] == 6


def test_target_coverage_forms_penalise_left_out_depth_more_on_longer_targets():
    with benchmark_script("quality") as quality:
        from layercard.plan.quality import Features

        f = Features(params=0.25, capacity=0.4, coverage=1 / 3, capacities=(0.3, 0.35, 0.4, 0.5))
        full = Features(params=0.25, capacity=0.4, coverage=1.0, capacities=(0.3, 0.35, 0.4, 0.5))
        short = quality.target_scales({"entropy": 1.0, "tokens_per_example": 2.0})
        long = quality.target_scales({"entropy": 5.0, "tokens_per_example": 100.0})
        assert long == {"H": 5.0, "T/100": 1.0}
        for key in quality.TARGET_KEYS:
            for fn, grid in quality._scaled_coverage_forms(key).values():
                p = tuple(g[len(g) // 2] for g in grid)
                at = [fn(quality._WithScale(x, s), p) for x in (f, full) for s in (short, long)]
                assert at[1] < at[0] <= 1.0
                assert at[2] == pytest.approx(at[3])  # over every depth band: no penalty, whatever the task
