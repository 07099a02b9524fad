"""Rank correlation against SciPy and pruning orders by hand, at awkward sizes (ties, NaN, 1 and 7 values)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from moescope.intervention.statistics import pruning_order, spearman


@pytest.mark.parametrize("n", [3, 7, 256])
def test_spearman_equals_scipy_with_ties(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 4, n).astype(float)  # many ties
    y = x + rng.normal(0, 1.0, n)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_drops_non_finite_pairs_and_is_nan_when_undefined():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, np.inf])
    y = np.array([2.0, 1.0, 3.0, 4.0, np.nan, 6.0])
    assert spearman(x, y) == pytest.approx(spearmanr([1, 2, 4], [2, 1, 4]).statistic)
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_pruning_order_least_important_first_nan_first_ties_by_id():
    experts = pd.DataFrame({"layer": [0] * 5 + [1] * 3, "expert": [0, 1, 2, 3, 4, 0, 1, 2],
                            "reap": [0.5, np.nan, 0.2, 0.2, 0.9, 3.0, 1.0, 2.0]})
    assert pruning_order(experts, "reap") == {0: [1, 2, 3, 0, 4], 1: [1, 2, 0]}
    random = pruning_order(experts, "random")
    assert sorted(random[0]) == [0, 1, 2, 3, 4] and random == pruning_order(experts, "random")  # fixed seed
