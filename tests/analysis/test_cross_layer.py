import dataclasses

import numpy as np
import pytest
from analysis_helpers import DOCUMENT_LAYOUTS, SHARD_LAYOUTS, SPECS, document_in_fold, make_shard, run_one, shards_with_documents, synthetic_shards

from moescope.analysis import AnalysisContext, Thresholds, run_analyses
from moescope.analysis.reference import cross_layer as reference
from moescope.analysis.synthetic import SyntheticSpec, synthetic_trace, write_synthetic_trace
from moescope.trace.reader import open_trace
from moescope.trace.shard import document_key


def _shifted_routing(shift_a: int, shift_b: int):
    """L=2, E=4, k=1; sequences 0 and 1 (documents in folds 0 and 1) each visit every expert;
    layer 1 = layer 0 + shift (mod 4)."""
    first = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    seq = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    second = np.where(seq == 0, first + shift_a, first + shift_b) % 4
    predicted = np.stack([second, np.full(8, -1)])[..., None]
    document = np.where(seq == 0, document_in_fold(0), document_in_fold(1))
    return make_shard(np.stack([first, second])[..., None], seq_id=seq, predicted_next_ids=predicted, document=document)


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
    # fold-0 documents shift by 1, fold-1 ones by 2: a table learned in-sample would be perfect,
    # the cross-fitted one (learn on one fold, test on the other) is always wrong
    result = run_one(
        "cross_layer",
        [_shifted_routing(1, 2)],
        AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=1)),
    )
    assert _recall(result, "transition", 1) == 0.0
    predictions = result.prefetch_table().predictions(1)  # [fold, layer, first choice, k]
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


def test_popularity_is_the_other_folds_most_loaded_experts():
    # fold-0 document: layer 1 mostly expert 2; fold-1 document: layer 1 mostly expert 3 (k = 1)
    layer0 = [0, 0, 0, 0, 1, 1, 1, 1]
    layer1 = [2, 2, 2, 3, 3, 3, 3, 2]
    seq = [0, 0, 0, 0, 1, 1, 1, 1]
    document = [document_in_fold(0)] * 4 + [document_in_fold(1)] * 4
    shard = make_shard(np.array([layer0, layer1])[..., None], seq_id=seq, document=document)
    result = run_one("cross_layer", [shard], AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=1)))
    # fold 0 is given fold 1's favourite (3): 1 hit of 4; fold 1 is given fold 0's (2): 1 hit of 4
    assert _recall(result, "popularity", 1) == 2 / 8
    # hop 0 targets both layers: at layer 0 fold 0 is given expert 1 and fold 1 expert 0, never right
    assert _recall(result, "popularity", 0) == 2 / 16
    assert _recall(result, "transition", 1) == 2 / 8  # unseen first choices fall back to the other fold's load


def test_summary_judges_the_best_predictor_against_popularity():
    result = run_one("cross_layer", [_shifted_routing(1, 1)],
                     AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=1)))
    summary = result.summary()
    # layer 1 visits every expert once per document: popularity names expert 0 (ties to the lower index)
    assert summary["recall_popularity_hop1"] == 0.25 and summary["best_predictor_hop1"] == "transition"
    assert summary["best_minus_popularity_hop1"] == 0.75
    assert summary["versus_popularity"] == ["hop 1: transition beats popularity by +0.750 recall (1.000 vs 0.250)"]
    shard = make_shard(np.zeros((2, 8, 1), int), seq_id=[0] * 4 + [1] * 4,
                       document=[document_in_fold(0)] * 4 + [document_in_fold(1)] * 4)  # one expert for everything
    summary = run_one("cross_layer", [shard], AnalysisContext(n_experts=4, top_k=1, n_layers=2,
                                                              thresholds=Thresholds(max_hop=1))).summary()
    assert summary["versus_popularity"] == ["hop 1: no predictor beats popularity (1.000); the best, same_index, reaches 1.000 (+0.000)"]


def _keep(shard, mask):
    """The tokens of `shard` where mask [T] holds."""
    fields = {k: v[mask] if isinstance(v, np.ndarray) and v.ndim == 1 and k != "layers" else
              v[:, mask] if isinstance(v, np.ndarray) and k != "layers" else v for k, v in vars(shard).items()}
    return type(shard)(**fields)


def test_folds_follow_documents_so_a_trace_of_even_seq_ids_still_uses_both():
    spec = SyntheticSpec(n_layers=4, n_experts=8, top_k=2, seq_len=(16, 64))
    shards = list(synthetic_trace(spec, 6000, 1500, seed=3))
    even = [_keep(s, s.seq_id % 2 == 0) for s in shards]  # e.g. a trace whose odd sequences were dropped
    ctx = spec.context()
    full, half = (run_analyses(s, ctx, only=["cross_layer"])["cross_layer"] for s in (shards, even))
    assert not half.warnings and (half.summary()["fold_slots"][0] > 0 and half.summary()["fold_slots"][1] > 0)
    # split by seq_id parity, one fold was empty and the transition recall fell from 0.51 to 0.30
    assert _recall(half, "transition", 1) == pytest.approx(_recall(full, "transition", 1), abs=0.03)
    assert _recall(full, "transition", 1) > 0.45


