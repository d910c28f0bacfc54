"""The test-sampling benchmark's pure part: a fraction of the reference's drop on subsets of examples."""

from __future__ import annotations

import numpy as np
import pytest
from benchscripts import benchmark_script


@pytest.fixture(scope="module")
def sampling():
    with benchmark_script("sampling") as module:
        yield module


def test_subset_fractions_weight_each_example_by_its_target_tokens(sampling):
    tokens = np.array([1.0, 3.0, 2.0])
    base = np.array([2.0, 9.0, 4.0])  # per-example summed losses
    ref = np.array([1.0, 3.0, 2.0])
    run = np.array([1.2, 6.0, 2.0])
    picks = np.array([[0, 1, 2], [0, 1, 0], [2, 1, 0]])
    got = sampling.subset_fractions(base, ref, run, tokens, picks)
    # whole set: losses 15/6, 6/6, 9.2/6 -> (15 - 9.2) / (15 - 6); the order of a subset's picks is irrelevant
    assert got[0] == pytest.approx(5.8 / 9.0) and got[2] == pytest.approx(got[0])
    # examples 0, 1, 0 (5 tokens): base 13/5, ref 5/5, run 8.4/5 -> (13 - 8.4) / (13 - 5), not the mean of
    # the examples' own fractions (0.8, 0.5, 0.8)
    assert got[1] == pytest.approx(4.6 / 8.0)
    assert got[1] != pytest.approx(0.7)
