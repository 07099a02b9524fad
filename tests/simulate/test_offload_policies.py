"""Expert caches against per-event Python loops at awkward sizes, Belady as the bound, LRU equal to expert_cache."""

import dataclasses
import itertools

import numpy as np
import pytest
from simulate_helpers import LAYOUTS, SPECS, generated_trace, lookahead_trace, shards_of, trace_shards  # noqa: F401

from moescope.analysis import run_analyses
from moescope.errors import MoescopeError
from moescope.simulate.offload import PREFETCH, OffloadOptions, simulate_trace
from moescope.simulate.reference import offload as reference

POLICIES = ("lru", "lfu", "arc", "belady")


def simulate(shards, ctx, options):
    return simulate_trace(lambda: shards, ctx, options)


def prefetchers(spec, shards=None):
    """The predictors the shards allow: router-lookahead needs predictions, the learned ones two folds."""
    names = PREFETCH if spec.predicted_next_ids else tuple(p for p in PREFETCH if p != "router-lookahead")
    if shards is not None and _one_fold(shards, spec.context()):
        names = tuple(p for p in names if p not in ("transition", "popularity"))
    return names


def _one_fold(shards, ctx):
    return run_analyses(shards, ctx, only=["cross_layer"])["cross_layer"].prefetch_table().empty_fold_warning() is not None


def test_learned_predictors_on_a_trace_of_one_fold_are_refused():
    spec = SPECS["k2"]
    shards = shards_of(spec, [1])
    assert _one_fold(shards, spec.context())
    with pytest.raises(MoescopeError, match="--prefetch transition: every routed slot falls in one of the two"):
        simulate(shards, spec.context(), OffloadOptions((2,), ("lru",), ("none", "transition"), "layer"))


# every shape and layout with a cache per layer; one global budget on two shapes (the reference is slow there)
CASES = [(spec, layout, "layer") for spec in SPECS for layout in LAYOUTS] + [
    (spec, layout, "global") for spec in ("k2", "k3_invalid") for layout in LAYOUTS]


@pytest.mark.parametrize("spec_name, layout, scope", CASES)
def test_every_policy_equals_the_per_event_reference(spec_name, layout, scope):
    spec = SPECS[spec_name]
    ctx = spec.context()
    shards = shards_of(spec, LAYOUTS[layout], seed=len(layout))
    k, E, L = spec.top_k, spec.n_experts, spec.n_layers
    capacities = (k, 2 * k + 1) if scope == "layer" else (k + 1, L * k + 3)
    options = OffloadOptions(capacities, POLICIES, prefetchers(spec, shards), scope)
    state = simulate(shards, ctx, options)
    for (f, prefetch), (p, policy), (c, capacity) in itertools.product(
        enumerate(options.prefetch), enumerate(POLICIES), enumerate(capacities)
    ):
        expected = reference.compute(shards, ctx, policy=policy, capacity=capacity, scope=scope, prefetch=prefetch)
        counts = np.zeros((2, L, 4), np.int64)
        for (phase, layer), values in expected["counts"].items():
            counts[phase, layer] = values
        moved = np.zeros((L, E), np.int64)
        for (layer, expert), n in expected["fetched"].items():
            moved[layer, expert] = n
        where = f"{policy} / {prefetch} / C={capacity}"
        np.testing.assert_array_equal(state.counts[f, p, c], counts, err_msg=where)
        np.testing.assert_array_equal(state.moved[f, p, c].sum(axis=(0, 1)), moved, err_msg=where)
    assert state.tokens.tolist() == [sum(int((~s.generated).sum()) for s in shards), sum(int(s.generated.sum()) for s in shards)]


def _bound_holds(state, options, scope):
    hits = state.counts[..., 1].sum(axis=3)  # [F, P, C, L] over phases
    if scope == "global":
        hits = hits.sum(axis=-1, keepdims=True)
    best = hits[:, list(options.policies).index("belady")]
    for p, policy in enumerate(options.policies):
        assert (best >= hits[:, p]).all(), f"{policy} beat Belady: {hits[:, p]} > {best}"