def test_one_document_leaves_the_learned_predictors_out_with_a_warning():
    spec = SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(4, 20), sequences_per_document=10**6)
    shards = list(synthetic_trace(spec, 400, 100, seed=1))
    assert len({int(d) for s in shards for d in s.document}) == 1
    results = run_analyses(shards, spec.context(), only=["cross_layer", "expert_cache"])
    cross, cache = results["cross_layer"], results["expert_cache"]
    assert not set(cross.recall.predictor) & {"transition", "popularity"}
    assert not set(cache.predictors) & {"transition", "popularity"}
    (warning,) = cross.warnings
    assert cache.warnings == (warning,) and warning in cross.notes and "cross-fitting folds" in warning
    assert "versus_popularity" in cross.summary() and cross.summary()["versus_popularity"] == []


@pytest.mark.parametrize("documents", DOCUMENT_LAYOUTS)
def test_matches_the_reference_with_documents_of_several_sequences_and_without_documents(documents):
    shards = shards_with_documents(documents, seed=29)
    ctx = SPECS["base"].context(thresholds=Thresholds(max_hop=2))
    result = run_one("cross_layer", shards, ctx)
    ref = reference.compute(shards, ctx)
    got = {(r.predictor, r.hop, r.source_layer): [r.hits, r.targets] for r in result.recall.itertuples() if r.targets}
    assert got == {key: value for key, value in ref["recall"].items() if value[1]}
    assert {p for p, _, _ in got} >= {"transition", "popularity"}


def test_a_trace_on_disk_gets_its_folds_from_the_sequences_tables_documents(tmp_path):
    spec = SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(4, 20), sequences_per_document=4,
                         router_output=None, output_entropy=False)
    write_synthetic_trace(tmp_path / "t", spec, 600, 200, seed=4)
    on_disk = list(open_trace(tmp_path / "t").shards())
    in_memory = list(synthetic_trace(spec, 600, 200, seed=4))
    for a, b in zip(on_disk, in_memory):
        np.testing.assert_array_equal(a.document, b.document)
        expected = [document_key("synthetic", str(s // 4)) for s in a.seq_id.tolist()]  # source, doc_id of each sequence
        assert a.document.tolist() == expected
    assert len(set(on_disk[0].document.tolist())) < len(set(on_disk[0].seq_id.tolist()))  # documents of several sequences


def test_the_printed_summary_gives_the_verdict_against_popularity(capsys):
    from moescope.pipeline.summary import print_summary

    result = run_one("cross_layer", [_shifted_routing(1, 1)],
                     AnalysisContext(n_experts=4, top_k=1, n_layers=2, thresholds=Thresholds(max_hop=1)))
    print_summary({"trace": {}, "analyses": {"cross_layer": result.summary()}, "notes": {}}, limit=2)
    assert "  cross_layer: hop 1: transition beats popularity by +0.750 recall (1.000 vs 0.250)" in capsys.readouterr().out


def test_counts_widen_to_int64_before_they_could_pass_int32():
    """Token counts are int32 while the tokens fit it: a state that has counted nearly 2**31 tokens is widened to
    int64 before more are added (here a cell that would wrap), by accumulate_into, merge and the runner's add_into."""
    from moescope.analysis import coactivation, cross_layer
    from moescope.analysis.kernels import add_into

    spec = SPECS["base"]
    shard = synthetic_shards(spec, [40])[0]
    ctx = spec.context()
    near = np.iinfo(np.int32).max - 10
    for module in (cross_layer, coactivation):
        state = module.accumulate(shard, ctx)
        arrays = {f: getattr(state, f) for f in ("transitions", "first_choice_transitions", "counts") if hasattr(state, f)}
        assert all(a.dtype == np.int32 for a in arrays.values())
        fresh = module.accumulate(shard, ctx)
        big = dataclasses.replace(state, n_tokens=near, **{f: a + (near - a.max()) * (a > 0) for f, a in arrays.items()})
        def owned():  # accumulate_into and add_into add into the state's own arrays
            return dataclasses.replace(big, **{f: getattr(big, f).copy() for f in arrays})

        for combined in (module.accumulate_into(owned(), shard, ctx), module.merge(big, fresh), add_into(owned(), fresh)):
            assert combined.n_tokens == near + 40
            for f in arrays:
                total = getattr(combined, f)
                assert total.dtype == np.int64
                np.testing.assert_array_equal(total, getattr(big, f).astype(np.int64) + getattr(fresh, f))
                assert total.max() > np.iinfo(np.int32).max  # the sum a wrapped int32 could not hold
