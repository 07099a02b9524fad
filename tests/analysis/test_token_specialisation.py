import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import AnalysisContext
from moescope.analysis.combinations import CombinationCoder
from moescope.analysis.reference import token_specialisation as reference


def test_hand_made_token_table():
    # token 5 always uses {0, 1}; token 9 uses {2, 3} twice and {1, 2} once; one layer, E = 4
    ids = [[[0, 1], [1, 0], [2, 3], [3, 2], [1, 2]]]
    shard = make_shard(ids, token_id=[5, 5, 9, 9, 9], output_entropy=[1.0, 3.0, 2.0, np.nan, 2.0])
    ctx = AnalysisContext(
        n_experts=4, top_k=2, n_layers=1, expert_sizes=[100, 100, 10, 10], hidden_size=2, token_text={5: "a", 9: "b"}
    )
    result = run_one("token_specialisation", [shard], ctx)
    table = result.routing_table().set_index("token_id")
    assert table.loc[5, "occurrences"] == 2 and table.loc[5, "token"] == "a"
    assert table.loc[5, "mean_output_entropy"] == pytest.approx(2.0)
    assert table.loc[5, "top1_share"] == pytest.approx(0.5)
    assert table.loc[5, "layer_0"] == "(0(100),1(100))" and table.loc[5, "layer_0_share"] == 1.0
    assert table.loc[9, "layer_0"] == "(2(10),3(10))" and table.loc[9, "layer_0_share"] == pytest.approx(2 / 3)
    assert table.loc[9, "top1_share"] == pytest.approx(3 / 6)  # expert 2 in all three occurrences
    assert table.loc[9, "avg_expert_size"] == pytest.approx((10 * 5 + 100) / 6)
    flops_per_unit = 2 * 3 * 2  # 2 FLOPs per multiply-add, 3 matrices, hidden 2
    assert table.loc[5, "flops_per_token"] == pytest.approx(200 * flops_per_unit)
    assert table.loc[9, "mode_combination_flops"] == pytest.approx(20 * flops_per_unit)
    experts = result.expert_table().query("token_id == 9").set_index("expert")["count"]
    assert experts.to_dict() == {1: 1, 2: 3, 3: 2}


@pytest.mark.parametrize("n_experts,k", [(1, 1), (6, 2), (70, 4), (256, 8)])
def test_combination_codes_round_trip(n_experts, k):
    coder = CombinationCoder.for_context(n_experts, k)
    rng = np.random.default_rng(k)
    ids = np.sort(rng.integers(0, n_experts + 1, (200, k)), axis=1)  # may repeat the sentinel E
    ranks = coder.encode(ids)
    assert (ranks >= 0).all() and (ranks < coder.n_codes).all()
    np.testing.assert_array_equal(coder.decode(ranks), ids)
    distinct = np.unique(ids, axis=0)
    assert np.unique(coder.encode(distinct)).size == distinct.shape[0]


def test_too_many_combinations_are_skipped_with_a_note():
    assert CombinationCoder.for_context(512, 10) is None
    shard = make_shard([[[0, 1] + list(range(2, 10))]])
    result = run_one("token_specialisation", [shard], AnalysisContext(n_experts=512, top_k=10, n_layers=1))
    assert result.mode_combination is None and result.notes
    assert result.top1_share.tolist() == [0.1]


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=29)
    ctx = spec.context()
    result = run_one("token_specialisation", shards, ctx)
    ref = reference.compute(shards, ctx)["tokens"]
    assert result.token_ids.tolist() == sorted(ref)
    for i, token in enumerate(result.token_ids.tolist()):
        r = ref[token]
        assert result.occurrences[i] == r["occurrences"]
        np.testing.assert_allclose(
            [
                result.top1_share[i],
                result.entropy_norm[i],
                result.avg_expert_size[i],
                result.flops_per_token[i],
                result.mode_flops[i],
            ],
            [r["top1_share"], r["entropy_norm"], r["avg_expert_size"], r["flops_per_token"], r["mode_flops"]],
            rtol=1e-9,
        )
        np.testing.assert_allclose(result.mean_output_entropy[i], r["mean_output_entropy"], rtol=1e-6)
        assert result.mode_combination[i].tolist() == [
            sorted(c, key=lambda e: (e < 0, e)) for c in r["mode_combination"]
        ]
        np.testing.assert_allclose(result.mode_share[i], r["mode_share"], rtol=1e-12)


def test_tokens_without_any_real_expert():
    result = run_one(
        "token_specialisation", [make_shard([[[-1, 2]]])], AnalysisContext(n_experts=2, top_k=2, n_layers=1)
    )
    assert result.occurrences.tolist() == [1] and result.top1_share.tolist() == [0.0]
    assert result.mode_combination.tolist() == [[[-1, -1]]]
    assert result.summary()["distinct_tokens"] == 1
