"""Tiny random-initialised configs for every MoE family transformers ships.

`tiny_config(model_type)` starts from the family's own config class with generic small sizes
(hidden 64, 4 layers, 8 experts, top-2, vocab 256, fp32) applied to the fields that class has, then
the family's entry in `OVERRIDES` — declared as data, one dict per family — fixes what the generic
sizes break (MLA head dims, hybrid layer patterns, indexer sizes, top-1-only routers...).
Sizes are passed to the config constructor, so derived per-layer lists (layer_types,
mlp_layer_types) are computed for the tiny depth rather than truncated.

`build_tiny_model` turns a config into an eval-mode model with a fixed seed, and
`randomize_routers` gives every router non-degenerate weights: many routers are zero-initialised,
which makes every score tie and any comparison of expert choices meaningless.
"""

from __future__ import annotations

import re

import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

SEED = 0

# Applied to every family whose config class has the field (directly or through attribute_map).
GENERIC: dict[str, object] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k_experts": 2,
    "n_shared_experts": 2,  # != 1, so a shared-expert count read from the wrong attribute shows
    "num_shared_experts": 2,
    "first_k_dense_replace": 1,  # one dense layer first: MoE-layer index != decoder-layer index
    "n_group": 4,  # 8 experts in 4 groups of 2, keep the best 2 groups: group limits really bite
    "topk_group": 2,
    "routed_scaling_factor": 2.5,  # != 1 so a missing or doubled scaling shows
    "sliding_window": 16,
    "linear_num_key_heads": 2,  # gated-delta-net / linear-attention layers of hybrid families
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "tie_word_embeddings": False,
    "use_cache": False,
}

# DeepSeek-style multi-head latent attention: small LoRA ranks and head dims that fit hidden 64.
_MLA = {
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "num_key_value_heads": 4,
}

# Separate sliding-window attention sizes (Inkling).
_SWA = {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16}

# Per-family fixes, as data. Keys are model_types; values are constructor kwargs (a dict for a sub-config
# such as DBRX's `ffn_config` / `attn_config` is passed as that sub-config's kwargs).
OVERRIDES: dict[str, dict[str, object]] = {
    "afmoe": {"route_scale": 1.7, "num_dense_layers": 1},
    "aria_text": {"moe_num_shared_experts": 2},
    "axk1": {**_MLA},
    "axk2": {
        **_MLA, "topk_group": 1,  # 2 candidates for top-2: dropped experts (score 0.0) can win
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
    },
    "bailing_hybrid": {
        **_MLA,
        "linear_head_dim": 16, "linear_num_heads": 4,
    },
    "beam": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "cohere2_moe": {"num_shared_experts": 1, "prefix_dense_intermediate_size": 128},
    "dbrx": {
        "d_model": 64, "n_heads": 4, "n_layers": 4, "max_seq_len": 128, "vocab_size": 256,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2, "hidden_size": 64},
    },
    "deepseek_v2": {
        **_MLA,
        "topk_method": "group_limited_greedy",
    },
    "deepseek_v3": {**_MLA},
    "deepseek_v32": {
        **_MLA,
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
    },
    "deepseek_v4": {
        "q_lora_rank": 32, "o_lora_rank": 32, "o_groups": 2, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
    },
    "dots1": {},
    "doge": {"num_experts": 16},  # product-key routing needs a perfect square; UNSUPPORTED, built for inspect tests
    "dots3_note_text": {
        **_MLA, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4, "shared_experts_intermediate_size": 32,
        "use_sliding_window": False,
    },
    "ernie4_5_moe": {"moe_num_shared_experts": 2},
    "exaone_moe": {},
    "flex_olmo": {},
    "flint": {"mlp_only_layers": [0]},
    "gemma4_text": {
        "enable_moe_block": True, "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16,
        "global_head_dim": 16,
    },
    "glm4_moe": {},
    "glm4_moe_lite": {**_MLA},
    "glm_moe_dsa": {
        **_MLA,
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
    },
    "gpt_oss": {},
    "granitemoe": {},
    "granitemoe_swa": {},
    "granitemoehybrid": {
        "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 8,
        "shared_intermediate_size": 32,
    },
    "granitemoeshared": {},
    "hunyuan_v1_moe": {},
    "hy_v3": {"router_scaling_factor": 1.7},
    "hy_v4": {**_MLA, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
    "inkling_text": {**_SWA, "route_scale": 2.0},
    "inkling2_text": {**_SWA},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "jetmoe": {"kv_channels": 16},
    "kimi_linear": {**_MLA, "linear_head_dim": 16, "linear_num_heads": 4},
    "kolibri1": {},
    "laguna": {"moe_routed_scaling_factor": 1.7, "moe_router_logit_softcapping": 3.0},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "llama4_text": {"interleave_moe_layer_step": 2, "intermediate_size_mlp": 128},
    "longcat_flash": {
        **_MLA, "head_dim": 8, "num_layers": 2, "ffn_hidden_size": 64, "zero_expert_num": 2,
        "expert_ffn_hidden_size": 32,
    },
    "mellum": {},
    "mimo_v2_flash": {},
    "minimax": {},
    "minimax_m2": {},
    "minimax_m3_vl_text": {
        "routed_scaling_factor": 1.7, "dense_intermediate_size": 128, "shared_intermediate_size": 32,
        "index_n_heads": 2, "index_head_dim": 16,
    },
    "mixtral": {},
    "nemotron_h": {
        "hybrid_override_pattern": "ME*E",  # Mamba, MoE, attention, MoE
        "ssm_state_size": 16, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2,
        "chunk_size": 8, "moe_shared_expert_intermediate_size": 32,
    },
    "olmoe": {},
    "phimoe": {},
    "qwen2_moe": {},
    "qwen3_5_moe_text": {},
    "qwen3_moe": {},
    "qwen3_next": {},
    "qwen4_exp_text": {
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 4, "hc_lowrank": 16,
    },
    "solar_open": {},
    "zaya": {"router_hidden_size": 32, "num_experts_per_tok": 1},  # ZAYA validates top-1 only
}

