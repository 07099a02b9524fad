import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import AnalysisContext, Thresholds
from moescope.analysis.reference import token_cost as reference


def test_hand_made_costs():
    # E = 2 experts of sizes 100 and 10, k = 1, one layer, hidden 1: an expert costs 2 * 3 * 1 * size FLOPs
    shard = make_shard([[[0], [1], [1], [-1]]], output_entropy=[3.0, 1.0, 1.0, np.nan])
    ctx = AnalysisContext(n_experts=2, top_k=1, n_layers=1, expert_sizes=[100, 10], hidden_size=1)
    result = run_one("token_cost", [shard], ctx)
    h = result.summary()
    assert h["mean_flops_per_token"] == pytest.approx(6 * (100 + 10 + 10 + 0) / 4)  # a dropped slot costs 0
    assert h["p50_flops_per_token"] == 60 and h["max_flops_per_token"] == 600 and h["min_flops_per_token"] == 0
    assert h["dense_equivalent_flops_per_token"] == pytest.approx(6 * 55)  # k * mean expert size
    assert h["fraction_of_dense"] == pytest.approx(30 / 55)
    assert h["large_share"] == pytest.approx(1 / 4)  # threshold: midpoint 55
    assert h["flops_entropy_pearson"] == pytest.approx(1.0)  # entropy 3 for the big expert, 1 for the small
    distribution = result.to_pandas()["distribution"].set_index("size_sum")
    assert distribution.loc[10, "count"] == 2 and distribution.loc[10, "mean_output_entropy"] == 1.0


def test_quantiles_are_numpys_inverted_cdf():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (3, 40, 1))  # 40 tokens: q * n hits exact counts, where the definitions differ
    ctx = AnalysisContext(
        n_experts=4,
        top_k=1,
        n_layers=3,
        expert_sizes=[1, 2, 4, 8],
        hidden_size=1,
        thresholds=Thresholds(large_expert_size=3),
    )
    result = run_one("token_cost", [make_shard(ids, seq_id=np.arange(40) // 5)], ctx)
    per_token = np.array([1, 2, 4, 8])[ids[..., 0]].sum(axis=0) * 6.0
    for q in (10, 25, 50, 75, 90):
        assert result.summary()[f"p{q}_flops_per_token"] == np.quantile(per_token, q / 100, method="inverted_cdf")


def test_without_sizes_the_analysis_is_skipped():
    result = run_one("token_cost", [make_shard([[[0]]])], AnalysisContext(n_experts=2, top_k=1, n_layers=1))
    assert result.notes and result.summary() == {"notes": list(result.notes)}


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=31)
    ctx = spec.context()
    result = run_one("token_cost", shards, ctx)
    ref = reference.compute(shards, ctx)
    assert dict(zip(result.size_values.tolist(), result.size_counts.tolist())) == ref["distribution"]
    summary = result.summary()
    for key in (
        "mean_flops_per_token",
        "std_flops_per_token",
        "p10_flops_per_token",
        "p50_flops_per_token",
        "p90_flops_per_token",
        "fraction_of_dense",
        "large_share",
        "mostly_large_share",
    ):
        assert summary[key] == pytest.approx(ref[key], rel=1e-9), key
    np.testing.assert_allclose(
        result.per_layer["mean_selected_size"].to_numpy()[:-1], ref["mean_selected_size"], rtol=1e-12
    )
    if np.isfinite(ref["flops_entropy_pearson"]):
        assert summary["flops_entropy_pearson"] == pytest.approx(ref["flops_entropy_pearson"], rel=1e-6, abs=1e-9)


def test_flops_per_token_and_mostly_large_each_have_one_name_in_the_summary():
    """token_cost's mean_flops_per_token is every token's; token_specialisation's figure over the tokens it counts
    is named apart (it used to be a second, different mean_flops_per_token in one summary.json)."""
    from moescope.analysis import run_analyses

    spec = SPECS["base"]
    ctx = spec.context()
    results = run_analyses(synthetic_shards(spec, [200, 57]), ctx, only=["token_cost", "token_specialisation"])
    summaries = {name: r.summary() for name, r in results.items()}
    for key in ("mean_flops_per_token", "mostly_large_share"):
        assert [name for name, s in summaries.items() if key in s] == ["token_cost"], key
    assert summaries["token_specialisation"]["mean_flops_per_counted_token"] is not None
