import dataclasses

import numpy as np
import pytest
from analysis_helpers import DOCUMENT_LAYOUTS, SHARD_LAYOUTS, SPECS, document_in_fold, make_shard, run_one, shards_with_documents, synthetic_shards

from moescope.analysis import AnalysisContext, run_analyses
from moescope.analysis.stack_distance import NO_PRIOR_USE, NOT_AN_EXPERT, lru_ranks
from moescope.analysis.reference import expert_cache as reference
from moescope.analysis.reference.expert_cache import LRUCache


def _simulated_hits(lookups, prefetch, sequence_start, n_experts, capacity):
    """OrderedDict LRU, token by token: bool [N, k] hit of each lookup."""
    hits = np.zeros(lookups.shape, bool)
    cache = None
    for t in range(lookups.shape[0]):
        if sequence_start[t] == t:
            cache = LRUCache(capacity)
        if prefetch is not None:
            cache.insert([e for e in prefetch[t] if e < n_experts])
        hits[t] = [e < n_experts and e in cache.entries for e in lookups[t]]
        cache.insert([e for e in lookups[t] if e < n_experts])
    return hits


def test_kernel_matches_an_lru_simulation():
    rng = np.random.default_rng(0)
    for _ in range(60):
        E = int(rng.integers(2, 70))
        k = int(rng.integers(1, min(E, 4) + 1))
        N = int(rng.integers(1, 30))
        popularity = rng.random(E) ** 3
        lookups = np.stack([rng.choice(E, k, replace=False, p=popularity / popularity.sum()) for _ in range(N)])
        lookups[rng.random(lookups.shape) < 0.05] = E  # slots with no expert
        prefetch = None
        if rng.random() < 0.6:
            kp = int(rng.integers(1, min(E, 4) + 1))
            prefetch = np.stack([rng.choice(E, kp, replace=False) for _ in range(N)])
            prefetch[rng.random(prefetch.shape) < 0.1] = E
            prefetch[:, -1] = prefetch[:, 0]  # a repeated id inside one batch
        starts = np.unique(np.concatenate([[0], rng.integers(0, N, 2)]))
        sequence_start = starts[np.searchsorted(starts, np.arange(N), side="right") - 1]
        rank, _ = lru_ranks(lookups, prefetch, sequence_start == np.arange(N), E)
        assert ((rank == NOT_AN_EXPERT) == (lookups == E)).all()
        smallest = max(k, 0 if prefetch is None else prefetch.shape[1])
        for capacity in range(smallest, E + 1):
            expected = _simulated_hits(lookups, prefetch, sequence_start, E, capacity)
            np.testing.assert_array_equal((rank >= 0) & (rank < capacity), expected)


def test_hand_made_lru_and_same_index_prefetch():
    # one sequence, E = 4, k = 1; layer 0 uses 0,0,1,0 and layer 1 repeats layer 0
    shard = make_shard([[[0], [0], [1], [0]], [[0], [0], [1], [0]]])
    result = run_one("expert_cache", [shard], AnalysisContext(n_experts=4, top_k=1, n_layers=2))
    assert result.predictors == ("lru", "same_index")  # no prefetch table, no lookahead: skipped with notes
    hits = dict(zip(result.predictors, result.hits))  # [L, C] with C = 1..4
    assert hits["lru"][0].tolist() == [1, 2, 2, 2]  # C=1: only the repeat at t=1; C=2: also t=3
    assert hits["same_index"][1].tolist() == [4, 4, 4, 4]  # layer 1 prefetches exactly what it needs
    assert hits["same_index"][0].tolist() == hits["lru"][0].tolist()  # nothing to prefetch from at layer 0
    assert len(result.notes) == 2
    rates = result.to_pandas().query("predictor == 'lru' and layer == -1 and capacity == 1")
    assert rates["hit_rate"].item() == pytest.approx(2 / 8)


def test_rank_reports_first_use_as_no_prior_use():
    rank, _ = lru_ranks(np.array([[2], [2]]), None, np.array([True, False]), 3)
    assert rank[:, 0].tolist() == [NO_PRIOR_USE, 0]


@pytest.mark.parametrize("spec_name, layout", [
    pytest.param(spec, layout, id=f"{spec}-{name}",
                 # the per-token reference simulates all 249 capacities at 256 experts: ~15 s at 256 tokens
                 marks=[pytest.mark.slow] if (spec, name) == ("fine_grained", "256_tokens") else [])
    for spec in SPECS for name, layout in SHARD_LAYOUTS.items()])
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=17)
    ctx = spec.context()
    result = run_analyses(shards, ctx, only=["expert_cache"])["expert_cache"]  # two passes: learns the table
    ref = reference.compute(shards, ctx)
    assert list(result.predictors) == ref["predictors"]
    for p, name in enumerate(result.predictors):
        for l in range(ctx.n_layers):
            assert result.lookups[p, l] == ref["lookups"][(name, l)]
            for c, capacity in enumerate(result.capacities):
                assert result.hits[p, l, c] == ref["hits"][(name, l, int(capacity))], (name, l, capacity)


def test_a_table_from_another_trace_can_feed_the_transition_predictor():
    spec = SPECS["base"]
    learned = run_analyses(synthetic_shards(spec, [40], seed=1), spec.context(), only=["cross_layer"])["cross_layer"]
    ctx = dataclasses.replace(spec.context(), prefetch_table=learned.prefetch_table().pooled())
    shards = iter(synthetic_shards(spec, [20, 20], seed=2))  # one pass only: the table is given
    result = run_analyses(shards, ctx, only=["expert_cache"])["expert_cache"]
    assert "transition" in result.predictors


def test_popularity_prefetches_the_other_folds_popular_experts_at_every_layer():
    # fold-0 document always uses expert 2, fold-1 document expert 3 (k = 1, one layer)
    shard = make_shard([[[2]] * 4 + [[3]] * 4], seq_id=[0] * 4 + [1] * 4,
                       document=[document_in_fold(0)] * 4 + [document_in_fold(1)] * 4)
    result = run_analyses([shard], AnalysisContext(n_experts=4, top_k=1, n_layers=1), only=["expert_cache"])["expert_cache"]
    assert result.predictors == ("lru", "same_index", "transition", "popularity")
    hits = dict(zip(result.predictors, result.hits[:, 0]))  # [C] with C = 1..4
    assert hits["lru"].tolist() == [6, 6, 6, 6]  # every token after the first of its sequence hits
    # each token first prefetches the other fold's favourite: at C = 1 it evicts the token's own expert
    assert hits["popularity"].tolist() == [0, 6, 6, 6]


@pytest.mark.parametrize("documents", DOCUMENT_LAYOUTS)
def test_matches_the_reference_with_documents_of_several_sequences_and_without_documents(documents):
    shards = shards_with_documents(documents, seed=31)
    ctx = SPECS["base"].context()
    result = run_analyses(shards, ctx, only=["expert_cache"])["expert_cache"]
    ref = reference.compute(shards, ctx)
    assert list(result.predictors) == ref["predictors"] and "popularity" in result.predictors
    for p, name in enumerate(result.predictors):
        for l in range(ctx.n_layers):
            assert result.lookups[p, l] == ref["lookups"][(name, l)]
            for c, capacity in enumerate(result.capacities):
                assert result.hits[p, l, c] == ref["hits"][(name, l, int(capacity))], (name, l, capacity)
