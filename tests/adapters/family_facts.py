"""What each family's config says about its MoE layers, read by the tests' own table (never families.py).

Written from each family's transformers source (configuration_*.py / modeling_*.py): which config attribute
holds the routed expert count and the top-k, how many shared experts the block runs (a config attribute, or
a constant where the source builds one shared MLP), which decoder layers hold an MoE block, and the router
choices that are not experts. `facts(config)` evaluates the table for one (text) config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .reference_routing import config_value
from .tiny_configs import COMPOSITE_TEXT_TYPES


@dataclass(frozen=True)
class LayerFacts:
    n_experts: int  # routed experts
    top_k: int
    n_shared_experts: int
    n_decoder_layers: int
    moe_decoder_layers: list[int]  # decoder layer of each MoE block, in order (JetMoE: two per layer)
    non_compute: dict | None  # {"ids": [...], "kind": ...} as the manifest should declare it


# -- routed experts and top-k: the config attribute each family's source reads ------------------------------
_N_ROUTED = (
    "axk1 axk2 deepseek_ocr2_text deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4 dots1 dots3_note_text glm4_moe "
    "glm4_moe_lite glm4v_moe_text glm5_next_text glm_moe_dsa hy_v4 inkling2_text inkling_text longcat_flash mimo_v2_flash "
    "mistral4 mistral_large4_text nemotron_h solar_open step3p5 unlimited_ocr_text"
).split()
_N_LOCAL = (
    "bailing_hybrid gpt_oss granitemoe granitemoe_swa granitemoehybrid granitemoeshared jetmoe kimi_linear llama4_text "
    "minimax minimax_m2 minimax_m3_vl_text mixtral muse_spark_text phimoe"
).split()
EXPERTS_ATTR: dict[str, str] = {
    **{f: "n_routed_experts" for f in _N_ROUTED},
    **{f: "num_local_experts" for f in _N_LOCAL},
    "aria_text": "moe_num_experts", "ernie4_5_moe": "moe_num_experts", "ernie4_5_vl_moe_text": "moe_num_experts",
    "dbrx": "ffn_config.moe_num_experts",
}  # every other family: num_experts
TOP_K_ATTR: dict[str, str] = {
    "aria_text": "moe_topk", "hunyuan_v1_moe": "moe_topk", "longcat_flash": "moe_topk", "gemma4_text": "top_k_experts",
    "ernie4_5_moe": "moe_k", "ernie4_5_vl_moe_text": "moe_k", "dbrx": "ffn_config.moe_top_k",
}  # every other family: num_experts_per_tok

# -- shared experts: a count attribute (DeepSeek fuses n of them into one MLP), or one shared MLP -------------
_N_SHARED = (
    "axk1 axk2 bailing_hybrid deepseek_ocr2_text deepseek_v2 deepseek_v3 deepseek_v32 dots1 dots3_note_text glm4_moe "
    "glm4_moe_lite glm4v_moe_text glm5_next_text glm_moe_dsa hy_v4 inkling_text kimi_linear mistral4 mistral_large4_text "
    "solar_open unlimited_ocr_text"
).split()
_ONE_SHARED_MLP = (  # a single always-on MLP beside the experts (Gemma4: its dense MLP on every token)
    "deepseek_v4 flint gemma4_text hunyuan_v1_moe kolibri1 laguna llama4_text minimax_m3_vl_text nemotron_h qwen2_moe "
    "qwen3_5_moe_text qwen3_next qwen4_exp_text step3p5"
).split()
SHARED: dict[str, str | int | Callable] = {
    **{f: "n_shared_experts" for f in _N_SHARED},
    **{f: 1 for f in _ONE_SHARED_MLP},
    "afmoe": "num_shared_experts", "cohere2_moe": "num_shared_experts", "exaone_moe": "num_shared_experts",
    "hy_v3": "num_shared_experts", "aria_text": "moe_num_shared_experts", "ernie4_5_moe": "moe_num_shared_experts",
    "ernie4_5_vl_moe_text": "moe_num_shared_experts",
    # Granite's decoder layer holds a shared_mlp only when shared_intermediate_size > 0
    "granitemoehybrid": lambda c: int(c.shared_intermediate_size > 0),
    "granitemoeshared": lambda c: int(c.shared_intermediate_size > 0),
}  # every other family: none


# -- which decoder layers hold an MoE block -----------------------------------------------------------------
def _every(c) -> list[int]:
    return list(range(c.num_hidden_layers))


def _first_k_dense(c) -> list[int]:
    return list(range(c.first_k_dense_replace, c.num_hidden_layers))


def _mlp_layer_types(c) -> list[int]:
    return [i for i, kind in enumerate(c.mlp_layer_types) if kind != "dense"]


def _qwen_sparse_step(c) -> list[int]:
    return [i for i in range(c.num_hidden_layers) if i not in c.mlp_only_layers and (i + 1) % c.decoder_sparse_step == 0]


def _num_dense(c) -> list[int]:
    return list(range(c.num_dense_layers, c.num_hidden_layers))


def _ernie(c) -> list[int]:
    return [i for i in range(c.num_hidden_layers) if (i + 1) % c.moe_layer_interval == 0
            and c.moe_layer_start_index <= i <= c.moe_layer_end_index]


_MOE_LAYERS: dict[str, Callable] = {
    **{f: _first_k_dense for f in "deepseek_v2 deepseek_v3 dots1 glm4_moe glm4v_moe_text mistral4".split()},
    **{f: _mlp_layer_types for f in (
        "axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_ocr2_text deepseek_v32 deepseek_v4 dots3_note_text exaone_moe "
        "glm4_moe_lite glm5_next_text glm_moe_dsa hy_v3 hy_v4 inkling_text kimi_linear laguna mellum mimo_v2_flash "
        "minimax_m3_vl_text mistral_large4_text muse_spark_text step3p5 unlimited_ocr_text"
    ).split()},
    **{f: _qwen_sparse_step for f in "flint qwen2_moe qwen3_moe qwen3_next qwen3_omni_moe_text qwen3_vl_moe_text".split()},
    **{f: _num_dense for f in "afmoe lfm2_moe".split()},
    "ernie4_5_moe": _ernie,
    "llama4_text": lambda c: list(c.moe_layers),
    "jamba": lambda c: [i for i in range(c.num_hidden_layers) if i % c.expert_layer_period == c.expert_layer_offset],
    "nemotron_h": lambda c: [i for i, kind in enumerate(c.hybrid_override_pattern) if kind == "E"],
    "jetmoe": lambda c: [i for i in range(c.num_hidden_layers) for _ in ("attention experts", "mlp experts")],
    "longcat_flash": lambda c: list(range(c.num_layers)),  # its num_hidden_layers counts 2 attention blocks per layer
}  # every other family: every decoder layer
N_DECODER_LAYERS: dict[str, Callable] = {"longcat_flash": lambda c: c.num_layers}

# -- router choices that are not experts: (kind, count attribute or constant) --------------------------------
NON_COMPUTE: dict[str, tuple[str, str | int]] = {
    "longcat_flash": ("identity", "zero_expert_num"),  # zero-compute experts, ids n_routed .. n_routed + zero - 1
    "zaya": ("skip", 1),  # the router's last class; reaches the experts as (expert 0, weight 0.0)
}


def _value(config, how):
    if callable(how):
        return how(config)
    return how if isinstance(how, int) else config_value(config, how)


def facts(config) -> LayerFacts:
    """The table, evaluated on one family's (text) config."""
    family = COMPOSITE_TEXT_TYPES.get(config.model_type, config.model_type)
    n_experts = int(config_value(config, EXPERTS_ATTR.get(family, "num_experts")))
    non_compute = None
    if family in NON_COMPUTE:
        kind, count = NON_COMPUTE[family]
        non_compute = {"ids": list(range(n_experts, n_experts + int(_value(config, count)))), "kind": kind}
    return LayerFacts(
        n_experts=n_experts,
        top_k=int(config_value(config, TOP_K_ATTR.get(family, "num_experts_per_tok"))),
        n_shared_experts=int(_value(config, SHARED.get(family, 0)) or 0),
        n_decoder_layers=int(N_DECODER_LAYERS.get(family, lambda c: c.num_hidden_layers)(config)),
        moe_decoder_layers=_MOE_LAYERS.get(family, _every)(config),
        non_compute=non_compute,
    )
