import numpy as np

from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard, synthetic_trace


def test_shards_are_deterministic_whole_sequences_in_order():
    spec = SyntheticSpec(n_layers=3, n_experts=8, top_k=2, predicted_next_ids=True, invalid_fraction=0.0)
    a = list(synthetic_trace(spec, 500, 120, seed=4))
    b = list(synthetic_trace(spec, 500, 120, seed=4))
    assert [s.n_tokens for s in a] == [120, 120, 120, 120, 20]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
    seq_ids = [set(s.seq_id.tolist()) for s in a]
    assert all(not (p & q) for i, p in enumerate(seq_ids) for q in seq_ids[i + 1 :])  # whole sequences per shard
    for s in a:
        order = np.lexsort((s.pos, s.seq_id))
        np.testing.assert_array_equal(order, np.arange(s.n_tokens))
        assert (s.pos[~s.same_sequence_as_previous()] == 0).all()
        assert s.topk_ids.shape == (3, s.n_tokens, 2) and s.router_output.shape == (3, s.n_tokens, 8)
        top = np.argsort(-s.router_output, axis=2, kind="stable")[..., :2]
        np.testing.assert_array_equal(np.sort(top, axis=2), np.sort(s.topk_ids, axis=2))
        np.testing.assert_allclose(s.topk_weights.sum(axis=2), 1, rtol=1e-6)
        assert (s.predicted_next_ids[-1] == -1).all()


def test_routing_has_the_structure_the_analyses_look_for():
    spec = SyntheticSpec(n_layers=2, n_experts=8, top_k=1, skew=1.5)
    s = synthetic_shard(spec, 4000, seed=0)
    load = np.bincount(s.topk_ids[0, :, 0], minlength=8)
    assert load.max() > 2 * load.min()  # skewed
    assert synthetic_shard(spec, 1, seed=0).n_tokens == 1


def test_invalid_slots_with_output_entropy_count_only_routed_experts():
    """Dropped (-1) and zero-compute (E) slots are not experts: the entropy's large-expert share skips them."""
    spec = SyntheticSpec(n_layers=2, n_experts=6, top_k=2, invalid_fraction=0.3, output_entropy=True,
                         expert_sizes=(10, 10, 10, 1, 1, 1))
    s = synthetic_shard(spec, 300, seed=1)
    assert ((s.topk_ids == -1) | (s.topk_ids == 6)).any() and s.output_entropy.shape == (300,)
    assert np.isfinite(s.output_entropy).mean() > 0.9  # 5 % of positions carry no entropy by design
