import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import OVERALL, AnalysisContext, Thresholds
from moescope.analysis.reference import domain_specialisation as reference


def _ctx(**kw):
    return AnalysisContext(n_experts=3, top_k=1, n_layers=2, thresholds=Thresholds(min_count=1, **kw))


def test_disjoint_domains_diverge_fully_and_identical_ones_not_at_all():
    # layer 0: code -> expert 0, math -> expert 1 (disjoint); layer 1: both domains split 2 and 1 alike
    ids = [[[0], [0], [1], [1]], [[2], [1], [2], [1]]]
    shard = make_shard(ids, seq_id=[0, 0, 1, 1], domain=[0, 0, 1, 1], domain_names=("code", "math"))
    result = run_one("domain_specialisation", [shard], _ctx())
    jsd = result.divergence.set_index("layer")["js_divergence"]
    assert jsd[0] == pytest.approx(1.0)
    assert jsd[1] == pytest.approx(0.0, abs=1e-12)
    assert jsd[OVERALL] == pytest.approx(0.5)
    top = result.most_specific().iloc[0]
    assert top.layer == 0 and top.lift == pytest.approx(2.0)  # P(domain | expert) = 1 against P(domain) = 0.5
    pair = result.pair_comparison.set_index(["layer", "expert"])
    assert pair.loc[(0, 0), "difference"] == pytest.approx(1.0)  # share_code - share_math


def test_missing_domain_pair_is_a_note():
    shard = make_shard([[[0]], [[1]]], domain_names=("prose",))
    result = run_one("domain_specialisation", [shard], _ctx())
    assert result.pair_comparison.empty and len(result.notes) == 2


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=23)
    ctx = spec.context()
    result = run_one("domain_specialisation", shards, ctx)
    ref = reference.compute(shards, ctx)
    for name, counts in ref["counts"].items():
        np.testing.assert_array_equal(result.counts[result.domain_names.index(name)], counts)
    for (a, b), values in ref["js_divergence"].items():
        got = result.divergence.query("domain_a == @a and domain_b == @b")["js_divergence"].to_numpy()
        np.testing.assert_allclose(got, values, rtol=1e-9, atol=1e-12)


def test_lift_is_p_domain_given_expert_over_p_domain():
    # code: both tokens on expert 0; math: one on expert 0, one on expert 1
    shard = make_shard([[[0], [0], [0], [1]]], seq_id=[0, 0, 1, 1], domain=[0, 0, 1, 1], domain_names=("code", "math"))
    result = run_one(
        "domain_specialisation",
        [shard],
        AnalysisContext(n_experts=2, top_k=1, n_layers=1, thresholds=Thresholds(min_count=1)),
    )
    lift = result.specific.set_index(["expert", "domain"])["lift"]
    assert lift[(0, "code")] == pytest.approx((2 / 3) / 0.5)
    assert lift[(1, "math")] == pytest.approx(1 / 0.5)
    assert result.most_specific().iloc[0][["expert", "domain"]].tolist() == [1, "math"]
