"""Decode batches (moescope placement --decode-batch) against plain loops: requests, grouping by prefill
signature, distinct experts per batch, and the random expectation against every order enumerated."""

import itertools

import numpy as np
import pytest
from simulate_helpers import shards_of

from moescope.analysis.placement_decode import (
    collect_requests,
    decode_batch_frame,
    distinct_per_batch,
    expected_random_distinct,
    grouped_order,
)
from moescope.analysis.reference.rows import is_next_position, real, token_rows
from moescope.analysis.synthetic import SyntheticSpec

SPECS = {
    "k2": SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(1, 30), router_output=None, vocab_size=40,
                        generated_fraction=0.4),
    "long_k3_invalid": SyntheticSpec(n_layers=2, n_experts=7, top_k=3, seq_len=(40, 70), router_output=None, vocab_size=25,
                                     invalid_fraction=0.1, generated_fraction=0.3, output_entropy=False),
    "e256_k8": SyntheticSpec(n_layers=2, n_experts=256, top_k=8, seq_len=(1, 40), router_output=None, vocab_size=50,
                             generated_fraction=0.4),
}
LAYOUTS = {"one_token": [1], "seven_tokens": [7], "256_tokens_uneven": [100, 1, 7, 148]}


def plain_requests(shards, ctx):
    """[(signature set of (layer, expert), decode steps [[set per layer]])] of sequences with generated tokens."""
    sequences, prev = [], None
    for row in token_rows(shards):
        if not is_next_position(prev, row):
            sequences.append([])
        sequences[-1].append(row)
        prev = row
    out = []
    for rows in sequences:
        decode = [row for row in rows if row.generated]
        if not decode:
            continue
        signature = set()
        for layer in range(ctx.n_layers):
            used = {}
            for row in rows:
                if not row.generated:
                    for e in set(real(row.experts[layer], ctx.n_experts)):
                        used[e] = used.get(e, 0) + 1
            signature |= {(layer, e) for e in sorted(used, key=lambda e: (-used[e], e))[:ctx.top_k]}
        out.append((signature, [[set(real(row.experts[l], ctx.n_experts)) for l in range(ctx.n_layers)] for row in decode]))
    return out


def plain_group(signatures, batch):
    left, order = list(range(len(signatures))), []
    while left:
        seed = left.pop(0)
        chosen = sorted(left, key=lambda r: (-len(signatures[seed] & signatures[r]), r))[: batch - 1]
        left = [r for r in left if r not in chosen]
        order += [seed, *chosen]
    return order


def plain_distinct(requests, order, batch, L):
    totals, batches = [0] * L, 0
    for step in range(max(len(steps) for _, steps in requests)):
        alive = [r for r in order if step < len(requests[r][1])]
        for start in range(0, len(alive), batch):
            batches += 1
            for layer in range(L):
                totals[layer] += len(set().union(*(requests[r][1][step][layer] for r in alive[start:start + batch])))
    return totals, batches


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_grouped_batches_equal_the_plain_loops(spec_name, layout, batch):
    spec = SPECS[spec_name]
    shards = shards_of(spec, LAYOUTS[layout], seed=11)
    ctx = spec.context()
    requests = collect_requests(lambda: shards, ctx)
    expected = plain_requests(shards, ctx)
    assert len(requests.signature) == len(expected)
    for r, (signature, steps) in enumerate(expected):
        assert set(zip(*np.nonzero(requests.signature[r]))) == signature
        assert (requests.request == r).sum() == len(steps)
    if not expected:
        return
    order = grouped_order(requests.signature, batch)
    assert order.tolist() == plain_group([s for s, _ in expected], batch)
    table = decode_batch_frame(requests, batch, tuple(range(spec.n_layers)), spec.n_experts)
    totals, batches = plain_distinct(expected, order.tolist(), batch, spec.n_layers)
    grouped = table[table["batching"] == "grouped"]
    assert grouped["batches"].iloc[0] == batches
    assert grouped["mean_distinct_experts"].iloc[:-1].tolist() == pytest.approx([t / batches for t in totals], rel=1e-12)


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_the_random_expectation_equals_every_order_enumerated(batch):
    spec = SPECS["long_k3_invalid"]
    shards = shards_of(spec, [256], seed=3)
    ctx = spec.context()
    requests = collect_requests(lambda: shards, ctx)
    expected = plain_requests(shards, ctx)
    assert 3 <= len(expected) <= 7
    table = decode_batch_frame(requests, batch, tuple(range(spec.n_layers)), spec.n_experts)
    sums = np.zeros(spec.n_layers)
    orders = list(itertools.permutations(range(len(expected))))
    for order in orders:
        totals, batches = plain_distinct(expected, list(order), batch, spec.n_layers)
        sums += totals
    random = table[table["batching"] == "random"]
    assert random["batches"].iloc[0] == batches
    assert random["mean_distinct_experts"].iloc[:-1].tolist() == pytest.approx((sums / len(orders) / batches).tolist(), rel=1e-9)


def test_distinct_counts_and_expectation_agree_for_one_request_per_batch():
    """Batches of one: every order gives each token's own distinct experts, so random = grouped exactly."""
    spec = SPECS["e256_k8"]
    shards = shards_of(spec, [100, 1, 7, 148], seed=5)
    requests = collect_requests(lambda: shards, spec.context())
    got, batches = distinct_per_batch(requests, np.arange(len(requests.signature)), 1, spec.n_experts)
    expected, same = expected_random_distinct(requests, 1, spec.n_experts)
    assert batches == same == requests.ids.shape[1]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
