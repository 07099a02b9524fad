"""Cache-aware lossy routing (offload --lossy) against a per-event loop with an OrderedDict LRU, at awkward sizes."""

import itertools

import numpy as np
import pytest
from simulate_helpers import LAYOUTS, shards_of

from moescope.analysis.synthetic import SyntheticSpec
from moescope.errors import MoescopeError
from moescope.simulate.lossy import Knob, parse_knobs, simulate_lossy
from moescope.simulate.offload import OffloadOptions, simulate_trace
from moescope.simulate.reference import offload as reference

SPECS = {
    "k2_logits": SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(1, 30), router_output="logits", vocab_size=40,
                               generated_fraction=0.3),
    "k3_probs_invalid": SyntheticSpec(n_layers=2, n_experts=7, top_k=3, seq_len=(2, 20), router_output="probs",
                                      invalid_fraction=0.1, vocab_size=25, generated_fraction=0.2, output_entropy=False),
    "e256_k8": SyntheticSpec(n_layers=2, n_experts=256, top_k=8, seq_len=(1, 40), router_output="logits", vocab_size=50,
                             generated_fraction=0.4),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_knob_equals_the_per_event_loop(spec_name, layout):
    spec = SPECS[spec_name]
    ctx = spec.context()
    k, E, L = spec.top_k, spec.n_experts, spec.n_layers
    shards = shards_of(spec, LAYOUTS[layout], seed=len(layout) + 3)
    knobs = parse_knobs(f"drop-cold:0.5,drop-cold:1.5,topk:1,topk:{k - 1},rerank:0.5,rerank:3")
    capacities = (k, 2 * k + 1)
    counts, fetched = simulate_lossy(lambda: shards, ctx, knobs, capacities)
    for (a, knob), (c, capacity) in itertools.product(enumerate(knobs), enumerate(capacities)):
        expected = reference.compute_lossy(shards, ctx, knob=knob.kind, value=knob.value, capacity=capacity)
        where = f"{knob.label} C={capacity}"
        mine = np.zeros((2, L, 5))
        for (phase, layer), values in expected["counts"].items():
            mine[phase, layer] = values
        np.testing.assert_array_equal(counts[a, c, ..., :4], mine[..., :4], err_msg=where)
        np.testing.assert_allclose(counts[a, c, ..., 4], mine[..., 4], rtol=1e-9, atol=1e-12, err_msg=where)
        moved = np.zeros((2, L, E), np.int64)
        for (phase, layer, expert), n in expected["fetched"].items():
            moved[phase, layer, expert] = n
        np.testing.assert_array_equal(fetched[a, c], moved, err_msg=where)


def test_the_lossless_knob_is_the_lru_simulator():
    """Knob "lru" (what every lossy row is compared with) hits exactly as simulate/lru.py's engine."""
    spec = SPECS["e256_k8"]
    shards = shards_of(spec, LAYOUTS["256_tokens_uneven"], seed=1)
    counts, _ = simulate_lossy(lambda: shards, spec.context(), (Knob("lru"),), (8, 17))
    state = simulate_trace(lambda: shards, spec.context(), OffloadOptions((8, 17), ("lru",), ("none",), "layer"))
    np.testing.assert_array_equal(counts[0, :, :, :, 2], state.counts[0, 0, :, :, :, 1])
    np.testing.assert_array_equal(counts[0, :, :, :, 0], state.counts[0, 0, :, :, :, 0])


def test_lossy_knobs_trade_weight_for_hits():
    spec = SPECS["k2_logits"]
    shards = shards_of(spec, LAYOUTS["256_tokens_uneven"], seed=2)
    knobs = parse_knobs("drop-cold:1,topk:1,rerank:100")
    counts, _ = simulate_lossy(lambda: shards, spec.context(), knobs, (2,))
    rate = counts[:, 0, :, :, 2].sum(axis=(1, 2)) / counts[:, 0, :, :, 1].sum(axis=(1, 2))
    discarded = counts[:, 0, :, :, 4].sum(axis=(1, 2))
    assert discarded[0] == 0 and (discarded[1:] > 0).all()
    assert (rate[1:] > rate[0]).all()  # each knob buys hits with router weight


@pytest.mark.parametrize("text, message", [("", "names no knob"), ("skip:1", "unknown knob"), ("topk:x", "needs a number"),
                                           ("topk:nan", "finite")])
def test_bad_knobs_are_refused(text, message):
    with pytest.raises(MoescopeError, match=message):
        parse_knobs(text)


def test_knob_values_are_checked_against_the_model():
    with pytest.raises(MoescopeError, match="from 1 to 1"):
        Knob("topk", 2).check(top_k=2, has_router=True)
    with pytest.raises(MoescopeError, match="--save-logits"):
        Knob("rerank", 1).check(top_k=2, has_router=False)
    with pytest.raises(MoescopeError, match="positive"):
        Knob("drop-cold", 0).check(top_k=2, has_router=True)
