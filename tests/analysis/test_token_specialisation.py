import dataclasses

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, synthetic_shards

from moescope.analysis import AnalysisContext
from moescope.analysis.combinations import CombinationCoder
from moescope.analysis.reference import token_specialisation as reference
from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard


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


@pytest.mark.parametrize("n_layers", [1, 3])  # one layer: token -1's (token, layer) code is -1 itself
@pytest.mark.parametrize("spec_name", ["base", "fine_grained"])  # (layer, combination) cells; (layer, expert) cells
def test_negative_token_ids_are_counted_like_any_other(spec_name, n_layers):
    """A token id of -1 (unknown to the capture) is its own token, first in the table: its counts are its own."""
    spec = dataclasses.replace(SPECS[spec_name], n_layers=n_layers)
    shards = synthetic_shards(spec, SHARD_LAYOUTS["uneven"], seed=5)
    shards = [dataclasses.replace(s, token_id=np.where(np.arange(s.token_id.size) % 3 == 0, -1, s.token_id))
              for s in shards]
    ctx = spec.context()
    result = run_one("token_specialisation", shards, ctx)
    ref = reference.compute(shards, ctx)["tokens"]
    assert result.token_ids.tolist() == sorted(ref) and result.token_ids[0] == -1
    for i, token in enumerate(result.token_ids.tolist()):
        assert result.occurrences[i] == ref[token]["occurrences"]
        np.testing.assert_allclose([result.top1_share[i], result.entropy_norm[i]],
                                   [ref[token]["top1_share"], ref[token]["entropy_norm"]], rtol=1e-9)


def test_tokens_without_any_real_expert():
    result = run_one(
        "token_specialisation", [make_shard([[[-1, 2]]])], AnalysisContext(n_experts=2, top_k=2, n_layers=1)
    )
    assert result.occurrences.tolist() == [1] and result.top1_share.tolist() == [0.0]
    assert result.mode_combination.tolist() == [[[-1, -1]]]
    assert result.summary()["distinct_tokens"] == 1


@pytest.mark.parametrize("spec_name", ["base", "fine_grained"])  # (layer, combination) cells; (layer, expert) cells
def test_folding_into_a_dense_table_equals_the_sparse_merge(spec_name):
    """With a token table, a run merges each piece's counts into one dense table in order (`merge_into`): the
    same counts as the pairwise sparse merge, at 6 experts / top-2 (combinations) and 256 / top-8 (experts)."""
    from moescope.analysis import token_specialisation as ts
    from moescope.errors import MoescopeError

    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, [1, 7, 40, 256], seed=13)
    ctx = spec.context()
    if spec_name == "fine_grained":  # any vocabulary: C(264, 8) combinations do not fit a key, experts are counted
        ctx = dataclasses.replace(ctx, vocab_size=None)
    ids = np.unique(np.concatenate([s.token_id for s in shards]))
    table = dataclasses.replace(ctx, token_table=ids[::2].astype(np.int64))  # every other token seen, and some unseen
    assert ts.folds(table) and not ts.folds(ctx)
    states = [ts.accumulate(s, table) for s in shards]
    merged = running = counted = states[0]
    for shard, state in zip(shards[1:], states[1:]):
        merged = ts.merge(merged, state)
        running = ts.merge_into(running, state, table)  # Ray's fold: each piece's state fetched, then merged in
        counted = ts.accumulate_into(counted, shard, table)  # the in-process fold: counted straight into the table
    assert running.dense.shape == counted.dense.shape == (table.token_table.size, ts._dense_cells(table))
    a = ts.finalize(merged, table)
    for b in (ts.finalize(running, table), ts.finalize(counted, table)):
        for x, y in ((a.expert_counts, b.expert_counts), (a.occurrences, b.occurrences), (a.token_ids, b.token_ids)):
            np.testing.assert_array_equal(getattr(x, "keys", x), getattr(y, "keys", y))
            np.testing.assert_array_equal(getattr(x, "counts", x), getattr(y, "counts", y))
        np.testing.assert_array_equal(a.top1_share, b.top1_share)
        if a.mode_combination is not None:
            np.testing.assert_array_equal(a.mode_combination, b.mode_combination)
    with pytest.raises(MoescopeError, match="outside the run's token table"):
        ts.merge_into(running, ts.accumulate(shards[2], ctx), table)  # counts of every token: not the table's


