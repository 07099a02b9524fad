import json

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import SPECS, concat, split_at_sequences, synthetic_shards

from moescope.analysis import ANALYSES, AnalysisContext, run_analyses
from moescope.analysis.synthetic import SyntheticSpec
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
