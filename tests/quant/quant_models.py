"""Tiny models for the quant tests, built from configs (no hub, no checkpoints), and a byte tokenizer."""

from __future__ import annotations

import random

import pytest
import torch

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0)


def _randomize_routers(model, std=0.5):
    """Routers start at zero in several families: give them real, tie-free preferences."""
    for name, param in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2 and param.shape[0] > 1:
            torch.nn.init.normal_(param, std=std)
    return model


def build(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return _randomize_routers(AutoModelForCausalLM.from_config(config).eval())


def qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig

    return build(Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True), seed)


def qwen3_dense(seed: int = 0):
    from transformers import Qwen3Config

    return build(Qwen3Config(**COMMON, head_dim=16, intermediate_size=128), seed)


def qwen2_moe(seed: int = 0):  # shared expert (+ shared-expert gate)
    from transformers import Qwen2MoeConfig

    return build(Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2), seed)


def gpt_oss(seed: int = 0):  # fused experts stored transposed, with biases
    from transformers import GptOssConfig

    return build(GptOssConfig(**COMMON, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2), seed)


def varmoe(seed: int = 0):  # per-expert nn.Linear modules behind a plain Linear router (custom-router capture)
    from moescope.models.varmoe import VarMoeConfig, VarMoeForCausalLM

    torch.manual_seed(seed)
    config = VarMoeConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, expert_sizes=(48, 48, 16, 16))
    return _randomize_routers(VarMoeForCausalLM(config).eval())


def varmoe_router():
    from moescope.adapters.discover import CustomRouter

    return CustomRouter(pattern="model.layers.*.moe.router", top_k=2, expert_sizes=(48, 48, 16, 16))


class ByteTokenizer:
    """Bytes -> ids 3..258 folded into a 256 vocabulary; enough for `sequences_from_documents`."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 253 for b in text.encode("utf-8")]}


def documents(n: int = 12, words: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ("the router sends each token to two experts while attention mixes context across positions and "
             "quantization rounds every weight to a few levels").split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


@pytest.fixture
def moe():
    return qwen3_moe()


@pytest.fixture
def tokenizer():
    return ByteTokenizer()