def test_token_counts_take_memory_flat_in_the_number_of_shards(monkeypatch):
    """The counting pass, given a token table: a few shards' counts are already about as large as the whole trace's,
    so a merge tree would hold log2(shards) such tables; a folded run holds one dense table however many come."""
    import tracemalloc

    from moescope.analysis import run_analyses
    from moescope.analysis import token_specialisation as ts

    spec = SyntheticSpec(n_layers=4, n_experts=256, top_k=8, seq_len=(4, 20), vocab_size=200, router_output=None)
    ctx = dataclasses.replace(spec.context(), vocab_size=None)  # (token, layer, expert) cells are counted
    few, many = ([synthetic_shard(spec, 300, seed=5, shard_index=i) for i in range(n)] for n in (4, 64))
    whole = run_analyses(many, ctx, only=["token_specialisation"])["token_specialisation"]  # loads the compiled loops
    table_bytes = whole.expert_counts.keys.nbytes * 2  # the whole trace's counts, as a sparse table
    ctx = dataclasses.replace(ctx, token_table=np.arange(200, dtype=np.int64))
    monkeypatch.setattr(ts, "finalize", lambda state, ctx: state)  # the pass alone (results grow with what was seen)
    peaks = {}
    for n, shards in ((4, few), (64, many)):
        tracemalloc.start()
        try:
            run_analyses(shards, ctx, only=["token_specialisation"])
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[64] < peaks[4] + table_bytes / 4, (peaks, table_bytes)


@pytest.mark.parametrize("spec_name", ["wide", "fine_grained"])
def test_per_token_figures_taken_in_small_chunks_are_the_same_floats(spec_name, monkeypatch):
    """finalize sums each token's figures over chunks of the kept counts cut between tokens (bounded temporaries):
    chunks of a few counts, and chunks shorter than one token's counts, give the one-pass floats exactly."""
    from moescope.analysis import token_specialisation as ts

    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, [1, 7, 40, 256], seed=19)
    ctx = spec.context()
    whole = run_one("token_specialisation", shards, ctx)
    monkeypatch.setattr(ts, "STATS_CHUNK", 5)
    chunked = run_one("token_specialisation", shards, ctx)
    for field in ("top1_share", "entropy_norm", "avg_expert_size", "flops_per_token"):
        if getattr(whole, field) is not None:
            np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field), err_msg=field)
    assert chunked.baseline_top1_share == whole.baseline_top1_share
    assert chunked.baseline_entropy_norm == whole.baseline_entropy_norm


def test_the_token_expert_table_in_pieces_is_the_whole_table(monkeypatch):
    """`analyze` writes token_experts piece by piece (up to 4 M rows on a long trace): the pieces, in order, are the
    rows of (token, layer, expert) counts, with the same columns as the whole table."""
    from moescope.analysis import token_specialisation as ts

    spec = SPECS["fine_grained"]
    result = run_one("token_specialisation", synthetic_shards(spec, [7, 256], seed=23), spec.context())
    whole = result.expert_table()
    monkeypatch.setattr(ts, "TABLE_PIECE_ROWS", 5)
    chunked = result.chunked_tables()["token_experts"]
    pieces = list(chunked.pieces())
    assert chunked.n_rows == len(whole) > 10 and len(pieces) == -(-len(whole) // 5)
    pd.testing.assert_frame_equal(pd.concat(pieces, ignore_index=True), whole)
    L, E = len(result.layers), result.n_experts
    keys = (whole.token_id * L + whole.layer) * E + whole.expert  # layers are 0..L-1 here
    np.testing.assert_array_equal(keys, result.expert_counts.keys)
    np.testing.assert_array_equal(whole["count"], result.expert_counts.counts)


@pytest.mark.parametrize("rows", [0, 1, 7, 256])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_mode_combinations_are_formatted_row_by_row_as_written(rows, k):
    """The token table's '(3,7)' / '(3(2432),7(128))' cells (each distinct row formatted once) against a plain
    per-row format: -1 entries dropped, an empty set '()', repeated rows alike."""
    from moescope.analysis.token_specialisation import _format_combinations

    rng = np.random.default_rng(rows * 10 + k)
    combos = np.sort(rng.integers(-1, 256, (rows, k)), axis=1)
    combos[::3] = combos[0] if rows else combos[::3]  # repeats
    if rows > 1:
        combos[1] = -1
    sizes = rng.integers(1, 5000, 256)
    plain = ["(" + ",".join(str(e) for e in row if e >= 0) + ")" for row in combos.tolist()]
    sized = ["(" + ",".join(f"{e}({sizes[e]})" for e in row if e >= 0) + ")" for row in combos.tolist()]
    assert _format_combinations(combos, None) == plain
    assert _format_combinations(combos, sizes) == sized