# Text decoders of multimodal MoE families that have no causal LM: built as their base text model
# (no LM head, so `model(...)` returns hidden states, not logits).
TEXT_DECODER_OVERRIDES: dict[str, dict[str, object]] = {
    "deepseek_ocr2_text": {
        "topk_method": "group_limited_greedy", "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    },
    "ernie4_5_vl_moe_text": {
        "moe_intermediate_size": [32, 32], "moe_num_shared_experts": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},  # head_dim 16
    },
    "glm4v_moe_text": {
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
        },
    },
    "glm5_next_text": {
        **_MLA, "qk_rope_head_dim": 0, "qk_nope_head_dim": 16,  # DSA layers are NoPE
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 16, "linear_head_dim": 16, "linear_num_heads": 4,
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    },
    "mistral4": {**_MLA},
    "mistral_large4_text": {**_MLA, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
    "muse_spark_text": {"moe_hidden_size": 32},
    "qwen3_omni_moe_text": {},
    "qwen3_vl_moe_text": {},
    "step3p5": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "unlimited_ocr_text": {"topk_method": "group_limited_greedy", "num_key_value_heads": 4},
}

# Model classes for text decoders that no Auto class maps (model_type -> transformers class name).
TEXT_MODEL_CLASSES: dict[str, str] = {
    "deepseek_ocr2_text": "DeepseekOcr2TextModel",
    "ernie4_5_vl_moe_text": "Ernie4_5_VLMoeTextModel",
    "qwen3_omni_moe_text": "Qwen3OmniMoeThinkerTextModel",
    "step3p5": "Step3p7TextModel",
    "unlimited_ocr_text": "UnlimitedOcrTextModel",
}

# Every model_type in transformers 5.23 whose AutoModelForCausalLM is a mixture of experts, at the
# level of its text decoder (see COMPOSITE_TEXT_TYPES for the multimodal wrappers around some of them).
CAUSAL_MOE_FAMILIES: list[str] = sorted(OVERRIDES)
MULTIMODAL_TEXT_FAMILIES: list[str] = sorted(TEXT_DECODER_OVERRIDES)

