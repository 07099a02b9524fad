"""`capture --save-expert-norms`: per routing slot, ||output|| of the chosen expert alone, checked in NumPy.

The test's own pre-hook takes what each experts module received; each chosen expert's SwiGLU output is then
computed from the fused parameters by hand (float64) and its norm compared with the trace column.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moescope
from moescope.adapters.discover import find_moe_layers
from moescope.errors import MoescopeError

from tests.adapters.tiny_configs import build_tiny_model


def _experts_inputs(model, layers, ids, mask):
    seen = []
    handles = [model.get_submodule(layer.block_path).experts.register_forward_pre_hook(
        lambda m, args: seen.append((m, args[0].detach().double().numpy(), args[1].detach().numpy()))) for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _norms_by_hand(experts, x, ids) -> np.ndarray:
    """[N, k] ||down[e] @ (silu(gate[e] x) * up[e] x)|| for each slot's expert e."""
    gate_up = experts.gate_up_proj.detach().double().numpy()  # [E, 2I, H]
    down = experts.down_proj.detach().double().numpy()  # [E, H, I]
    h = np.einsum("eoh,nh->neo", gate_up, x)  # [N, E, 2I]
    gate, up = np.split(h, 2, axis=-1)
    act = gate / (1 + np.exp(-gate)) * up
    out = np.einsum("ehi,nei->neh", down, act)  # [N, E, H]
    norms = np.linalg.norm(out, axis=-1)  # [N, E]
    return np.take_along_axis(norms, ids.astype(np.int64), axis=-1)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_expert_norms_are_each_chosen_experts_output_norm(family, padded_batch, tmp_path):
    model = build_tiny_model(family)
    ids, mask = padded_batch
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(save_expert_norms=True, weights_dtype="float32"))
    shard = next(trace.shards())
    layers = find_moe_layers(model)
    keep = mask.reshape(-1).bool().numpy()
    assert shard.expert_norms.shape == shard.topk_ids.shape
    for layer, (experts, x, chosen) in zip(layers, _experts_inputs(model, layers, ids, mask)):
        expected = _norms_by_hand(experts, x, chosen)[keep]
        order_got = np.argsort(shard.topk_ids[layer.index], -1, kind="stable")  # align slots by expert id
        order_ref = np.argsort(chosen[keep], -1, kind="stable")
        np.testing.assert_allclose(np.take_along_axis(shard.expert_norms[layer.index], order_got, -1),
                                   np.take_along_axis(expected, order_ref, -1), rtol=1e-5)
    assert "expert_norms" in trace.sql("SELECT * FROM routing LIMIT 1").columns


def test_expert_norms_are_refused_where_experts_take_no_ids(tmp_path):
    model = build_tiny_model("llama4_text")
    ids = torch.randint(3, 256, (1, 5))
    with pytest.raises(MoescopeError, match="save-expert-norms"):
        moescope.capture(model, input_ids=ids, out=tmp_path / "t", progress=False,
                         options=moescope.CaptureOptions(save_expert_norms=True))
