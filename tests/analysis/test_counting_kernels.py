"""The counting kernels (kernels.expert_counts, kernels.pair_counts) and the LRU engine (stack_distance.py)
against plain per-event references that share no code with them, at 1, 7 and 256 tokens and at 256 experts,
top-8; and the runner's pieces of a shard."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from analysis_helpers import SPECS, run_one, synthetic_shards

from moescope.analysis import run_analyses
from moescope.analysis import runner
from moescope.analysis.cross_layer import top_indices
from moescope.analysis.kernels import expert_counts, pair_counts, symmetrised
from moescope.analysis.stack_distance import NO_PRIOR_USE, NOT_AN_EXPERT, hits_from_ranks, lru_ranks, rank_counts

SIZES = [1, 7, 256]
SHAPES = [(6, 2), (256, 8)]  # (experts, top-k): Mixtral-like and DeepSeek-V3-like


def _ids(rng, T, E, k, L=None, invalid=0.1):
    """int [L, T, k] (or [T, k]) distinct ids per row, some replaced by -1 or ids >= E (no expert)."""
    shape = (T,) if L is None else (L, T)
    ids = np.argsort(rng.random(shape + (E,)), axis=-1)[..., :k]
    noise = rng.random(ids.shape)
    ids = np.where(noise < invalid / 2, -1, np.where(noise < invalid, E + 1, ids))
    return ids.astype(np.int16)


def reference_ranks(lookups, prefetch, new_sequence, E):
    """Per-event LRU recency list: rank = index in the list (0 = most recent) before the batch is applied."""
    stack: list[int] = []
    out = np.zeros(lookups.shape, np.int64)
    out_pre = None if prefetch is None else np.zeros(prefetch.shape, np.int64)

    def batch(row, ranks):
        seen = []
        for c, e in enumerate(int(x) for x in row):
            if not 0 <= e < E or e in seen:
                ranks[c] = NOT_AN_EXPERT
                continue
            seen.append(e)
            ranks[c] = stack.index(e) if e in stack else NO_PRIOR_USE
        for e in reversed(seen):  # the first column ends up most recent
            if e in stack:
                stack.remove(e)
            stack.insert(0, e)

    for t in range(lookups.shape[0]):
        if new_sequence[t]:
            stack.clear()
        if prefetch is not None:
            batch(prefetch[t], out_pre[t])
        batch(lookups[t], out[t])
    return out, out_pre


@pytest.mark.parametrize("method", ["packed", "scan", "tree"])
@pytest.mark.parametrize("E, k", [*SHAPES, (16, 4)])  # 16 experts: every 4-bit entry of the packed word in use
@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("with_prefetch", [False, True])
def test_lru_ranks_equal_a_recency_list(T, E, k, with_prefetch, method):
    if method == "packed" and E > 16:
        with pytest.raises(ValueError, match="at most 16 experts"):
            lru_ranks(np.zeros((T, k), np.int16), None, np.ones(T, bool), E, method=method)
        return
    rng = np.random.default_rng(T * 1000 + E + with_prefetch)
    lookups = _ids(rng, T, E, k)
    prefetch = _ids(rng, T, E, k + 1) if with_prefetch else None
    if prefetch is not None and T > 1:
        prefetch[1:, 0] = lookups[:-1, 0]  # a repeat of the last token's expert: found and refreshed
    new_sequence = rng.random(T) < 0.1
    new_sequence[0] = True
    ranks, pre = lru_ranks(lookups, prefetch, new_sequence, E, prefetch_ranks=True, method=method)
    ref, ref_pre = reference_ranks(lookups, prefetch, new_sequence, E)
    np.testing.assert_array_equal(ranks, ref)
    if with_prefetch:
        np.testing.assert_array_equal(pre, ref_pre)


@pytest.mark.parametrize("method", ["scan", "tree"])
def test_lru_ranks_of_a_sequence_longer_than_the_scans_stamps_last(method):
    """The scan's int16 stamps are renumbered every ~2,000 tokens at top-8 with a prefetch batch: one sequence of
    4,500 tokens (and a second one starting after a renumbering) crosses that twice, at 256 experts."""
    rng = np.random.default_rng(45)
    T, E, k = 4500, 256, 8
    weights = 1.0 / np.arange(1, E + 1) ** 0.7  # skewed: old entries stay cached and get ranked
    lookups = np.stack([rng.choice(E, k, replace=False, p=weights / weights.sum()) for _ in range(T)]).astype(np.int16)
    prefetch = np.roll(lookups, 1, axis=0)  # the previous token's experts
    new_sequence = np.zeros(T, bool)
    new_sequence[[0, 2100]] = True
    ranks, pre = lru_ranks(lookups, prefetch, new_sequence, E, prefetch_ranks=True, method=method)
    ref, ref_pre = reference_ranks(lookups, prefetch, new_sequence, E)
    np.testing.assert_array_equal(ranks, ref)
    np.testing.assert_array_equal(pre, ref_pre)
    if method == "scan":
        with pytest.raises(ValueError, match="'scan' holds at most 16384 experts"):
            lru_ranks(lookups, None, new_sequence, 16385, method="scan")


@pytest.mark.parametrize("capacity", [8, 9, 40, 256])
def test_hits_from_ranks_equal_an_lru_cache_of_that_capacity(capacity):
    """An explicit cache of `capacity` entries, evicting the least recently used: the same hits as rank < C."""
    rng = np.random.default_rng(capacity)
    E, k, T = 256, 8, 256
    weights = 1.0 / np.arange(1, E + 1)  # skewed: a cache has something to find
    lookups = np.stack([rng.choice(E, k, replace=False, p=weights / weights.sum()) for _ in range(T)])
    new_sequence = np.zeros(T, bool)
    new_sequence[[0, 100]] = True
    cache: list[int] = []  # most recent first
    expected = np.zeros((T, k), bool)
    for t in range(T):
        if new_sequence[t]:
            cache.clear()
        expected[t] = [e in cache for e in lookups[t]]
        for e in reversed(lookups[t].tolist()):
            if e in cache:
                cache.remove(e)
            cache.insert(0, e)
        del cache[capacity:]
    ranks, _ = lru_ranks(lookups, None, new_sequence, E)
    np.testing.assert_array_equal(hits_from_ranks(ranks, capacity), expected)
    assert 0 < expected.mean() < 1


@pytest.mark.parametrize("E, k", [(256, 8), (16, 4), (8, 2)])  # the scan; the packed word, full and half used
def test_rank_counts_are_per_stream_histograms(E, k):
    rng = np.random.default_rng(3)
    S, T = 3, 7
    lookups = _ids(rng, T, E, k, L=S)
    new_sequence = np.array([1, 0, 0, 1, 0, 0, 0], bool)
    counts = rank_counts(lookups, None, new_sequence, E)
    for s in range(S):
        ref, _ = reference_ranks(lookups[s], None, new_sequence, E)
        expect = np.zeros(E + 1, np.int64)
        for r in ref.ravel():
            if r >= 0:
                expect[r] += 1
            elif r == NO_PRIOR_USE:
                expect[E] += 1
        np.testing.assert_array_equal(counts[s], expect)


@pytest.mark.parametrize("E, k", SHAPES)
@pytest.mark.parametrize("T", SIZES)
def test_expert_counts_equal_a_loop(T, E, k):
    rng = np.random.default_rng(T + E)
    L, G = 3, 4
    ids = _ids(rng, T, E, k, L=L)
    group = rng.integers(0, G, T)
    weights = rng.random(ids.shape)
    counts = np.zeros((G, L, E + 1), np.int64)
    sums = np.zeros((G, L, E + 1))
    for l in range(L):
        for t in range(T):
            for c in range(k):
                e = int(ids[l, t, c])
                e = e if 0 <= e < E else E
                counts[group[t], l, e] += 1
                sums[group[t], l, e] += weights[l, t, c]
    np.testing.assert_array_equal(expert_counts(ids, E), counts.sum(0)[:, :E])
    np.testing.assert_array_equal(expert_counts(ids, E, keep_invalid=True), counts.sum(0))
    np.testing.assert_array_equal(expert_counts(ids, E, group=group, n_groups=G), counts[..., :E])
    np.testing.assert_allclose(expert_counts(ids, E, weights=weights), sums.sum(0)[:, :E], rtol=1e-12)
    with pytest.raises(ValueError, match="group must be"):
        expert_counts(ids, E, group=group + G, n_groups=G)


@pytest.mark.parametrize("E, k", SHAPES)
@pytest.mark.parametrize("T", SIZES)
def test_pair_counts_equal_a_loop(T, E, k):
    rng = np.random.default_rng(T * 7 + E)
    L = 3
    a, b = _ids(rng, T, E, k, L=L), _ids(rng, T, E, k - 1 or 1, L=L)
    group = rng.integers(0, 2, T)
    expect = np.zeros((2, L, E, E), np.int64)
    for l in range(L):
        for t in range(T):
            for i in a[l, t]:
                for j in b[l, t]:
                    if 0 <= i < E and 0 <= j < E:
                        expect[group[t], l, i, j] += 1
    np.testing.assert_array_equal(pair_counts(a, b, E), expect.sum(0))
    np.testing.assert_array_equal(pair_counts(a, b, E, group=group, n_groups=2), expect)
    running = pair_counts(a, b, E)
    np.testing.assert_array_equal(pair_counts(a, b, E, out=running), 2 * expect.sum(0))  # adds into out
    together = np.zeros((L, E, E), np.int64)  # the co-activation table of a's ids with themselves
    for l in range(L):
        for t in range(T):
            for i in a[l, t]:
                for j in a[l, t]:
                    if 0 <= i < E and 0 <= j < E:
                        together[l, i, j] += 1
    np.testing.assert_array_equal(symmetrised(pair_counts(a, a, E, triangle=True)), together)
    with pytest.raises(ValueError, match="same array"):
        pair_counts(a, a.copy(), E, triangle=True)


def test_pair_counts_hold_cells_past_the_scratch_tables_range():
    """The kernel counts in uint16 tables added into `out` every few thousand tokens: cells far past 65,535,
    even for rows that repeat an id (a cell then gains k * k per token), come out exact."""
    same = np.zeros((1, 200_000, 1), np.intp)  # one pair, 200,000 times
    np.testing.assert_array_equal(pair_counts(same, same, 2), [[[200_000, 0], [0, 0]]])
    repeated = np.full((1, 10_000, 4), 1, np.intp)  # 4 x 4 increments of cell (1, 1) per token
    counts = pair_counts(repeated, repeated, 3, out=np.zeros((1, 3, 3), np.int32))
    assert counts[0, 1, 1] == 160_000 and counts.sum() == 160_000


@pytest.mark.parametrize("E", [17, 256, 384])
@pytest.mark.parametrize("N", [1, 7, 256])
def test_top_indices_equal_a_stable_sort(N, E):
    """cross_layer.top_indices (a compiled pass for integer tables) against a stable argsort of the negated
    values: descending, ties to the lower index, with many ties (few distinct values) and without."""
    rng = np.random.default_rng(N * 31 + E)
    for high, dtype in ((3, np.int32), (10**12, np.int64)):
        values = rng.integers(0, high, (N, E)).astype(dtype)
        for k in (1, 8, 16):
            expect = np.argsort(-values, axis=-1, kind="stable")[:, :k]
            np.testing.assert_array_equal(top_indices(values, k), expect)
            np.testing.assert_array_equal(top_indices(values.reshape(N, 1, E), k), expect[:, None])


def test_pair_counts_refuse_out_of_range_groups_and_wrong_out():
    a = np.zeros((1, 2, 1), np.intp)
    with pytest.raises(ValueError):
        pair_counts(a, a, 4, group=np.array([0, 2]), n_groups=2)
    with pytest.raises(ValueError):
        pair_counts(a, a, 4, out=np.zeros((1, 3, 3), np.int64))


@pytest.mark.parametrize("max_rows", [1, 9, 40])
def test_pieces_cut_between_sequences_and_cover_the_shard(max_rows):
    spec = SPECS["base"]
    shard = synthetic_shards(spec, [60], seed=5)[0]
    parts = list(runner.pieces(shard, max_rows))
    assert sum(p.n_tokens for p in parts) == shard.n_tokens
    np.testing.assert_array_equal(np.concatenate([p.topk_ids for p in parts], axis=1), shard.topk_ids)
    np.testing.assert_array_equal(np.concatenate([p.seq_id for p in parts]), shard.seq_id)
    for p in parts:
        assert not p.same_sequence_as_previous()[0]  # each piece starts a sequence
        whole_sequence = np.unique(p.seq_id).size == 1
        assert p.n_tokens * p.n_layers <= max_rows or whole_sequence


@pytest.mark.parametrize("spec_name", ["base", "fine_grained"])
def test_analysing_shards_in_small_pieces_changes_nothing(spec_name, monkeypatch):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, [90, 40], seed=11)
    ctx = spec.context()
    whole = run_analyses(shards, ctx)
    monkeypatch.setattr(runner, "PIECE_ROWS", 4 * spec.n_layers)
    assert len(list(runner.pieces(shards[0]))) > 5
    cut = run_analyses(shards, ctx)
    for name in whole:
        a, b = whole[name].summary(), cut[name].summary()
        assert _close(a, b), name


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[x], b[x]) for x in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_token_table_keeps_exact_counts_for_the_most_frequent_tokens():
    spec = dataclasses.replace(SPECS["k3_invalid_no_router"], vocab_size=40)
    shards = synthetic_shards(spec, [200, 57], seed=2)
    ctx = spec.context()
    full = run_analyses(shards, ctx, only=["token_specialisation"])["token_specialisation"]
    per_token = ctx.n_layers * ctx.n_experts
    small = dataclasses.replace(ctx, thresholds=dataclasses.replace(ctx.thresholds, token_table_cells=10 * per_token))
    cut = run_analyses(shards, small, only=["token_specialisation"])["token_specialisation"]
    np.testing.assert_array_equal(cut.token_ids, full.token_ids)
    np.testing.assert_array_equal(cut.occurrences, full.occurrences)  # exact for every token
    kept = np.isfinite(cut.top1_share)
    assert kept.sum() == 10
    # the kept tokens are the most frequent (ties to the lower id) and their figures are the full run's
    order = np.lexsort((full.token_ids, -full.occurrences))[:10]
    np.testing.assert_array_equal(np.sort(full.token_ids[order]), cut.token_ids[kept])
    np.testing.assert_allclose(cut.top1_share[kept], full.top1_share[kept])
    np.testing.assert_allclose(cut.entropy_norm[kept], full.entropy_norm[kept])
    assert np.isnan(cut.entropy_norm[~kept]).all()
    summary = cut.summary()
    assert summary["tokens_without_expert_counts"] == full.token_ids.size - 10
    assert any("most frequent" in note for note in summary["notes"])
    assert full.summary()["tokens_without_expert_counts"] == 0


@pytest.mark.parametrize("n_blocks", [1, 7, 256])
def test_placement_blocks_rebinned_equal_a_loop(n_blocks):
    """placement._rebin (equal blocks summed by one sort and reduceat) against a per-block loop, with blocks in
    any order (a merge concatenates two states' blocks)."""
    from moescope.analysis.placement import PlacementState, _rebin

    rng = np.random.default_rng(n_blocks)
    block = rng.permutation(3 * n_blocks)[:n_blocks]
    state = PlacementState((0, 1), 2, block, rng.integers(1, 50, n_blocks), rng.integers(0, 9, (n_blocks, 2, 256)))
    rebinned = _rebin(state, 8)
    expect = {}
    for b, tokens, loads in zip(block // 4, state.tokens, state.loads):
        t, l = expect.get(b, (0, 0))
        expect[b] = (t + tokens, l + loads)
    assert rebinned.span == 8 and rebinned.block.tolist() == sorted(expect)
    np.testing.assert_array_equal(rebinned.tokens, [expect[b][0] for b in sorted(expect)])
    np.testing.assert_array_equal(rebinned.loads, np.stack([expect[b][1] for b in sorted(expect)]))
    assert rebinned.loads.dtype == np.int64


def test_placement_folded_piece_by_piece_equals_the_merges(monkeypatch):
    """A run folds placement states piece by piece into spare rows (placement.merge_into): over 200+ short
    sequences, pieces of a few tokens, block spans that double several times and blocks shared by neighbouring
    pieces, the state and the results are the pairwise merges'; out-of-order states fall back to the merge."""
    from moescope.analysis import placement

    spec = dataclasses.replace(SPECS["base"], seq_len=(1, 6))
    shards = synthetic_shards(spec, [300, 7, 1, 256, 190], seed=17)
    ctx = spec.context()
    monkeypatch.setattr(runner, "PIECE_ROWS", 9 * spec.n_layers)  # pieces of at most 9 tokens
    states = [placement.accumulate(piece, ctx) for shard in shards for piece in runner.pieces(shard)]
    assert len(states) > 60
    merged = folded = states[0]
    in_place = 0
    for state in states[1:]:
        merged = placement.merge(merged, state)
        folded = placement.merge_into(folded, state, ctx)
        in_place += folded.room is not None  # not rebinned (the span doubled) by this merge
    assert folded.span == merged.span >= 4 and in_place > len(states) / 2
    for field in ("block", "tokens", "loads"):
        np.testing.assert_array_equal(getattr(folded, field), getattr(merged, field), err_msg=field)
    whole = run_analyses(shards, ctx, only=["placement"])["placement"]
    reference = run_one("placement", shards, ctx)
    assert json.dumps(whole.summary()) == json.dumps(reference.summary())
    late, early = states[-1], states[0]
    np.testing.assert_array_equal(placement.merge_into(late, early, ctx).loads, placement.merge(late, early).loads)
