import dataclasses
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import SPECS, concat, split_at_sequences, synthetic_shards

from moescope.analysis import ANALYSES, AnalysisContext, run_analyses
from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard
from moescope.errors import MoescopeError


def _tables(result):
    frames = result.to_pandas()
    return frames if isinstance(frames, dict) else {"": frames}


@pytest.mark.parametrize("spec_name", SPECS)
def test_many_shards_give_the_results_of_one(spec_name):
    spec = SPECS[spec_name]
    whole = concat(synthetic_shards(spec, [40, 25, 1, 60], seed=37))
    pieces = split_at_sequences(whole, 9)
    assert len(pieces) > 5
    ctx = spec.context()
    one = run_analyses([whole], ctx)
    many = run_analyses(pieces, ctx)
    for name in ANALYSES:
        _assert_nested_close(one[name].summary(), many[name].summary(), name)
        for table, frame in _tables(one[name]).items():
            pd.testing.assert_frame_equal(
                frame, _tables(many[name])[table], rtol=1e-9, atol=1e-12, obj=f"{name}/{table}"
            )


def _assert_nested_close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_nested_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


def test_summaries_are_strict_json_and_tables_are_dataframes():
    spec = SyntheticSpec(n_layers=3, n_experts=8, top_k=2, predicted_next_ids=True)
    results = run_analyses(synthetic_shards(spec, [50, 50]), spec.context())
    assert set(results) == set(ANALYSES)
    for name, result in results.items():
        json.dumps(result.summary(), allow_nan=False)
        assert all(isinstance(f, pd.DataFrame) for f in _tables(result).values()), name
        assert isinstance(result.notes, tuple)


def test_only_and_unknown_names():
    spec = SPECS["base"]
    shards = synthetic_shards(spec, [10])
    assert list(run_analyses(shards, spec.context(), only=["coactivation", "load"])) == ["coactivation", "load"]
    with pytest.raises(MoescopeError, match="unknown analyses"):
        run_analyses(shards, spec.context(), only=["lode"])
    with pytest.raises(MoescopeError, match="no shards"):
        run_analyses([], spec.context())


def test_one_shot_iterator_runs_the_cache_without_the_learned_predictor():
    spec = SPECS["base"]
    results = run_analyses(iter(synthetic_shards(spec, [30, 30])), spec.context(), only=["expert_cache"])
    assert "transition" not in results["expert_cache"].predictors
    assert any("first pass" in note for note in results["expert_cache"].notes)


def test_callable_source_is_read_twice_and_matches_a_list():
    spec = SPECS["base"]
    timings = {}
    from_callable = run_analyses(
        lambda: iter(synthetic_shards(spec, [30, 30])), spec.context(), only=["expert_cache"], timings=timings
    )
    from_list = run_analyses(synthetic_shards(spec, [30, 30]), spec.context(), only=["expert_cache"])
    np.testing.assert_array_equal(from_callable["expert_cache"].hits, from_list["expert_cache"].hits)
    assert "transition" in from_callable["expert_cache"].predictors
    assert set(timings) == {"cross_layer", "expert_cache"}  # the first pass learned the prefetch table


def test_shard_shape_must_match_the_context():
    spec = SPECS["base"]
    with pytest.raises(MoescopeError, match="top-2"):
        run_analyses(synthetic_shards(spec, [5]), AnalysisContext(n_experts=6, top_k=3, n_layers=3))
    with pytest.raises(MoescopeError, match="MoE layers"):
        run_analyses(synthetic_shards(spec, [5]), AnalysisContext(n_experts=6, top_k=2, n_layers=4))


def _peak_bytes(shards, ctx, only) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        run_analyses(shards, ctx, only=only)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_of_fixed_size_states_is_flat_in_the_number_of_shards():
    # 128 experts, 8 layers: one cross_layer state is 9.4 MiB, far more than a shard of 40 tokens
    spec = SyntheticSpec(n_layers=8, n_experts=128, top_k=4, seq_len=(4, 20), router_output="logits", vocab_size=64)
    ctx = spec.context()
    only = ["cross_layer", "coactivation", "aux_losses"]
    few, many = ([synthetic_shard(spec, 40, seed=5, shard_index=i) for i in range(n)] for n in (4, 16))
    state_bytes = ANALYSES["cross_layer"].accumulate(few[0], ctx).first_choice_transitions.nbytes
    peaks = {n: _peak_bytes(shards, ctx, only) for n, shards in ((4, few), (16, many))}
    # a merge tree holds log2(shards) states: 2 at 4 shards, 4 at 16; one running state holds 1
    assert peaks[16] < peaks[4] + state_bytes / 2, peaks


