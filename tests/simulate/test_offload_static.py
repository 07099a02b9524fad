"""Pinned sets (static, static-oracle), coverage and the oracle gap against per-event loops at awkward sizes."""

import itertools
import math

import numpy as np
import pytest
from simulate_helpers import LAYOUTS, SPECS, shards_of

from moescope.analysis.context import OVERALL
from moescope.analysis.synthetic import SyntheticSpec
from moescope.simulate.cost import Link
from moescope.simulate.offload import OffloadOptions, OffloadResult, simulate_trace
from moescope.simulate.reference import offload as reference
from moescope.simulate.static import random_set_hit_rate

FINE = SyntheticSpec(n_layers=2, n_experts=256, top_k=8, seq_len=(1, 40), router_output=None, vocab_size=50,
                     generated_fraction=0.4)  # fine-grained: 256 experts, top-8
SHAPES = {**SPECS, "e256_k8": FINE}
CASES = [(spec, layout, "layer") for spec in SHAPES for layout in LAYOUTS] + [
    (spec, layout, "global") for spec in ("k2", "k3_invalid", "e256_k8") for layout in LAYOUTS]


def _state(shards, spec, options):
    return simulate_trace(lambda: shards, spec.context(), options)


def _expected_arrays(expected, L, E):
    counts = np.zeros((2, L, 4), np.int64)
    for (phase, layer), values in expected["counts"].items():
        counts[phase, layer] = values
    moved = np.zeros((L, E), np.int64)
    for (layer, expert), n in expected["fetched"].items():
        moved[layer, expert] = n
    return counts, moved


@pytest.mark.parametrize("spec_name, layout, scope", CASES)
def test_pinned_sets_equal_the_per_event_reference(spec_name, layout, scope):
    spec = SHAPES[spec_name]
    L, E, k = spec.n_layers, spec.n_experts, spec.top_k
    shards = shards_of(spec, LAYOUTS[layout], seed=len(layout) + 1)
    capacities = (k, 2 * k + 1) if scope == "layer" else (k + 1, L * k + 3)
    options = OffloadOptions(capacities, ("lru", "static", "static-oracle"), ("none",), scope)
    state = _state(shards, spec, options)
    for (p, policy), (c, capacity) in itertools.product(enumerate(options.policies), enumerate(capacities)):
        if policy == "lru":
            continue
        counts, moved = _expected_arrays(reference.compute_static(shards, spec.context(), policy=policy, capacity=capacity,
                                                                  scope=scope), L, E)
        where = f"{policy} C={capacity}"
        np.testing.assert_array_equal(state.counts[0, p, c], counts, err_msg=where)
        np.testing.assert_array_equal(state.moved[0, p, c].sum(axis=(0, 1)), moved, err_msg=where)
        assert not state.moved[0, p, c, :, 1].any()  # a pinned set takes no prefetches


