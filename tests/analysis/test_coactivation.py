import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import OVERALL, AnalysisContext
from moescope.analysis.reference import coactivation as reference


def test_hand_made_pairs_rates_and_lift():
    shard = make_shard([[[0, 1], [1, 0], [1, 2]]])
    result = run_one("coactivation", [shard], AnalysisContext(n_experts=3, top_k=2, n_layers=1))
    assert result.counts[0].tolist() == [[2, 2, 0], [2, 3, 1], [0, 1, 1]]  # symmetric, diagonal = load
    pairs = result.pairs().set_index(["layer", "expert_a", "expert_b"])
    assert pairs.loc[(0, 0, 1), "count"] == 2
    assert pairs.loc[(0, 0, 1), "rate"] == pytest.approx(2 / 3)
    assert pairs.loc[(0, 0, 1), "lift"] == pytest.approx((2 / 3) / ((2 / 3) * (3 / 3)))
    assert pairs.loc[(0, 1, 2), "jaccard"] == pytest.approx(1 / 3)
    assert pairs.loc[(OVERALL, 0, 2), "count"] == 0


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=11)
    ctx = spec.context()
    result = run_one("coactivation", shards, ctx)
    np.testing.assert_array_equal(result.counts, reference.compute(shards, ctx)["counts"])
    assert result.summary()  # JSON-ready even when no pair reaches min_count