# Composite (multimodal) model_types whose MoE decoder is built, with the same classes, from the text
# sub-config of the type on the right. Some load with AutoModelForCausalLM (gemma4, llama4, qwen3_5_moe,
# qwen4_exp, dots3_note), the others only through their own multimodal class.
COMPOSITE_TEXT_TYPES: dict[str, str] = {
    "aria": "aria_text",
    "deepseek_ocr2": "deepseek_ocr2_text",
    "dots3_note": "dots3_note_text",
    "ernie4_5_vl_moe": "ernie4_5_vl_moe_text",
    "gemma4": "gemma4_text",
    "glm4v_moe": "glm4v_moe_text",
    "glm5_next": "glm5_next_text",
    "inkling_mm_model": "inkling_text",
    "inkling2": "inkling2_text",
    "llama4": "llama4_text",
    "minimax_m3_vl": "minimax_m3_vl_text",
    "mistral_large4": "mistral_large4_text",
    "muse_spark": "muse_spark_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen3_omni_moe": "qwen3_omni_moe_text",
    "qwen3_omni_moe_thinker": "qwen3_omni_moe_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text",
    "qwen4_exp": "qwen4_exp_text",
    "step3p7": "step3p5",
    "unlimited_ocr": "unlimited_ocr_text",
}


def _config_fields(cls: type) -> set[str]:
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    return fields | set(getattr(cls, "attribute_map", {}))


def _kwargs_for(cls: type, overrides: dict[str, object]) -> dict[str, object]:
    fields = _config_fields(cls)
    kwargs = {k: v for k, v in GENERIC.items() if k in fields}
    for name, small_id in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        spec = getattr(cls, "__dataclass_fields__", {}).get(name)
        if spec is not None and spec.default is not None:
            kwargs[name] = small_id  # many families default to ids far beyond the tiny vocab
    kwargs.update(overrides)
    return kwargs


def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny fp32 config of `model_type`, a causal-LM family or a multimodal family's text decoder."""
    overrides = OVERRIDES.get(model_type, TEXT_DECODER_OVERRIDES.get(model_type))
    if overrides is None:
        known = ", ".join(CAUSAL_MOE_FAMILIES + MULTIMODAL_TEXT_FAMILIES)
        raise KeyError(f"no tiny config declared for {model_type!r}; known: {known}")
    cls = CONFIG_MAPPING[model_type]
    config = cls(**_kwargs_for(cls, overrides))
    config._attn_implementation = "eager"
    return config


def build_tiny_model(model_type: str, seed: int = SEED) -> nn.Module:
    """Eval-mode fp32 tiny model of `model_type`, random-initialised with a fixed seed, routers randomised."""
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    elif model_type in TEXT_MODEL_CLASSES:
        model = getattr(transformers, TEXT_MODEL_CLASSES[model_type])._from_config(config, dtype=torch.float32)
    else:
        model = AutoModel.from_config(config, dtype=torch.float32)
    model.eval()
    randomize_routers(model, seed)
    return model


# Router modules (by class name) and the selection-only tensors that ship zero-initialised.
_ROUTER_CLASS = re.compile(r"(Router|Gate|TopKGating)$")
_BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")


def randomize_routers(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Give every router non-degenerate weights, in place, from a fixed seed.

    Matrices get std 1.5/sqrt(fan_in), so logits spread with std ~1.5 on unit-RMS inputs: far beyond
    float32 ties, yet not saturated, so that sigmoid scores stay distinguishable. Linear biases and
    correction biases get std 0.3 — comparable to the gaps between scores, so a bias changes the
    selection of many tokens (a reference that ignored it would fail). Learned scales (Gemma4's
    scale/per_expert_scale, Inkling's global_scale) get 1 +- 0.3, kept positive. DeepSeek-V4's
    token->experts hash table gets k distinct random experts per token id.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if _ROUTER_CLASS.search(type(module).__name__):
                for name, param in module.named_parameters():
                    if param.dim() >= 2:
                        param.copy_(torch.randn(param.shape, generator=g) * 1.5 / param.shape[-1] ** 0.5)
                    elif name.endswith("bias"):
                        param.copy_(torch.randn(param.shape, generator=g) * 0.3)
                    elif "scale" in name:
                        param.copy_((1 + 0.3 * torch.randn(param.shape, generator=g)).abs())
                table = getattr(module, "tid2eid", None)
                if isinstance(table, torch.Tensor):
                    n_experts = module.weight.shape[0]
                    rows = [torch.randperm(n_experts, generator=g)[: table.shape[1]] for _ in range(table.shape[0])]
                    table.copy_(torch.stack(rows))
            for name in _BIAS_NAMES:
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
            if isinstance(getattr(module, "balancing_biases", None), torch.Tensor):
                module.balancing_biases[-1] = 0.4  # ZAYA's last class is the no-compute skip: make some tokens skip
    return model


# Families that build as tiny models but that no capture can record yet: the one list every family test uses.
NOT_CAPTURED = {"ernie4_5_vl_moe_text": "vision expert blocks never run on text input"}