def test_summed_states_fold_in_shard_order_exactly_like_a_left_fold_of_merge():
    from analysis_helpers import run_one

    from moescope.analysis.runner import folds_in_place

    spec = SPECS["base"]
    shards = synthetic_shards(spec, [30, 1, 17, 8, 40], seed=41)
    ctx = spec.context()
    folded = [name for name in ANALYSES if folds_in_place(ANALYSES[name], ctx)]
    assert {"load", "aux_losses", "coactivation", "cross_layer", "expert_cache", "temporal_locality",
            "domain_specialisation", "placement"} == set(folded)
    results = run_analyses(shards, ctx, only=folded)
    for name in folded:
        ctx_name = ctx if name != "expert_cache" else dataclasses.replace(ctx, prefetch_table=results["cross_layer"].prefetch_table())
        left = run_one(name, shards, ctx_name)  # merge(merge(merge(s0, s1), s2), ...): the same float additions
        for table, frame in _tables(left).items():
            pd.testing.assert_frame_equal(frame, _tables(results[name])[table], check_exact=True, obj=f"{name}/{table}")
        assert json.dumps(left.summary()) == json.dumps(results[name].summary()), name


def test_adding_in_place_equals_merge_and_leaves_the_added_state_alone():
    from moescope.analysis.kernels import add_into, copy_state
    from moescope.analysis.runner import folds_in_place

    spec = SPECS["base"]
    a, b = synthetic_shards(spec, [20, 9], seed=43)
    ctx = spec.context()
    for name, module in ANALYSES.items():
        if not folds_in_place(module, ctx):
            continue
        ctx_name = ctx
        if name == "expert_cache":
            learned = run_analyses([a, b], ctx, only=["cross_layer"])["cross_layer"].prefetch_table()
            ctx_name = dataclasses.replace(ctx, prefetch_table=learned)
        sa, sb = module.accumulate(a, ctx_name), module.accumulate(b, ctx_name)
        before = copy_state(sb)
        merged = module.merge(sa, sb)
        into = getattr(module, "merge_into", None)  # a fold by the module's own merge (placement), else a sum
        running = add_into(copy_state(sa), sb) if into is None else into(copy_state(sa), sb, ctx_name)
        for field in dataclasses.fields(merged):
            if field.name == "room":  # placement's spare rows for the blocks of later pieces
                continue
            x, y = getattr(merged, field.name), getattr(running, field.name)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y, err_msg=f"{name}.{field.name}")
                np.testing.assert_array_equal(getattr(sb, field.name), getattr(before, field.name))
            else:
                assert x == y, f"{name}.{field.name}"


def test_states_of_different_shapes_are_refused_when_folded():
    spec = SPECS["base"]
    other = dataclasses.replace(spec, n_experts=7)
    shards = synthetic_shards(spec, [10])
    from moescope.analysis.kernels import add_into

    a = ANALYSES["coactivation"].accumulate(shards[0], spec.context())
    b = ANALYSES["coactivation"].accumulate(synthetic_shards(other, [10])[0], other.context())
    with pytest.raises(MoescopeError, match="cannot merge"):
        add_into(a, b)


def test_the_ids_only_pass_reads_less_and_gives_the_same_results(tmp_path):
    """The second pass (expert_cache, token_specialisation) asks a trace for shards without gate weights and router
    logits (`ids_only`): the shards hold the same ids and predictions, and every result equals a full read's."""
    import moescope
    from moescope.analysis.synthetic import write_synthetic_trace
    from moescope.pipeline.analyze import analysis_context

    spec = dataclasses.replace(SPECS["fine_grained"], router_output="logits")
    write_synthetic_trace(tmp_path / "t", spec, 300, 70, seed=3)
    trace = moescope.open_trace(tmp_path / "t")
    ctx = analysis_context(trace)
    full, lean = next(trace.shards()), next(trace.shards(ids_only=True))
    np.testing.assert_array_equal(lean.topk_ids, full.topk_ids)
    np.testing.assert_array_equal(lean.predicted_next_ids, full.predicted_next_ids)
    assert lean.topk_weights is None and lean.router_output is None and full.router_output is not None
    asked = []

    def source(ids_only=False):
        asked.append(ids_only)
        return trace.shards(ids_only=ids_only)

    lean_results = run_analyses(source, ctx)
    full_results = run_analyses(list(trace.shards()), ctx)
    assert asked == [False, True]
    for name in ANALYSES:
        for table, frame in _tables(full_results[name]).items():
            pd.testing.assert_frame_equal(frame, _tables(lean_results[name])[table], check_exact=True, obj=f"{name}/{table}")
        assert json.dumps(full_results[name].summary()) == json.dumps(lean_results[name].summary()), name
    with pytest.raises(MoescopeError, match="needs gate weights"):
        run_analyses([lean], ctx, only=["router_confidence"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's M_TOP_PAD is glibc's")
def test_freed_memory_is_kept_while_the_passes_run_unless_the_user_set_it():
    code = ("from moescope.analysis.runner import freed_memory_kept as kept\n"
            "with kept() as outer:\n    with kept() as inner:\n        pass\n"
            "with kept() as again:\n    pass\n"
            "print(outer, inner, again)")
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_TOP_PAD_"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()
    assert run(env) == ["True", "False", "True"]  # set around the outermost block, restored after it
    assert run({**env, "MALLOC_TOP_PAD_": str(1 << 20)}) == ["False", "False", "False"]  # the user's setting stands
