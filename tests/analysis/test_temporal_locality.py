import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import AnalysisContext
from moescope.analysis.reference import temporal_locality as reference


def test_hand_made_pairs_and_chance():
    # one sequence of 4 tokens then a sequence of 1: 3 pairs; first choices 0,0,1,1 (column 0 weighs more)
    shard = make_shard([[[0, 2], [0, 1], [1, 2], [1, 3], [1, 0]]], seq_id=[0, 0, 0, 0, 1])
    result = run_one("temporal_locality", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=1))
    assert result.n_pairs == 3
    r = {key: value[0] for key, value in result.rates.items()}
    assert r["same_first"] == pytest.approx(2 / 3)
    assert r["overlap"] == pytest.approx((1 + 1 + 1) / (3 * 2))  # {0}, {1}, {1} shared
    assert r["any_shared"] == 1.0
    # chance: earlier tokens' first choices {0,0,1}, later ones {0,1,1}: (2*1 + 1*2) / 9
    assert r["same_first_chance"] == pytest.approx(4 / 9)


def test_single_tokens_have_no_pairs():
    result = run_one(
        "temporal_locality",
        [make_shard([[[0], [1]]], seq_id=[0, 1])],
        AnalysisContext(n_experts=2, top_k=1, n_layers=1),
    )
    assert result.n_pairs == 0 and result.notes
    assert result.summary()["same_first"] is None


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=19)
    ctx = spec.context()
    result = run_one("temporal_locality", shards, ctx)
    ref = reference.compute(shards, ctx)
    assert result.n_pairs == ref["pairs"]
    for key, values in result.rates.items():
        np.testing.assert_allclose(values, ref[key], rtol=1e-12, err_msg=key)
