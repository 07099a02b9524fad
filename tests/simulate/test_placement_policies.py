"""Placements (static, greedy, DeepSeek EPLB) against an independent plain-loop implementation, on random loads at
awkward sizes and on a real trace; GPU loads, balancedness, fan-out and staleness against per-token loops."""

import numpy as np
import pytest
import reference_placement as ref
from simulate_helpers import generated_trace, trace_shards  # noqa: F401 (fixture)

from moescope.analysis import run_analyses
from moescope.errors import MoescopeError
from moescope.analysis.reference import placement as per_token
from moescope.analysis.placement_balance import balancedness, fanout, gpu_load, imbalance
from moescope.analysis.placement_policies import (
    POLICIES,
    PlacementOptions,
    eplb_placement,
    greedy_placement,
    place,
    rebalance_experts,
    static_placement,
)

# (experts, gpus, nodes, redundant, groups): hierarchical, global fallback (groups % nodes != 0), one GPU,
# one expert per GPU, a pack of one item, 256 experts
CLUSTERS = [(12, 8, 2, 4, 4), (8, 4, 2, 4, 2), (9, 3, 1, 3, 3), (6, 6, 3, 6, 2), (7, 1, 1, 0, 1), (10, 5, 1, 5, 5),
            (4, 4, 2, 4, 4), (256, 32, 4, 32, 8), (16, 8, 2, 0, 4), (5, 5, 5, 5, 5)]


def random_loads(rng, layers, experts):
    kind = rng.integers(3)
    if kind == 0:  # Zipf-like skew
        w = rng.pareto(1.2, (layers, experts)) * 100
    elif kind == 1:  # many ties
        w = rng.integers(0, 4, (layers, experts)).astype(float)
    else:  # some dead experts
        w = rng.integers(0, 1000, (layers, experts)) * (rng.random((layers, experts)) > 0.3)
    return np.floor(w).astype(np.int64)


def test_eplb_reproduces_the_published_example():
    """The two-layer example of github.com/deepseek-ai/EPLB's README: 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs."""
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, count = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    for l in range(2):  # the inverse map lists exactly each expert's slots, -1 padded
        for e in range(12):
            slots = sorted(s for s in log2phy[l, e] if s >= 0)
            assert slots == [s for s in range(16) if phy2log[l, s] == e] and len(slots) == count[l, e]


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda c: "E{}-G{}-N{}-R{}-g{}".format(*c))
def test_placements_equal_the_plain_loop_implementation(cluster):
    E, G, N, R, groups = cluster
    rng = np.random.default_rng(E * 1000 + G)
    options = PlacementOptions(E, G, N, R, groups)
    for trial in range(6):
        load = random_loads(rng, int(rng.integers(1, 5)), E)
        w = load.astype(float).tolist()
        assert eplb_placement(load, options).physical_to_logical.tolist() == ref.eplb(w, E + R, groups, N, G)
        assert greedy_placement(load, options).physical_to_logical.tolist() == ref.greedy(w, R, G)
        assert static_placement(load, options).physical_to_logical.tolist() == ref.static(len(w), E, E + R)


def test_placements_on_a_real_trace_equal_the_plain_loop_implementation(generated_trace):
    shards, ctx = trace_shards(generated_trace)
    load = run_analyses(shards, ctx, only=["load"])["load"].counts  # [L, E] token counts
    w = load.astype(float).tolist()
    for G, N, R, groups in ((4, 2, 4, 2), (2, 1, 2, 1), (4, 4, 0, 4), (8, 2, 8, 4)):
        options = PlacementOptions(ctx.n_experts, G, N, R, groups)
        eplb, greedy, static = (f(load, options) for f in (eplb_placement, greedy_placement, static_placement))
        assert eplb.physical_to_logical.tolist() == ref.eplb(w, ctx.n_experts + R, groups, N, G)
        assert greedy.physical_to_logical.tolist() == ref.greedy(w, R, G)
        for p in (eplb, greedy, static):
            loads = gpu_load(p, load)
            np.testing.assert_allclose(loads, per_token.gpu_loads(p.physical_to_logical.tolist(), w, G), rtol=1e-12)
            np.testing.assert_allclose(loads.sum(axis=1), load.sum(axis=1))  # replicas split their expert's tokens
            per_layer = [min(row) and sum(row) / len(row) / max(row) for row in loads.tolist()]
            np.testing.assert_allclose(balancedness(loads)[:-1], per_layer)
            np.testing.assert_allclose(imbalance(loads)[:-1], [1 / b - 1 for b in per_layer])
            pooled = sum(sum(r) / len(r) for r in loads.tolist()) / sum(max(r) for r in loads.tolist())
            assert balancedness(loads)[-1] == pytest.approx(pooled)


