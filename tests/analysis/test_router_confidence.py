import math

import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import AnalysisContext, Thresholds
from moescope.analysis.reference import router_confidence as reference


def test_hand_made_weights_probabilities_and_what_if():
    probs = np.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])  # [L=1, T=2, E=3]
    shard = make_shard([[[0, 1], [1, 2]]], weights=[[[0.75, 0.25], [0.25, 0.75]]], router_output=probs)
    ctx = AnalysisContext(
        n_experts=3, top_k=2, n_layers=1, router_output_kind="probs", thresholds=Thresholds(what_if_top_k=(1, 2, 4))
    )
    result = run_one("router_confidence", [shard], ctx)
    assert result.mean("top1_weight")[0] == pytest.approx(0.75)  # weights are sorted per token
    assert result.mean("top2_weight")[0] == pytest.approx(0.25)
    assert result.mean("weight_ratio")[0] == pytest.approx(3.0)
    assert result.mean("margin")[0] == pytest.approx(((0.3 - 0.2) + (0.3 - 0.1)) / 2)
    h = -sum(p * math.log(p) for p in (0.5, 0.3, 0.2)) - sum(p * math.log(p) for p in (0.1, 0.6, 0.3))
    assert result.mean("router_entropy")[0] == pytest.approx(h / 2)
    assert result.topk_match_rate[0] == 1.0  # captured sets are the top-2 of the probabilities
    assert result.what_if_k == (1, 2)  # top-4 does not exist with 3 experts
    assert result.what_if_load[0].tolist() == [[1, 1, 0]]  # top-1 picks expert 0, then expert 1
    assert result.mean("what_if_top2_first_weight")[0] == pytest.approx((0.5 / 0.8 + 0.6 / 0.9) / 2)
    what_if = result.to_pandas()["what_if"]
    assert what_if.loc[(what_if.layer == 0) & (what_if.top_k == 1), "experts_used"].item() == 2


def test_histogram_bins_hold_the_weights():
    shard = make_shard([[[0, 1]] * 4], weights=[[[0.75, 0.25]] * 4])
    ctx = AnalysisContext(n_experts=2, top_k=2, n_layers=1, thresholds=Thresholds(hist_bins=4))
    result = run_one("router_confidence", [shard], ctx)
    top1 = result.histograms["top1_weight"].counts[0]  # underflow, [0,.25), [.25,.5), [.5,.75), [.75,1], overflow
    assert top1.tolist() == [0, 0, 0, 0, 4, 0]
    assert "router_entropy" not in result.histograms and result.notes


def test_mismatch_between_captured_and_router_top_k_is_counted():
    logits = np.array([[[3.0, 2.0, 1.0]]])
    shard = make_shard([[[0, 2]]], router_output=logits)  # e.g. a bias-corrected router picked expert 2
    result = run_one(
        "router_confidence", [shard], AnalysisContext(n_experts=3, top_k=2, n_layers=1, router_output_kind="logits")
    )
    assert result.topk_match_rate[0] == 0.0


def test_a_captured_set_tied_with_the_router_top_k_is_a_match():
    """float16 logits tie exactly: the router may take either tied expert (issue 12, point 12)."""
    logits = np.array([[[2.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 3.0]]])  # [L=1, T=3, E=4]
    shard = make_shard([[[0, 2], [1, 0], [3, 2]]], router_output=logits)
    result = run_one(
        "router_confidence", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=1, router_output_kind="logits")
    )
    assert result.topk_match_rate[0] == 1.0
    shard = make_shard([[[0, 3]]], router_output=logits[:, :1])  # expert 3 is below the tie: not a top-2
    result = run_one(
        "router_confidence", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=1, router_output_kind="logits")
    )
    assert result.topk_match_rate[0] == 0.0


def test_router_outputs_wider_than_the_routed_experts():
    """LongCat/ZAYA: router classes = routed experts + non-compute choices. Confidence is over all classes;
    what-if top-m counts the load of routed experts only."""
    probs = np.array([[[0.5, 0.1, 0.4], [0.2, 0.3, 0.5]]])  # [L=1, T=2, R=3]: experts 0, 1 and a skip class 2
    shard = make_shard([[[0], [2]]], weights=[[[0.5], [0.0]]], router_output=probs)
    ctx = AnalysisContext(n_experts=2, top_k=1, n_layers=1, router_output_kind="probs", non_compute_ids=(2,),
                          non_compute_kinds=("skip",), thresholds=Thresholds(what_if_top_k=(1, 2)))
    result = run_one("router_confidence", [shard], ctx)
    assert result.topk_match_rate[0] == 1.0
    assert result.mean("margin")[0] == pytest.approx(((0.5 - 0.4) + (0.5 - 0.3)) / 2)
    h = -sum(p * math.log(p) for p in (0.5, 0.1, 0.4)) - sum(p * math.log(p) for p in (0.2, 0.3, 0.5))
    assert result.mean("router_entropy")[0] == pytest.approx(h / 2)
    assert result.what_if_load[0].tolist() == [[1, 0]]  # top-1: expert 0, then the skip class (no load)
    assert result.what_if_load[1].tolist() == [[1, 1]]  # top-2: {0, skip}, {skip, 1}
    load = run_one("load", [shard], ctx)
    assert load.counts.tolist() == [[1, 0]] and load.summary()["non_compute_share"] == 0.5


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=7)
    ctx = spec.context()
    result = run_one("router_confidence", shards, ctx)
    ref = reference.compute(shards, ctx)
    for quantity, hist in result.histograms.items():
        expected = np.array(ref["histograms"][quantity])
        if quantity in ("router_entropy", "margin"):  # float32 fast path vs float64 loop: allow an edge case
            assert np.abs(hist.counts - expected).sum() <= 2, quantity
        else:
            np.testing.assert_array_equal(hist.counts, expected, err_msg=quantity)
        np.testing.assert_allclose(result.mean(quantity)[:-1], ref["means"][quantity], rtol=1e-5, err_msg=quantity)
    if spec.router_output is not None:
        for i, m in enumerate(result.what_if_k):
            np.testing.assert_array_equal(result.what_if_load[i], ref["what_if_load"][m])
            np.testing.assert_allclose(
                result.mean(f"what_if_top{m}_first_weight")[:-1], ref["what_if_first_mean"][m], rtol=1e-5
            )
        assert result.topk_match_rate[:-1].tolist() == [m / ref["n_tokens"] for m in ref["topk_matches"]]
    else:
        assert result.what_if_load is None
