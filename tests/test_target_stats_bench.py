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


def test_shortfall_reads_only_placements_under_half_the_depth(stats):
    runs = [(1.0, 0.9, 0.5), (1 / 3, 0.9, 0.7), (1 / 6, 0.8, 0.9), (0.5, 1.0, 0.0)]
    value, n = stats.shortfall_of(runs)
    assert n == 2 and value == pytest.approx((0.2 - 0.1) / 2)  # half the depth is not under half
    assert stats.shortfall_of([(1.0, 0.9, 0.5)]) == (None, 0)
    with pytest.raises(ValueError, match="non-finite"):
        stats.shortfall_of([(0.2, float("nan"), 0.5)])


def test_the_entropy_warning_states_the_committed_shortfalls(stats):
    """The plan's warning quotes the committed table; a re-run that moves it must move the warning too."""
    from layercard.artifacts import read_json
    from layercard.plan import quality as Q

    table = read_json(stats.SHORTFALL)
    assert table["threshold"] == Q.HIGH_TARGET_ENTROPY
    rows = table["tasks"].values()
    warned = [r["shortfall"] for r in rows if r["card_entropy"] >= Q.HIGH_TARGET_ENTROPY]
    quiet = [r["shortfall"] for r in rows if r["card_entropy"] < Q.HIGH_TARGET_ENTROPY]
    assert len(warned) >= 3 and len(quiet) >= 3
    assert (round(min(warned), 2), round(max(warned), 2)) == Q.HIGH_ENTROPY_SHORTFALL
    assert round(max(abs(x) for x in quiet), 2) == Q.LOW_ENTROPY_SHORTFALL
    assert {n for n, r in table["tasks"].items() if r["role"] == "tested"} == set(stats.TESTED_AFTER)
    for r in rows:  # the data-only reading and the card's agree on the side, and so do other seeds
        on_high_side = r["card_entropy"] >= Q.HIGH_TARGET_ENTROPY
        assert (r["entropy"] >= Q.HIGH_TARGET_ENTROPY) == on_high_side
        assert all((v >= 0.05) == on_high_side for v in r["other_seeds"].values())


def test_point_names_cover_no_other_name_and_sit_by_their_own_point(stats):
    """Close points (a pair 0.014 apart, as gsm8k_pose and gsm8k_reverse are) get names that do not overlap,
    each nearer its own point than any other unless a leader line joins them."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [("a_pose", 5.402, 0.218), ("b_reverse", 5.402, 0.232), ("c", 5.49, 0.263), ("d", 5.759, 0.233),
              ("e", 5.965, 0.267), ("f", 3.709, 0.010), ("g", 3.709, 0.006)]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([p[1] for p in points], [p[2] for p in points])
    ax.set_xlim(3, 7)
    stats._name_points(ax, points)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = {t.get_text(): t for t in ax.texts}
    assert sorted(texts) == sorted(p[0] for p in points)
    boxes = {n: t.get_window_extent(r) for n, t in texts.items()}
    names = list(boxes)
    assert not any(boxes[a].overlaps(boxes[b]) for i, a in enumerate(names) for b in names[i + 1 :])
    at = {n: ax.transData.transform((x, y)) for n, x, y in points}

    def gap(box, p):
        return math.hypot(max(box.x0 - p[0], 0, p[0] - box.x1), max(box.y0 - p[1], 0, p[1] - box.y1))

    for n, t in texts.items():
        if t.arrow_patch is None:
            assert all(gap(boxes[n], at[n]) < gap(boxes[n], at[m]) for m in at if m != n), n
    plt.close(fig)
