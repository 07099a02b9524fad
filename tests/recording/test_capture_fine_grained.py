"""Capture at a fine-grained shape (DeepSeek-V3: 256 routed experts in 8 groups, top-8, correction bias): the trace
holds exactly the experts and weights DeepSeek-V3's router picks, recomputed here in plain torch (float64) from the
hidden states entering each MoE block, at 1, 7 and 256 tokens, over several batches and shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moescope

EXPERTS, TOP_K, GROUPS, TOPK_GROUP, HIDDEN, SCALE = 256, 8, 8, 4, 32, 2.5


@pytest.fixture(scope="module")
def deepseek_v3():
    """3 decoder layers (the first dense): 2 MoE layers; routers and correction biases randomised, so the groups
    and the bias decide many choices."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=8, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, n_group=GROUPS,
        topk_group=TOPK_GROUP, n_shared_experts=1, routed_scaling_factor=SCALE, norm_topk_prob=True,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=512, tie_word_embeddings=False, use_cache=False,
        pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in _moe_blocks(model):
            block.gate.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=g) * 1.5 / HIDDEN**0.5)
            block.gate.e_score_correction_bias.copy_(torch.randn(EXPERTS, generator=g) * 0.3)
    return model


def _moe_blocks(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV3MoE"]


def _block_inputs(model, ids, mask) -> list[torch.Tensor]:
    """The hidden states entering each MoE block [B*T, H], from plain pre-hooks of this test's own."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, HIDDEN)))
               for b in _moe_blocks(model)]
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _deepseek_v3_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """DeepSeek-V3's selection written out in float64: sigmoid scores; the bias steers the choice only; keep the
    TOPK_GROUP groups whose best two biased scores sum highest; the top-k biased scores within them; weights
    are the unbiased scores of the chosen experts, renormalised and scaled. Returns (ids [N, k] ascending,
    weights [N, k], margin [N]: how far the choice is from a tie, in biased score)."""
    scores = torch.sigmoid(x.double() @ weight.double().T)  # [N, E]
    biased = scores + bias.double()
    per_group = biased.reshape(len(x), GROUPS, EXPERTS // GROUPS)
    group_score = per_group.topk(2, dim=-1).values.sum(-1)  # [N, G]
    ranked_groups = group_score.sort(dim=-1, descending=True).values
    kept = group_score.topk(TOPK_GROUP, dim=-1).indices  # [N, TOPK_GROUP]
    allowed = torch.zeros(len(x), GROUPS, dtype=torch.bool).scatter_(1, kept, True)
    allowed = allowed.repeat_interleave(EXPERTS // GROUPS, dim=1)  # [N, E]
    candidates = biased.masked_fill(~allowed, -torch.inf)
    ranked = candidates.sort(dim=-1, descending=True)
    ids = ranked.indices[:, :TOP_K].sort(dim=-1).values
    chosen = scores.gather(1, ids)
    weights = chosen / chosen.sum(-1, keepdim=True) * SCALE
    margin = torch.minimum(ranked.values[:, TOP_K - 1] - ranked.values[:, TOP_K],
                           ranked_groups[:, TOPK_GROUP - 1] - ranked_groups[:, TOPK_GROUP])
    return ids, weights, margin


def _batch(n_tokens: int):
    """n_tokens real tokens in two right-padded rows (one row for a single token)."""
    lengths = [n_tokens] if n_tokens == 1 else [n_tokens - n_tokens // 2, n_tokens // 2]
    g = torch.Generator().manual_seed(n_tokens)
    ids = torch.randint(3, 128, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("n_tokens", [1, 7, 256])
def test_capture_at_256_experts_top_8_equals_deepseek_v3_routing_of_the_experts_inputs(deepseek_v3, n_tokens, tmp_path):
    ids, mask = _batch(n_tokens)
    # one sequence per batch, and the last batch is a shard of its own (encoded after the last forward, alone): one
    # shard of one batch for 1 token, two of one batch each for 7 and 256 (where a 128-token sequence fills a shard)
    options = moescope.CaptureOptions(batch_size=1, shard_tokens=100, weights_dtype="float32")
    trace = moescope.capture(deepseek_v3, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=options)
    shards = list(trace.shards())
    assert len(shards) == (1 if n_tokens == 1 else 2)
    got_ids = np.concatenate([s.topk_ids for s in shards], axis=1)  # [L, n, k]
    got_w = np.concatenate([s.topk_weights for s in shards], axis=1)
    assert got_ids.shape == (2, n_tokens, TOP_K)

    keep = mask.reshape(-1).bool()
    for layer, (x, block) in enumerate(zip(_block_inputs(deepseek_v3, ids, mask), _moe_blocks(deepseek_v3))):
        ref_ids, ref_w, margin = (t[keep] for t in _deepseek_v3_route(x, block.gate.weight.detach(),
                                                                      block.gate.e_score_correction_bias))
        clear = (margin > 1e-5).numpy()  # float32 and float64 may order a near-tie differently
        assert clear.mean() > 0.95, f"layer {layer}: too many near-ties for the check to mean anything"
        order = np.argsort(got_ids[layer], -1)
        np.testing.assert_array_equal(np.take_along_axis(got_ids[layer], order, -1)[clear], ref_ids.numpy()[clear])
        np.testing.assert_allclose(np.take_along_axis(got_w[layer], order, -1)[clear], ref_w.numpy()[clear], rtol=2e-6)
        # slot 0 is the first choice: weights descend within each row
        assert (np.diff(got_w[layer], axis=-1) <= 0).all()

    rows = torch.nonzero(mask)  # the real tokens only, in (sequence, position) order
    tokens = np.concatenate([s.token_id for s in shards])
    assert np.concatenate([s.seq_id for s in shards]).tolist() == rows[:, 0].tolist()
    assert np.concatenate([s.pos for s in shards]).tolist() == rows[:, 1].tolist()
    assert tokens.tolist() == ids[mask.bool()].tolist()


def test_capture_at_256_experts_stores_float16_rounded_weights_and_the_same_choices(deepseek_v3, tmp_path):
    """The default float16 weights: the same experts as a float32 capture, each weight the float32 one rounded."""
    ids, mask = _batch(7)
    wide = moescope.capture(deepseek_v3, input_ids=ids, attention_mask=mask, out=tmp_path / "f32", progress=False,
                            options=moescope.CaptureOptions(weights_dtype="float32"))
    narrow = moescope.capture(deepseek_v3, input_ids=ids, attention_mask=mask, out=tmp_path / "f16", progress=False)
    a, b = next(wide.shards()), next(narrow.shards())
    order_a, order_b = np.argsort(a.topk_ids, -1), np.argsort(b.topk_ids, -1)
    np.testing.assert_array_equal(np.take_along_axis(a.topk_ids, order_a, -1), np.take_along_axis(b.topk_ids, order_b, -1))
    np.testing.assert_array_equal(np.take_along_axis(a.topk_weights, order_a, -1).astype(np.float16).astype(np.float32),
                                  np.take_along_axis(b.topk_weights, order_b, -1))
