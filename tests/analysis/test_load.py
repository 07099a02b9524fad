import math

import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import OVERALL, AnalysisContext, Thresholds
from moescope.analysis.reference import load as reference


def test_hand_made_load_statistics():
    # one layer, 4 experts, k = 2: expert 0 takes every token, 1 half of them, 2 and 3 one each
    shard = make_shard([[[0, 1], [0, 1], [0, 2], [0, 3]]])
    result = run_one("load", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=1))
    assert result.counts.tolist() == [[4, 2, 1, 1]]
    stats = {k: v[0] for k, v in result.stats.items()}
    assert stats["mean"] == 2.0
    assert stats["std"] == pytest.approx(math.sqrt(1.5))
    assert stats["max_over_mean"] == 2.0
    assert stats["cv"] == pytest.approx(math.sqrt(1.5) / 2)
    assert stats["balance_score"] == pytest.approx(1 - math.sqrt(1.5) / 2)
    assert stats["load_entropy_norm"] == pytest.approx(0.875)  # H = 1.75 ln 2, normalised by ln 4
    assert result.status.tolist() == [["overloaded", "ok", "ok", "ok"]]
    table = result.to_pandas()["per_expert"]
    assert table["share"].tolist() == [0.5, 0.25, 0.125, 0.125]


def test_dead_and_underused_thresholds_are_configurable():
    shard = make_shard([[[0], [0], [1], [1], [2]]])  # expert 3 never chosen, expert 2 once
    ctx = AnalysisContext(
        n_experts=4, top_k=1, n_layers=1, thresholds=Thresholds(dead_max_count=1, overloaded_factor=1.5)
    )
    result = run_one("load", [shard], ctx)
    assert result.status.tolist() == [["overloaded", "overloaded", "dead", "dead"]]
    summary = result.summary()
    assert summary["dead_experts"] == [[0, 2], [0, 3]]
    assert summary["n_dead"] == 2


def test_invalid_ids_are_not_load():
    shard = make_shard([[[0, -1], [4, 1]]])  # -1 dropped, 4 = zero-compute expert (>= E)
    result = run_one("load", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=1))
    assert result.counts.tolist() == [[1, 1, 0, 0]]
    assert result.invalid_slots.tolist() == [2]
    assert result.notes


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=3)
    ctx = spec.context()
    result = run_one("load", shards, ctx)
    ref = reference.compute(shards, ctx)
    assert result.counts.tolist() == ref["counts"]
    for i, row in enumerate(ref["stats"]):
        for name, value in row.items():
            np.testing.assert_allclose(result.stats[name][i], value, rtol=1e-12, atol=1e-12, err_msg=name)
    per_layer = result.to_pandas()["per_layer"]
    assert per_layer["layer"].iloc[-1] == OVERALL


def test_a_layer_without_real_experts_still_summarises():
    shard = make_shard([[[-1], [-1]]])
    summary = run_one("load", [shard], AnalysisContext(n_experts=2, top_k=1, n_layers=1)).summary()
    assert summary["balance_score_worst_layer"] is None and summary["max_over_mean_worst_layer"] is None
    assert summary["invalid_slots"] == 2


def test_summary_leads_with_the_worst_and_mean_layer_and_keeps_the_pooled_score():
    # layer 0 even, layer 1 on one expert: pooled over layer x expert units the imbalance is averaged away
    even = [[[0, 1], [2, 3], [1, 0], [3, 2]]]
    skewed = [[[0, 1], [0, 1], [0, 2], [0, 3]]]
    shard = make_shard(even + skewed)
    summary = run_one("load", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=2)).summary()
    counts = np.array([[2, 2, 2, 2], [4, 2, 1, 1]], float)  # independent: slots per expert, counted by hand
    per_layer = 1 - counts.std(axis=1) / counts.mean(axis=1)
    assert summary["balance_score_worst"] == pytest.approx(per_layer.min())
    assert summary["balance_score_worst_layer"] == 1
    assert summary["balance_score_layer_mean"] == pytest.approx(per_layer.mean())
    assert summary["balance_score_pooled"] == pytest.approx(1 - counts.std() / counts.mean())
    ratio = counts.max(axis=1) / counts.mean(axis=1)
    assert summary["max_over_mean_worst"] == pytest.approx(ratio.max()) and summary["max_over_mean_worst_layer"] == 1
    keys = list(summary)
    assert keys[:3] == ["balance_score_worst", "balance_score_worst_layer", "balance_score_layer_mean"]
    assert keys.index("balance_score_pooled") > keys.index("max_over_mean_layer_mean")
    assert "balance_score" not in summary  # no unlabelled pooled number