def test_every_placement_holds_every_expert_and_fills_every_slot():
    rng = np.random.default_rng(5)
    for E, G, N, R, groups in CLUSTERS:
        options = PlacementOptions(E, G, N, R, groups)
        load = random_loads(rng, 3, E)
        for place in (eplb_placement, greedy_placement, static_placement):
            p = place(load, options)
            assert p.physical_to_logical.shape == (3, E + R)
            assert (p.replica_count() >= 1).all() and (p.replica_count().sum(axis=1) == E + R).all()
            l2p = p.logical_to_physical()
            for l in range(3):
                assert sorted(s for s in l2p[l].ravel() if s >= 0) == list(range(E + R))


@pytest.mark.parametrize("n_tokens", [1, 7, 256])
@pytest.mark.parametrize("E, G, N, R", [(12, 4, 2, 4), (256, 128, 4, 128), (12, 2, 1, 10)],
                         ids=["bitmask", "over-64-gpus", "long-replica-cycle"])
def test_fanout_equals_a_per_token_loop(n_tokens, E, G, N, R):
    rng = np.random.default_rng(n_tokens)
    k, L = 3, 2
    options = PlacementOptions(E, G, N, R, 2)
    ids = np.stack([[rng.permutation(E + 2)[:k] for _ in range(n_tokens)] for _ in range(L)])  # ids >= E: no expert
    ids[rng.random(ids.shape) < 0.1] = -1
    load = random_loads(rng, L, E)
    sentinel = np.where((ids >= 0) & (ids < E), ids, E)
    for place in (eplb_placement, greedy_placement, static_placement):
        p = place(load, options)
        gpus, nodes = fanout(p, sentinel, 5 + np.arange(n_tokens))
        expected = per_token.fanout(p.physical_to_logical.tolist(), ids.tolist(), E, G, N, first_index=5)
        assert gpus.tolist() == [[g for g, _ in layer] for layer in expected]
        assert nodes.tolist() == [[n for _, n in layer] for layer in expected]


@pytest.mark.parametrize("bad, message", [
    (dict(n_experts=8, n_gpus=3, n_redundant=0), "does not divide the 8 expert slots"),
    (dict(n_experts=8, n_gpus=4, n_redundant=2), "does not divide the 10 expert slots"),
    (dict(n_experts=8, n_gpus=4, n_redundant=12), "exceeds the 8 experts"),
    (dict(n_experts=8, n_gpus=4, n_nodes=3, n_redundant=4), "not a multiple of --nodes"),
    (dict(n_experts=8, n_gpus=4, n_redundant=-4), "0 or more"),
    (dict(n_experts=8, n_gpus=4, n_redundant=4, n_groups=3), "--groups 3 does not divide"),
])
def test_impossible_clusters_are_refused(bad, message):
    with pytest.raises(MoescopeError, match=message):
        PlacementOptions(**bad)


def test_analyze_defaults_and_windows(generated_trace):
    assert [(o.n_gpus, o.n_nodes, o.n_redundant) for o in map(PlacementOptions.default_for, (8, 256, 6, 3))] == [
        (4, 2, 4), (8, 2, 8), (2, 1, 2), (1, 1, 1)]
    shards, ctx = trace_shards(generated_trace)
    result = run_analyses(shards, ctx, only=["placement"])["placement"]
    assert (result.options.n_gpus, result.options.n_nodes, result.options.n_redundant) == (4, 2, 4)
    stale = result.staleness
    assert sorted(stale["window"].unique()) == list(range(1, 8))  # eight windows: seven served by the one before
    sequences = sum(len(np.unique(s.seq_id)) for s in shards)
    assert stale.groupby("window")["tokens"].first().sum() < sum(s.n_tokens for s in shards) and sequences >= 8
    load = sum(s.topk_ids.shape[1] for s in shards) * ctx.top_k * ctx.n_layers
    assert result.load.sum() == load  # every slot of the trace is a real expert here


def test_ids_that_are_not_experts_are_no_load():
    """Dropped slots (-1) and zero-compute experts (ids >= E) count toward no expert and reach no GPU."""
    from simulate_helpers import SPECS, shards_of

    spec = SPECS["k3_invalid"]
    shards = shards_of(spec, [40, 60], seed=2)
    results = run_analyses(shards, spec.context(), only=["load", "placement"])
    np.testing.assert_array_equal(results["placement"].load, results["load"].counts)
    ids = np.concatenate([s.topk_ids for s in shards], axis=1)
    assert ((ids < 0) | (ids >= spec.n_experts)).any()
    assert results["placement"].load.sum() == ((ids >= 0) & (ids < spec.n_experts)).sum()


