"""The four shipped architectures as configs: one set of sizes, so the models differ only where meant to.

All share hidden size, depth, vocabulary and tied embeddings. Per token, each runs
`TOP_K * MOE_INTERMEDIATE = DENSE_INTERMEDIATE` SwiGLU channels per layer on average:
tiny-moe picks 2 of 8 experts of 256, tiny-dense has one MLP of 512, and tiny-varmoe picks 2 of
4 x 448 + 4 x 64 (its per-token cost depends on where the router sends the token; the total expert
parameters equal tiny-moe's). tiny-dsv3 is DeepSeek-V3 in miniature: multi-head latent attention,
a dense first layer (MLP 512), then MoE layers of 16 fine-grained experts of 128 (the same expert
parameters per layer as tiny-moe) scored by a sigmoid, selected on bias-corrected scores within the
best 2 of 4 groups, top-3, plus one always-on shared expert of 128: 3 x 128 + 128 = 512 channels.
"""

from __future__ import annotations

from moescope.models.varmoe import VarMoeConfig

HIDDEN = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
N_EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE = 256
DENSE_INTERMEDIATE = TOP_K * MOE_INTERMEDIATE  # same active MLP parameters per token as tiny-moe
VAR_EXPERT_SIZES = (448, 448, 448, 448, 64, 64, 64, 64)  # sums to N_EXPERTS * MOE_INTERMEDIATE
AUX_LOSS_COEF = 0.02  # Mixtral's router_aux_loss_coef (transformers scale: top_k when uniform)
DSV3_EXPERTS, DSV3_TOP_K, DSV3_INTERMEDIATE = 16, 3, 128  # 16 x 128 = N_EXPERTS * MOE_INTERMEDIATE
DSV3_GROUPS, DSV3_TOPK_GROUPS, DSV3_SHARED = 4, 2, 1  # group-limited: top-3 among the best 2 of 4 groups
MAX_POSITIONS = 2048
ROPE_THETA = 10000.0


def _common(vocab_size: int, special: dict[str, int]) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        **special,
    )


def build_config(name: str, vocab_size: int, special: dict[str, int]):
    """Config of shipped model `name`; `special` holds bos/eos/pad token ids."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = _common(vocab_size, special)
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    if name == "tiny-moe":
        return Qwen3MoeConfig(
            **common,
            rope_parameters=rope,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=MOE_INTERMEDIATE,
            intermediate_size=DENSE_INTERMEDIATE,  # unused: every layer is MoE
            norm_topk_prob=True,
            output_router_logits=False,  # training asks for them per call
            router_aux_loss_coef=AUX_LOSS_COEF,
        )
    if name == "tiny-dense":
        return Qwen3Config(**common, rope_parameters=rope, intermediate_size=DENSE_INTERMEDIATE)
    if name == "tiny-varmoe":
        return VarMoeConfig(
            **common,
            rope_theta=ROPE_THETA,
            expert_sizes=VAR_EXPERT_SIZES,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            router_aux_loss_coef=AUX_LOSS_COEF,
        )
    if name == "tiny-dsv3":
        from transformers import DeepseekV3Config

        common.pop("head_dim")  # MLA sizes its heads itself, and every query head has its own key/value head
        common["num_key_value_heads"] = HEADS
        return DeepseekV3Config(
            **common,
            rope_parameters=rope,
            rope_interleave=True,
            q_lora_rank=None,  # queries projected directly; keys/values through a 64-wide latent
            kv_lora_rank=64,
            qk_nope_head_dim=HEAD_DIM,
            qk_rope_head_dim=HEAD_DIM // 2,
            v_head_dim=HEAD_DIM,
            intermediate_size=DENSE_INTERMEDIATE,  # the dense first layer
            first_k_dense_replace=1,
            n_routed_experts=DSV3_EXPERTS,
            num_experts_per_tok=DSV3_TOP_K,
            moe_intermediate_size=DSV3_INTERMEDIATE,
            n_shared_experts=DSV3_SHARED,
            n_group=DSV3_GROUPS,
            topk_group=DSV3_TOPK_GROUPS,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            num_nextn_predict_layers=0,
        )
    raise ValueError(f"unknown shipped model {name!r}")
