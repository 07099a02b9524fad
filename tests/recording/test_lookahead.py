"""`--predict-next-layer` records what layer N+1 would choose if fed layer N's router input — by its own policy.

Independent check: the test's own pre-hooks take every router's input during a plain forward pass; then
the next layer's MoE block itself is run on that input (Gemma-4: its router, whose block is the whole
decoder layer), and the ids its experts module receives are what the trace's prediction must hold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moescope
from moescope.adapters.discover import find_moe_layers
from moescope.adapters.policy import layer_policy
from moescope.errors import MoescopeError

from tests.adapters.test_policy import _biased_deepseek_v3
from tests.adapters.test_reference_routing import TESTED
from tests.adapters.tiny_configs import build_tiny_model


def _batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _router_inputs(model, layers, ids, mask) -> list[torch.Tensor]:
    inputs = {}

    def keep_input(i):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    handles = []
    for layer in layers:
        router = model.get_submodule(layer.block_path).get_submodule(layer.spec.router_attr)
        handles.append(router.register_forward_pre_hook(keep_input(layer.index), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return [inputs[layer.index] for layer in layers]


def _chosen_by_block(model, layer, x, input_ids) -> torch.Tensor:
    """ids [N, k] layer `layer` chooses when its block (Gemma-4: its router) is fed x."""
    block = model.get_submodule(layer.block_path)
    if layer.spec.family == "gemma4_text":
        with torch.no_grad():
            return block.router(x)[2]
    if x.dim() == 2:  # the router saw the flattened tokens; the block takes [B, T, H]
        x, input_ids = x[None], input_ids.reshape(1, -1)
    got = []
    handle = block.experts.register_forward_pre_hook(lambda m, args: got.append(args[1].reshape(-1, args[1].shape[-1])))
    try:
        with torch.no_grad():
            block(x, input_ids) if getattr(block, "is_hash", None) is not None else block(x)
    finally:
        handle.remove()
    return got[0]


def _captured(model, tmp_path):
    """(shard with predictions, MoE layers, every router's input, real-token mask) for one padded batch."""
    ids, mask = _batch()
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(predict_next_layer=True))
    layers = find_moe_layers(model)
    return next(trace.shards()), layers, _router_inputs(model, layers, ids, mask), mask.reshape(-1).bool()


FAMILIES = ["afmoe", "hy_v3", "minimax_m2", "lfm2_moe", "deepseek_v4", "gemma4_text", "deepseek_v3-biased"]


@pytest.mark.parametrize("family", FAMILIES)
def test_prediction_is_what_the_next_layer_chooses_on_this_layers_input(family, tmp_path):
    model = _biased_deepseek_v3() if family == "deepseek_v3-biased" else build_tiny_model(family)
    shard, layers, inputs, keep = _captured(model, tmp_path)
    ids = _batch()[0]
    for n in range(len(layers) - 1):
        expected = _chosen_by_block(model, layers[n + 1], inputs[n], ids)[keep].sort(-1).values.numpy()
        got = np.sort(shard.predicted_next_ids[n], -1)
        np.testing.assert_array_equal(got, expected, err_msg=f"{family}: prediction of MoE layer {n + 1}")
    assert (shard.predicted_next_ids[-1] == -1).all()


def test_the_biased_case_differs_from_raw_top_k():
    """In the biased DeepSeek-V3 the old rule (top-k of the next router's raw logits) is wrong on most tokens."""
    model = _biased_deepseek_v3()
    ids, mask = _batch()
    layers = find_moe_layers(model)
    inputs = _router_inputs(model, layers, ids, mask)
    nxt = model.get_submodule(layers[2].block_path).gate
    with torch.no_grad():
        raw = torch.nn.functional.linear(inputs[1].reshape(-1, inputs[1].shape[-1]), nxt.weight).topk(2).indices
    chosen = _chosen_by_block(model, layers[2], inputs[1], ids)
    assert (raw.sort(-1).values != chosen.sort(-1).values).any(-1).float().mean() > 0.5


def test_a_router_that_reads_another_layers_state_is_refused_in_one_line(tmp_path):
    model = build_tiny_model("zaya")
    with pytest.raises(MoescopeError, match="cannot predict MoE layer 1 .zaya.: its router also takes router_states"):
        _captured(model, tmp_path)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


REFUSED = {"zaya": "router_states"}  # the only family whose router reads more than the hidden state and token ids


@pytest.mark.parametrize("family", [f for f in TESTED if f != "ernie4_5_vl_moe_text"])
def test_every_family_predicts_by_the_next_layers_policy_or_refuses_in_one_line(family, tmp_path):
    """With test_policy (the policy equals the model for every family), this covers every family's prediction."""
    model = build_tiny_model(family)
    if family in REFUSED:
        with pytest.raises(MoescopeError, match=REFUSED[family]):
            _captured(model, tmp_path)
        return
    shard, layers, inputs, keep = _captured(model, tmp_path)
    ids = _batch()[0]
    for n in range(len(layers) - 1):
        policy = layer_policy(model, layers[n + 1])
        handed = {"input_ids": ids if inputs[n].dim() == 3 else ids.reshape(-1)} if policy.needs else {}
        expected = policy.route(inputs[n], **handed)[0][keep].sort(-1).values.numpy()
        np.testing.assert_array_equal(np.sort(shard.predicted_next_ids[n], -1), expected, err_msg=f"{family} layer {n + 1}")