def _random_traces_bound(scope, seeds, spec_names, multiples, prefetch=PREFETCH):
    for seed, spec_name in itertools.product(seeds, spec_names):
        spec = dataclasses.replace(SPECS[spec_name], seq_len=(20, 120))
        ctx = spec.context()
        shards = shards_of(spec, [300, 200], seed=seed)
        base = spec.top_k if scope == "layer" else spec.top_k * spec.n_layers
        capacities = tuple(sorted({spec.top_k, *(max(spec.top_k, base * m // 4) for m in multiples)}))
        options = OffloadOptions(capacities, POLICIES, tuple(p for p in prefetchers(spec, shards) if p in prefetch), scope)
        _bound_holds(simulate(shards, ctx, options), options, scope)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_belady_bounds_every_policy_at_every_capacity(scope):
    if scope == "layer":
        _random_traces_bound(scope, [0], ["k2", "wide"], (2, 6))
    else:
        _random_traces_bound(scope, [0], ["k3_invalid"], (3,), ("none", "same-index", "popularity"))


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_belady_bounds_every_policy_at_every_capacity_thoroughly(scope):
    _random_traces_bound(scope, range(3), SPECS, (1, 2, 3, 4, 6))


def test_belady_bounds_every_policy_on_real_traces(generated_trace, lookahead_trace):
    for folder, prefetch in ((generated_trace, tuple(p for p in PREFETCH if p != "router-lookahead")), (lookahead_trace, PREFETCH)):
        shards, ctx = trace_shards(folder)
        for scope, capacities in (("layer", (2, 3, 5, 8)), ("global", (3, 12))):
            options = OffloadOptions(capacities, POLICIES, prefetch if scope == "layer" else prefetch[:2], scope)
            _bound_holds(simulate(shards, ctx, options), options, scope)


def test_lru_equals_the_expert_cache_analysis(generated_trace, lookahead_trace):
    """Today's expert_cache analysis (its vectorised LRU kernel) and the simulator's LRU: the same hits at
    every capacity, for plain LRU and for each of the four predictors."""
    same = {"none": "lru", "same-index": "same_index", "transition": "transition", "popularity": "popularity",
            "router-lookahead": "router_lookahead"}
    for folder in (generated_trace, lookahead_trace):
        shards, ctx = trace_shards(folder)
        cache = run_analyses(shards, ctx, only=["expert_cache"])["expert_cache"]
        prefetch = tuple(p for p, name in same.items() if name in cache.predictors)
        assert {"transition", "popularity"} <= set(prefetch) and (folder != lookahead_trace or "router-lookahead" in prefetch)
        capacities = tuple(int(c) for c in cache.capacities)
        state = simulate(shards, ctx, OffloadOptions(capacities, ("lru",), prefetch, "layer"))
        for f, name in enumerate(prefetch):
            p = cache.predictors.index(same[name])
            np.testing.assert_array_equal(state.counts[f, 0, :, :, :, 1].sum(axis=1).T, cache.hits[p], err_msg=name)
            np.testing.assert_array_equal(state.counts[f, 0, 0, :, :, 0].sum(axis=0), cache.lookups[p])


def test_prefill_and_decode_are_counted_apart(generated_trace):
    shards, ctx = trace_shards(generated_trace)
    state = simulate(shards, ctx, OffloadOptions((2, 8), ("lru", "belady"), ("none",), "layer"))
    generated = sum(int(s.generated.sum()) for s in shards)
    prompt = sum(s.n_tokens for s in shards) - generated
    assert generated > 0 and state.tokens.tolist() == [prompt, generated]
    real = [[int(((s.topk_ids[l] >= 0) & (s.topk_ids[l] < ctx.n_experts) & (s.generated == g)[:, None]).sum())
             for l in range(ctx.n_layers)] for g in (False, True) for s in [s for s in shards]]
    lookups = np.array(real).reshape(2, len(shards), ctx.n_layers).sum(axis=1)
    np.testing.assert_array_equal(state.counts[0, 0, 0, :, :, 0], lookups)
    # a cache holding every expert misses only the first use of each expert in each sequence
    assert (state.counts[0, :, 1, :, :, 1] == state.counts[0, 0, 1, :, :, 1]).all()
