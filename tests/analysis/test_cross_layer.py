import numpy as np
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import AnalysisContext, Thresholds
from moescope.analysis.reference import cross_layer as reference


def _shifted_routing(shift_even: int, shift_odd: int):
    """L=2, E=4, k=1; sequences 0 and 1 each visit every expert; layer 1 = layer 0 + shift (mod 4)."""
    first = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    seq = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    second = np.where(seq == 0, first + shift_even, first + shift_odd) % 4
    predicted = np.stack([second, np.full(8, -1)])[..., None]
    return make_shard(np.stack([first, second])[..., None], seq_id=seq, predicted_next_ids=predicted)


def _recall(result, predictor, hop):
    table = result.recall_overall().set_index(["predictor", "hop"])
    return table.loc[(predictor, hop), "recall"]


def test_deterministic_transition_is_learned_across_the_split():
    shard = _shifted_routing(1, 1)
    ctx = AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=1))
    result = run_one("cross_layer", [shard], ctx)
    assert _recall(result, "same_index", 1) == 0.0
    assert _recall(result, "transition", 1) == 1.0
    assert _recall(result, "router_lookahead", 1) == 1.0
    assert _recall(result, "previous_token", 0) == 0.0  # consecutive tokens never share an expert here
    conditional = result.conditional()[0, 0]  # P(j at 1 | i at 0)
    np.testing.assert_array_equal(conditional, np.roll(np.eye(4), 1, axis=1))


def test_transition_predictor_is_evaluated_on_the_other_half():
    # even sequences shift by 1, odd ones by 2: a table learned in-sample would be perfect,
    # the cross-fitted one (learn on even, test on odd and vice versa) is always wrong
    result = run_one(
        "cross_layer",
        [_shifted_routing(1, 2)],
        AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=1)),
    )
    assert _recall(result, "transition", 1) == 0.0
    predictions = result.prefetch_table().predictions(1)  # [parity, layer, first choice, k]
    assert predictions[0, 0, :, 0].tolist() == [1, 2, 3, 0]
    assert predictions[1, 0, :, 0].tolist() == [2, 3, 0, 1]


def test_hops_beyond_the_last_layer_are_absent():
    shard = _shifted_routing(1, 1)
    result = run_one(
        "cross_layer", [shard], AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=3))
    )
    assert set(result.recall.query("predictor == 'same_index'").hop) == {1}
    assert not result.transitions[1:].any()


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", SPECS)
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=13)
    ctx = spec.context(thresholds=Thresholds(max_hop=2))
    result = run_one("cross_layer", shards, ctx)
    ref = reference.compute(shards, ctx)
    np.testing.assert_array_equal(result.transitions, ref["transitions"])
    got = {(r.predictor, r.hop, r.source_layer): [r.hits, r.targets] for r in result.recall.itertuples() if r.targets}
    assert got == {key: value for key, value in ref["recall"].items() if value[1]}
