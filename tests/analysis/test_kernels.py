import math

import numpy as np
import pytest

from moescope.analysis.kernels import CoMoments, SparseCounts, histogram_moments, js_divergence
from moescope.analysis.rowwise import top_m_by_partition, sort_ascending, sort_descending, top_m


def test_histogram_edges_and_overflow():
    x = np.array([[-0.1, 0.0, 0.49, 0.5, 1.0, 1.01, np.nan, np.inf, -np.inf]])
    assert histogram_moments(x, 0.0, 1.0, 2)[0].tolist() == [[2, 2, 2, 3]]


def _bin(v: float, lo: float, hi: float, bins: int) -> int:
    """Index into [underflow, bins..., overflow] of one value, by comparisons with the edges."""
    if not v <= hi:
        return bins + 1  # above, +inf, NaN
    if v < lo:
        return 0
    if v == hi:
        return bins
    return 1 + min(bins - 1, int((v - lo) / (hi - lo) * bins))


@pytest.mark.parametrize("T", [1, 7, 256])
@pytest.mark.parametrize("finite_only", [True, False])
def test_histogram_moments_match_per_value_sums(T, finite_only):
    rng = np.random.default_rng(T)
    x = (rng.random((3, T)) * 1.4 - 0.2).astype(np.float32)  # [L, T], some outside [0, 1]
    x[0, 0], x[1, -1] = np.nan, np.inf
    x[2, 0] = 1.0
    counts, moments = histogram_moments(x, 0.0, 1.0, 20, finite_only=finite_only)
    for layer in range(3):
        values = [float(v) for v in x[layer]]
        expected = np.zeros(22, np.int64)
        for v in values:
            expected[_bin(v, 0.0, 1.0, 20)] += 1
        assert counts[layer].tolist() == expected.tolist()
        kept = [v for v in values if math.isfinite(v)] if finite_only else values
        mean = sum(kept) / len(kept) if kept else 0.0
        assert moments.n[layer] == len(kept)
        if math.isfinite(mean):
            assert moments.mean_x[layer] == pytest.approx(mean, rel=1e-12)
            assert moments.m2_x[layer] == pytest.approx(sum((v - mean) ** 2 for v in kept), rel=1e-9, abs=1e-12)
        else:
            assert not math.isfinite(moments.mean_x[layer])


def test_histogram_moments_of_a_second_feature_and_float16():
    x = np.array([[0.5, 2.0, 8.0]], np.float16)
    counts, moments = histogram_moments(np.log10(x), 0.0, 1.0, 2, moment_values=x)
    assert counts.tolist() == [[1, 1, 1, 0]]  # log10: -0.30 under, 0.30, 0.90
    assert moments.mean_x[0] == pytest.approx(3.5)
    with pytest.raises(ValueError, match="one \\[L, T\\] shape"):
        histogram_moments(x, 0.0, 1.0, 2, moment_values=x[:, :2])


def test_comoments_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(101) * 1e6 + 1e9, rng.standard_normal(101)
    parts = [CoMoments.of(x[a:b], y[a:b], axis=0) for a, b in ((0, 1), (1, 40), (40, 101))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.pearson() == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)
    assert merged.std_x() == pytest.approx(x.std(), rel=1e-9)


def test_sparse_counts_merge_adds_keys_and_sums():
    rng = np.random.default_rng(1)
    for trial in range(100):  # b's keys mostly new, or mostly shared with a's
        a, b = rng.integers(0, 30, rng.integers(0, 20)), rng.integers(0, 10**9 if trial % 2 else 40, rng.integers(0, 20))
        wa, wb = rng.random((a.size, 2)), rng.random((b.size, 2))
        merged = SparseCounts.from_keys(a, wa).merge(SparseCounts.from_keys(b, wb))
        keys = np.concatenate([a, b])
        weights = np.concatenate([wa, wb])
        np.testing.assert_array_equal(merged.keys, np.unique(keys))
        np.testing.assert_array_equal(merged.counts, [(keys == k).sum() for k in merged.keys])
        np.testing.assert_allclose(merged.sums, [weights[keys == k].sum(axis=0) for k in merged.keys])


def test_js_divergence_bounds():
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert js_divergence(np.array([2, 2]), np.array([1, 1])) == pytest.approx(0.0)


@pytest.mark.parametrize("n_experts", [1, 3, 8, 16, 17, 40])
def test_top_m_breaks_ties_towards_the_lower_index(n_experts):
    rng = np.random.default_rng(n_experts)
    values = rng.integers(0, 3, (n_experts, 9, 11)).astype(np.float32)  # many ties
    expected = np.argsort(-np.moveaxis(values, 0, -1), axis=-1, kind="stable")
    for m in range(1, min(n_experts, 5) + 1):
        for ids, vals in (top_m(values, m), top_m_by_partition(values, m)):
            np.testing.assert_array_equal(np.moveaxis(ids, 0, -1), expected[..., :m])
            np.testing.assert_array_equal(vals, np.take_along_axis(values, ids, axis=0))


def test_sorting_networks():
    rng = np.random.default_rng(2)
    for k in range(1, 9):
        x = rng.integers(0, 5, (k, 13))
        np.testing.assert_array_equal(sort_descending(x), -np.sort(-x, axis=0))
        np.testing.assert_array_equal(sort_ascending(x), np.sort(x, axis=0))