@pytest.mark.parametrize("n_tokens, E, G, R", [(1, 8, 4, 4), (7, 8, 4, 4), (256, 12, 4, 4), (256, 256, 8, 8)])
def test_the_lp_split_reaches_the_max_flow_optimum(n_tokens, E, G, R):
    """The LP's busiest GPU equals the smallest one a max-flow bisection finds, per layer, for every policy;
    and it is never above the even split."""
    from moescope.analysis.placement_split import lp_busiest_gpu

    rng = np.random.default_rng(n_tokens + E)
    k = min(8, E // 2)
    load = np.zeros((2, E), np.int64)
    skew = rng.dirichlet(np.full(E, 0.3), size=2)
    for layer in range(2):
        for _ in range(n_tokens):
            load[layer, rng.choice(E, k, replace=False, p=skew[layer])] += 1
    options = PlacementOptions(E, G, 1, R)
    better = False
    for policy in POLICIES:
        p = place(policy, load, options)
        mine = lp_busiest_gpu(p, load)
        even = gpu_load(p, load).max(axis=1)
        assert (mine <= even + 1e-9).all()
        better |= bool((mine < even - 1e-6).any())
        if E > 16 and policy != "eplb":
            continue  # the plain max flow is slow at 256 experts: one policy there
        for layer in range(2):
            expected = ref.best_split_peak(p.physical_to_logical[layer].tolist(), load[layer].tolist(), G)
            assert mine[layer] == pytest.approx(expected, rel=1e-7, abs=1e-9), (policy, layer)
    assert better or n_tokens < 256  # on a real load some split beats the even one


@pytest.mark.parametrize("n_tokens, E, G, N, R", [(1, 8, 4, 1, 4), (7, 6, 4, 2, 2), (256, 8, 2, 1, 2), (256, 12, 4, 2, 4),
                                                 (256, 256, 8, 2, 8)])
def test_replica_budgets_reach_the_best_allocation_of_the_total(n_tokens, E, G, N, R):
    """Every allocation of the L x R redundant slots over 3 layers tried with the plain-loop EPLB: the
    budgets' summed busiest GPU is the least of them, and never above the uniform count's."""
    from moescope.analysis.placement_budget import replica_budgets

    rng = np.random.default_rng(n_tokens * E + G)
    load = np.zeros((3, E), np.int64)
    for layer, alpha in enumerate((0.1, 1.0, 10.0)):  # one skewed layer, one mild, one almost even
        share = rng.dirichlet(np.full(E, alpha))
        for _ in range(n_tokens):
            load[layer, rng.choice(E, min(8, E // 2), replace=False, p=share)] += 1
    options = PlacementOptions(E, G, N, R)
    counts, peaks = replica_budgets(load, options)
    w = load.astype(float).tolist()
    assert counts.sum() <= 3 * R and all((E + c) % G == 0 and 0 <= c <= E for c in counts)
    assert [ref.gpu_peak(ref.eplb([w[l]], E + int(c), options.groups, N, G)[0], w[l], G) for l, c in enumerate(counts)] \
        == pytest.approx(peaks.tolist())
    assert peaks.sum() == pytest.approx(ref.best_budgets(w, R, options.groups, N, G))
    uniform = gpu_load(place("eplb", load, options), load).max(axis=1).sum()
    assert peaks.sum() <= uniform + 1e-9


@pytest.mark.parametrize("n_tokens, E, k, G, R", [(1, 8, 2, 4, 4), (7, 6, 3, 2, 2), (256, 16, 4, 4, 4), (256, 256, 8, 8, 8)])
def test_coactivation_placement_equals_the_plain_loop_implementation(n_tokens, E, k, G, R):
    """Tokens drawn from clusters of experts that are chosen together: the placement equals the plain loops, and
    the tokens reach fewer GPUs than under EPLB (fan-out from the per-token loops)."""
    from moescope.analysis.kernels import pair_counts
    from moescope.analysis.placement_coactivation import SLACK, coactivation_placement

    rng = np.random.default_rng(n_tokens + E)
    clusters = rng.permutation(E).reshape(-1, 2 * k)  # tokens pick k experts of one cluster
    ids = np.stack([np.stack([rng.choice(clusters[rng.integers(len(clusters))], k, replace=False) for _ in range(n_tokens)])
                    for _ in range(2)])  # [L, T, k]
    load = np.stack([np.bincount(ids[l].ravel(), minlength=E) for l in range(2)])
    together = pair_counts(ids, ids, E)
    options = PlacementOptions(E, G, 1, R)
    mine = coactivation_placement(load, together, options)
    assert mine.physical_to_logical.tolist() == ref.coactivation(load.astype(float).tolist(), together.tolist(), E + R, G, SLACK)
    tokens = np.arange(n_tokens)
    gpus = {p.policy: np.array(per_token.fanout(p.physical_to_logical.tolist(), ids.tolist(), E, G, 1))[..., 0].mean()
            for p in (mine, place("eplb", load, options))}
    assert fanout(mine, ids, tokens)[0].mean() == pytest.approx(gpus["coactivation"])
    if n_tokens == 256:
        assert gpus["coactivation"] < gpus["eplb"]