@pytest.mark.parametrize("spec_name", list(SHAPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", [1, 3, 8])
def test_coverage_equals_the_per_token_loops(spec_name, layout, window):
    spec = SHAPES[spec_name]
    shards = shards_of(spec, LAYOUTS[layout], seed=7)
    state = _state(shards, spec, OffloadOptions((spec.top_k,), ("lru",), ("none",), "layer", window))
    result = OffloadResult(state=state, options=OffloadOptions((spec.top_k,), ("lru",), ("none",), "layer", window),
                           layers=tuple(range(spec.n_layers)), top_k=spec.top_k, n_experts=spec.n_experts,
                           expert_bytes=np.ones((spec.n_layers, spec.n_experts)), link=Link.preset("pcie4x16"),
                           phases=("prefill", "decode"))
    table = result.coverage()
    expected = reference.coverage(shards, spec.context(), window)
    assert len(table) == 2 * spec.n_layers
    for row in table.itertuples():
        cell = expected[(("prefill", "decode").index(row.phase), row.layer)]
        where = f"{row.phase} layer {row.layer}"
        assert row.lookups == cell["lookups"], where
        for share in (50, 90, 99):
            assert getattr(row, f"experts_for_{share}") == cell[f"experts_for_{share}"], where
        assert row.windows == cell["windows"], where
        for column in ("effective_experts", "working_set"):
            mine, theirs = getattr(row, column), cell[column]
            assert (math.isnan(mine) and math.isnan(theirs)) or mine == pytest.approx(theirs, rel=1e-12), (where, column)
    # lookups are the caches' lookups
    lookups = state.counts[0, 0, 0, :, :, 0]  # [2, L]
    assert table["lookups"].tolist() == lookups.ravel().tolist()


@pytest.mark.parametrize("scope, capacity", [("layer", 2), ("layer", 4), ("global", 3)])
def test_static_oracle_is_the_best_fixed_set_of_every_phase(scope, capacity):
    """Every fixed set of `capacity` keys, enumerated: none serves a phase's lookups better than static-oracle."""
    spec = SPECS["k2"]
    shards = shards_of(spec, [100, 1, 7, 148], seed=4)
    options = OffloadOptions((capacity,), ("static-oracle",), ("none",), scope)
    hits = _state(shards, spec, options).counts[0, 0, 0, :, :, 1]  # [2, L]
    L, E = spec.n_layers, spec.n_experts
    rows = list(reference.token_rows(shards))
    for phase in (0, 1):
        keys = [(l, set(reference.real(row.experts[l], E))) for row in rows if int(row.generated) == phase for l in range(L)]
        if scope == "layer":
            for layer in range(L):
                best = max(sum(len(s & set(chosen)) for l, s in keys if l == layer)
                           for chosen in itertools.combinations(range(E), capacity))
                assert hits[phase, layer] == best
        else:
            best = max(sum(len({(l, e) for e in s} & set(chosen)) for l, s in keys)
                       for chosen in itertools.combinations([(l, e) for l in range(L) for e in range(E)], capacity))
            assert hits[phase].sum() == best


def test_a_random_fixed_set_hits_capacity_over_keys_on_average():
    """The expected hit rate of a fixed set drawn at random, checked by enumerating every set on real lookups."""
    spec = SPECS["k2"]
    shards = shards_of(spec, [7, 100], seed=2)
    counts = reference.coverage(shards, spec.context(), 1)
    rows = list(reference.token_rows(shards))
    for capacity in (2, 3, 5):
        rates = []
        for chosen in itertools.combinations(range(spec.n_experts), capacity):
            hits = sum(e in chosen for row in rows for e in set(reference.real(row.experts[0], spec.n_experts)))
            rates.append(hits / (counts[(0, 0)]["lookups"] + counts[(1, 0)]["lookups"]))
        assert np.mean(rates) == pytest.approx(random_set_hit_rate(capacity, spec.n_experts), rel=1e-12)


def test_oracle_gap_compares_belady_with_the_best_policy_an_engine_can_run():
    spec = SPECS["k3_invalid"]
    shards = shards_of(spec, LAYOUTS["256_tokens_uneven"], seed=5)
    options = OffloadOptions((3, 4, 7), ("lru", "lfu", "arc", "belady", "static", "static-oracle"), ("none", "same-index"))
    state = _state(shards, spec, options)
    result = OffloadResult(options, tuple(range(spec.n_layers)), spec.top_k, spec.n_experts, state,
                           np.ones((spec.n_layers, spec.n_experts)), Link.preset("pcie4x16"), ("prefill", "decode"))
    rates = result.hit_rate()
    assert set(rates[rates["prefetch"] == "same-index"]["policy"]) == {"lru", "lfu", "arc", "belady"}  # pinned: none only
    gap = result.oracle_gap()
    assert len(gap) == 2 * 3 * 2
    for row in gap.itertuples():
        mine = rates[(rates["prefetch"] == row.prefetch) & (rates["capacity"] == row.capacity) & (rates["phase"] == row.phase)
                     & (rates["layer"] == OVERALL)].set_index("policy")["hit_rate"]
        realisable = {p: mine[p] for p in ("lru", "lfu", "arc", "static") if p in mine}
        best = max(realisable.values())
        assert row.best_realisable == best and realisable[row.best_realisable_policy] == best
        assert row.oracle_gap == pytest.approx(mine["belady"] - best)
        assert row.best_oracle == pytest.approx(max(mine["belady"], mine.get("static-oracle", -1.0)))
        assert row.random_set == row.capacity / spec.n_experts
        if row.prefetch == "none":
            assert row.static_minus_lru == pytest.approx(mine["static"] - mine["lru"])
        else:
            assert math.isnan(row.static)
