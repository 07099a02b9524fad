"""A hand-written reference for DeepSeek-V3's bias-corrected, group-limited router (noaux_tc), one token at a
time in plain Python, against moescope's trace of tiny DeepSeek-V3 and GLM-4.5 models.

No RouterSpec, no policy table: the router's input comes from the test's own hook, its weight and correction
bias from the module, n_group / topk_group / norm_topk_prob / routed_scaling_factor from the config.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moescope

from .test_first_choice import uneven_batch
from .tiny_configs import build_tiny_model


def noaux_tc(x: list[float], weight: list[list[float]], bias: list[float], *, n_group: int, topk_group: int,
             top_k: int, norm_topk_prob: bool, routed_scaling_factor: float) -> list[tuple[int, float]]:
    """(expert, gate weight) pairs one token is routed to, largest weight first (lower id on ties).

    scores = sigmoid(W x); experts are chosen on scores + bias, among the topk_group groups whose two best
    biased scores sum highest; the weights are the unbiased scores, renormalised, times the scaling factor.
    """
    scores = [1.0 / (1.0 + math.exp(-sum(w * v for w, v in zip(row, x)))) for row in weight]
    biased = [s + b for s, b in zip(scores, bias)]
    size = len(scores) // n_group
    group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
    candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda e: (-biased[e], e))[:top_k]
    weights = [scores[e] for e in chosen]
    if norm_topk_prob:
        total = sum(weights) + 1e-20
        weights = [w / total for w in weights]
    pairs = [(e, w * routed_scaling_factor) for e, w in zip(chosen, weights)]
    return sorted(pairs, key=lambda p: (-p[1], p[0]))


def _routers_and_inputs(model, ids, mask) -> list[tuple[torch.nn.Module, np.ndarray]]:
    """Every top-k router module and the hidden states it received (the test's own pre-hooks)."""
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    inputs, handles = {}, []
    try:
        for router in routers:
            handles.append(router.register_forward_pre_hook(
                lambda m, args: inputs.__setitem__(id(m), args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy())))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return [(router, inputs[id(router)]) for router in routers]


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_hand_written_noaux_tc_reference_equals_the_trace(family, tmp_path):
    model = build_tiny_model(family)
    config = model.config
    assert config.n_group > 1 and config.topk_group < config.n_group, "group limits must bite"
    ids, mask = uneven_batch()
    keep = mask.reshape(-1).bool().numpy()
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(weights_dtype="float32"))
    shard = next(trace.shards())
    pairs = _routers_and_inputs(model, ids, mask)
    assert len(pairs) == shard.n_layers
    biased_differs = 0
    for layer, (router, x) in enumerate(pairs):
        weight = router.weight.detach().double().tolist()
        bias = router.e_score_correction_bias.detach().double().tolist()
        assert np.abs(bias).max() > 0.1, "a zero correction bias would not test it"
        for t, row in enumerate(x[keep]):
            want = noaux_tc(row.tolist(), weight, bias, n_group=config.n_group, topk_group=config.topk_group,
                            top_k=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
                            routed_scaling_factor=config.routed_scaling_factor)
            assert shard.topk_ids[layer, t].tolist() == [e for e, _ in want], f"layer {layer} token {t}"
            np.testing.assert_allclose(shard.topk_weights[layer, t], [w for _, w in want], rtol=1e-5)
            plain = sorted(range(len(weight)), key=lambda e: -sum(w * v for w, v in zip(weight[e], row)))[:2]
            biased_differs += sorted(plain) != sorted(e for e, _ in want)
    assert biased_differs > 0, "bias and groups never changed a choice: the reference is not exercised"
