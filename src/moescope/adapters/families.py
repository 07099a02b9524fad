"""Every MoE family of transformers 5.23, declared as data: one RouterSpec each, or the reason it cannot be.

Each entry was written from the family's router and MoE-block source (transformers/models/<family>/
modeling_*.py) and is checked by tests/adapters/test_reference_routing.py against an independent NumPy
implementation of the policy it declares. Families that share identical routing code share a helper
below, but every model_type is listed explicitly, so `FAMILIES[model_type]` never guesses.

Conventions (see spec.py): attribute paths are relative to the MoE block, i.e. the parent of the
experts module; `renormalize`, `scaling_attr`, `scoring_attr` and `output_scale_attr` name config
attributes (dotted for sub-configs) and are read from the config the MoE blocks were built from — for
a multimodal model, its text config. Composite (multimodal) model_types whose decoder is their text
model's map to the text family's spec under their own name; multimodal families without a causal LM
are declared too, so an already-loaded multimodal model can be captured.
"""

from __future__ import annotations

from dataclasses import replace

from moescope.adapters.spec import (
    NonComputeChoices,
    NonComputeKind,
    RouterOutput,
    RouterSpec,
    Scoring,
    Selection,
    UnsupportedFamily,
)


# --- shared routing policies ---------------------------------------------------------------------------
def _softmax(family: str, renormalize: str | bool, **kw) -> RouterSpec:
    """softmax over all experts, top-k of the probabilities, optional renormalisation (Mixtral/Qwen/OLMoE)."""
    return RouterSpec(family=family, scoring=Scoring.SOFTMAX, renormalize=renormalize, **kw)


def _softmax_topk(family: str, **kw) -> RouterSpec:
    """top-k of the logits, softmax over those k (Granite/Aria/GPT-OSS); weights always sum to 1."""
    return RouterSpec(family=family, scoring=Scoring.SOFTMAX_TOPK, renormalize=True, **kw)


def _deepseek_v3(family: str, **kw) -> RouterSpec:
    """DeepSeek-V3 noaux_tc: sigmoid scores; selection on scores + e_score_correction_bias, limited to the
    topk_group best of n_group groups (group score: sum of its two best biased scores; other groups -inf);
    weights are the *unbiased* scores, renormalised when norm_topk_prob, times routed_scaling_factor."""
    fields = {
        "renormalize": "norm_topk_prob",
        "bias_attr": "gate.e_score_correction_bias",
        "scaling_attr": "routed_scaling_factor",
        "grouped": True,
        "shared_experts_attr": "shared_experts",
        "shared_experts_count": "n_shared_experts",  # one MLP of n_shared_experts * moe_intermediate_size
    }
    return RouterSpec(family=family, scoring=Scoring.SIGMOID, **{**fields, **kw})


def _sigmoid_biased(family: str, bias_attr: str | None, **kw) -> RouterSpec:
    """sigmoid scores, selection on scores + correction bias, weights = unbiased scores (no groups)."""
    return RouterSpec(family=family, scoring=Scoring.SIGMOID, bias_attr=bias_attr, **kw)


def _aliases(spec: RouterSpec, *families: str) -> dict[str, RouterSpec]:
    return {family: replace(spec, family=family) for family in families}


# --- the families ---------------------------------------------------------------------------------------
_GEMMA4 = RouterSpec(
    family="gemma4_text",
    scoring=Scoring.CUSTOM,
    router_attr="router",
    router_output=RouterOutput.PROBS,
    renormalize=True,
    shared_experts_attr="mlp",
    selection_policy="gemma4",
    notes=(
        "The MoE block is the decoder layer itself (router and experts are its children) and runs beside a dense "
        "MLP (`mlp`) on every token. Router: parameter-free RMSNorm, times `scale` and hidden**-0.5, linear "
        "`proj`, softmax; top-k of the probabilities, renormalised, then multiplied by `per_expert_scale[id]` "
        "(so weights need not sum to 1). The router returns probabilities in the logits slot. Its input is the "
        "residual stream before pre_feedforward_layernorm_2, not the experts' input."
    ),
)

_LLAMA4 = RouterSpec(
    family="llama4_text",
    scoring=Scoring.SIGMOID,
    router_attr="router",
    router_output_index=1,
    router_output=RouterOutput.LOGITS,
    selection=Selection.ROUTER_TOPK,
    renormalize=False,
    select_on="logits",
    shared_experts_attr="shared_expert",
    notes=(
        "Experts take no ids or weights: the router returns (scores [N,E], logits [N,E]) where scores are "
        "sigmoid(logit) on the top-k logits and exactly 0 elsewhere, and the block multiplies each expert's "
        "*input* by its score (routed_in = h * score) before running every expert on every token. ids = top-k "
        "of the logits and weights = their sigmoids reproduce the scores tensor exactly, so capture takes top-k "
        "of the logits (index 1). The weights scale the expert input, not its output; experts are not "
        "homogeneous, so they are not output gate weights. MoE only every interleave_moe_layer_step layers."
    ),
)

_INKLING = RouterSpec(
    family="inkling_text",
    scoring=Scoring.CUSTOM,
    shared_experts_attr="shared_experts",
    shared_experts_count="n_shared_experts",
    bias_attr="gate.e_score_correction_bias",
    scaling_attr="route_scale",
    selection_policy="inkling",
    notes=(
        "Router weight has n_routed + n_shared rows. Selection: top-k of sigmoid(routed logits) + "
        "e_score_correction_bias. Weights: the selected routed logits and all shared-expert logits are mapped "
        "through sigmoid and normalised together (softmax of logsigmoid), times route_scale and the learned "
        "`global_scale`; the routed part goes to the experts, the shared part gates the shared experts "
        "(router output index 3). So routed weights sum to less than route_scale*global_scale. Index 0 holds "
        "the routed logits only."
    ),
)

_ZAYA = RouterSpec(
    family="zaya",
    scoring=Scoring.CUSTOM,
    router_inputs=("router_states",),
    selection_policy="zaya",
    non_compute=NonComputeChoices(NonComputeKind.SKIP, 1, received_as=0),
    notes=(
        "Router is an MLP: down_proj (with bias) to router_hidden_size, plus the previous layer's router state "
        "times router_states_scale (every layer but the first), RMSNorm, two GELU layers and out_proj to "
        "num_experts + 1 classes (the last is a no-compute 'skip' expert). softmax over the E+1 classes; top-k "
        "of probs + balancing_biases; weights are the unbiased probs (no renormalisation). A selected skip "
        "expert reaches the experts as id 0 with weight 0.0 (the router masks it after taking the weight), so the "
        "pair (0, 0.0) the experts receive means 'skip' (a real expert 0 arrives with its softmax probability, > 0) "
        "and is recorded as skip's own id num_experts. Router output index 0 holds the E+1 logits. transformers only accepts "
        "num_experts_per_tok = 1."
    ),
)

FAMILIES: dict[str, RouterSpec] = {
    "afmoe": _sigmoid_biased(
        "afmoe",
        "expert_bias",
        router_attr="router",
        renormalize=True,
        scaling_attr="route_scale",
        shared_experts_attr="shared_experts",
        shared_experts_count="num_shared_experts",
        notes="Correction bias lives on the block (`expert_bias`) and is passed to the router's forward; the "
        "router's logits come from its child Linear `router.gate`.",
    ),
    "aria_text": _softmax_topk("aria_text", router_attr="router", shared_experts_attr="shared_experts",
                               shared_experts_count="moe_num_shared_experts"),
    "axk1": _deepseek_v3("axk1", notes="DeepSeek-V3 routing; the block adds a post-MLP RMSNorm."),
    "axk2": _deepseek_v3(
        "axk2",
        group_fill=0.0,
        notes="DeepSeek-V3 routing except: group limiting only when n_group is set (light checkpoints skip it), "
        "and experts of dropped groups get score 0.0 (not -inf), so they can still win over negative biased scores.",
    ),
    "bailing_hybrid": _deepseek_v3("bailing_hybrid", notes="DeepSeek-V3 routing in a hybrid linear-attention model."),
    "beam": _deepseek_v3(
        "beam",
        scaling_attr=None,
        output_scale_attr="routed_scaling_factor",
        shared_experts_attr=None,
        notes="DeepSeek-V3 selection; routed_scaling_factor multiplies the block output, not the weights.",
    ),
    "cohere2_moe": RouterSpec(
        family="cohere2_moe",
        scoring=Scoring.SOFTMAX_TOPK,
        scoring_attr="expert_selection_fn",
        renormalize="norm_topk_prob",
        shared_experts_attr="shared_experts",
        shared_experts_count="num_shared_experts",
        notes="Top-k of the logits; expert_selection_fn 'softmax' = softmax over the k, 'sigmoid' = sigmoid of "
        "the k (renormalised when norm_topk_prob). Shared experts only when num_shared_experts > 0; with "
        "shared_expert_combination_strategy 'average' the routed output is halved after the experts.",
    ),
    "dbrx": _softmax(
        "dbrx",
        "ffn_config.moe_normalize_expert_weights",
        router_attr="router",
        router_output_index=None,
        notes="Router (`router.layer`) returns logits only; the block does softmax, top-k and divides by the "
        "L_p norm of the top-k with p = ffn_config.moe_normalize_expert_weights (None: no normalisation).",
    ),
    "deepseek_v2": RouterSpec(
        family="deepseek_v2",
        scoring=Scoring.SOFTMAX,
        renormalize=False,
        scaling_attr="routed_scaling_factor",
        grouped=True,
        group_score="max",
        group_fill=0.0,
        group_when=("topk_method", "group_limited_greedy"),
        shared_experts_attr="shared_experts",
        shared_experts_count="n_shared_experts",
        notes="softmax, top-k, never renormalised, times routed_scaling_factor. Group limiting only when "
        "topk_method == 'group_limited_greedy': group score = its best probability, experts of dropped groups "
        "set to 0.0.",
    ),
    "deepseek_v3": _deepseek_v3("deepseek_v3"),
    "deepseek_v32": _deepseek_v3("deepseek_v32"),
    "deepseek_v4": RouterSpec(
        family="deepseek_v4",
        scoring=Scoring.SQRTSOFTPLUS,
        scoring_attr="scoring_func",
        renormalize=True,
        bias_attr="gate.e_score_correction_bias",
        scaling_attr="routed_scaling_factor",
        shared_experts_attr="shared_experts",
        hash_table_attr="tid2eid",
        router_inputs=("input_ids",),
        notes="scores = scoring_func(logits) (sqrt(softplus) by default); selection on scores + correction bias; "
        "weights = unbiased scores renormalised, times routed_scaling_factor. The first mlp_layer_types == "
        "'hash_moe' layers select by a frozen table, ids = gate.tid2eid[input_ids] (router forward gets input_ids), "
        "with the same weights; those routers have no bias.",
    ),
    "dots1": _deepseek_v3("dots1"),
    "dots3_note_text": _deepseek_v3("dots3_note_text"),
    "ernie4_5_moe": _softmax(
        "ernie4_5_moe",
        True,
        bias_attr="gate.moe_statics.e_score_correction_bias",
        shared_experts_attr="shared_experts",
        shared_experts_count="moe_num_shared_experts",
        notes="softmax probabilities; selection on probs + e_score_correction_bias ([1, E], in gate.moe_statics); "
        "weights = unbiased probs divided by max(sum, moe_norm_min).",
    ),
    "exaone_moe": _deepseek_v3("exaone_moe", shared_experts_count="num_shared_experts"),
    "flex_olmo": _softmax("flex_olmo", "norm_topk_prob"),
    "flint": RouterSpec(
        family="flint",
        scoring=Scoring.SIGMOID,
        renormalize="norm_topk_prob",
        shared_experts_attr="shared_expert",
        notes="sigmoid scores without bias; the shared expert is added ungated.",
    ),
    "gemma4_text": _GEMMA4,
    "glm4_moe": _deepseek_v3("glm4_moe"),
    "glm4_moe_lite": _deepseek_v3("glm4_moe_lite"),
    "glm_moe_dsa": _deepseek_v3("glm_moe_dsa"),
    "gpt_oss": _softmax_topk(
        "gpt_oss",
        router_attr="router",
        ids_arg="router_indices",
        weights_arg="routing_weights",
        notes="Router linear has a bias (part of the logits).",
    ),
    "granitemoe": _softmax_topk("granitemoe", router_attr="router"),
    "granitemoe_swa": _softmax_topk("granitemoe_swa", router_attr="router"),
    "granitemoehybrid": _softmax_topk(
        "granitemoehybrid", router_attr="router", notes="The always-on `shared_mlp` sits on the decoder layer."
    ),
    "granitemoeshared": _softmax_topk(
        "granitemoeshared", router_attr="router", notes="The always-on `shared_mlp` sits on the decoder layer."
    ),
    "hunyuan_v1_moe": _softmax(
        "hunyuan_v1_moe",
        True,
        shared_experts_attr="shared_mlp",
        notes="Router linear is `gate.wg`; num_experts and moe_topk may be per-layer lists.",
    ),
    "hy_v3": _sigmoid_biased(
        "hy_v3",
        "e_score_correction_bias",
        renormalize=True,
        scaling_attr="router_scaling_factor",
        shared_experts_attr="shared_experts",
        shared_experts_count="num_shared_experts",
        notes="Correction bias lives on the block and is passed to the router's forward.",
    ),
    "hy_v4": _deepseek_v3("hy_v4"),
    "inkling_text": _INKLING,
    "inkling2_text": RouterSpec(
        family="inkling2_text",
        scoring=Scoring.SIGMOID,
        scoring_attr="scoring_func",
        renormalize=True,
        bias_attr="gate.e_score_correction_bias",
        scaling_attr="routed_scaling_factor",
        notes="scores = scoring_func(logits); selection on scores + bias; weights = unbiased scores, renormalised, "
        "times routed_scaling_factor.",
    ),
    "jamba": _softmax("jamba", False, router_attr="router", notes="MoE every expert_layer_period layers."),
    "jetmoe": _softmax_topk(
        "jetmoe",
        router_attr="router",
        router_output_index=4,
        selection=Selection.ROUTER_TOPK,
        notes="Two mixtures per decoder layer, both routed by JetMoeTopKGating (top-k of the logits, softmax over "
        "the k): the MLP (`mlp`, JetMoeMoE) and the attention experts (`self_attention.experts`, JetMoeMoA). "
        "Experts take token-sorted inputs and group sizes, not ids and weights; the gating returns "
        "(sorted slots, token index, gates, group sizes, logits), so capture takes top-k of the logits (index 4), "
        "which is exactly the gating's own computation.",
    ),
    "kimi_linear": _deepseek_v3("kimi_linear"),
    "kolibri1": _sigmoid_biased(
        "kolibri1",
        "gate.e_score_correction_bias",
        renormalize="norm_topk_prob",
        select_on="logits",
        shared_experts_attr="shared_experts",
        notes="Selection on raw logits + correction bias (bias added before the sigmoid, unlike DeepSeek-V3); "
        "weights = sigmoid of the selected logits.",
    ),
    "laguna": _sigmoid_biased(
        "laguna",
        "gate.e_score_correction_bias",
        renormalize=True,
        output_scale_attr="moe_routed_scaling_factor",
        shared_experts_attr="shared_experts",
        notes="Logits soft-capped (tanh(x/c)*c, c = moe_router_logit_softcapping when > 0) before the sigmoid; "
        "moe_routed_scaling_factor multiplies the block output, not the weights.",
    ),
    "lfm2_moe": _sigmoid_biased(
        "lfm2_moe",
        "expert_bias",
        renormalize="norm_topk_prob",
        scaling_attr="routed_scaling_factor",
        notes="Correction bias `expert_bias` lives on the block (only when use_expert_bias) and is passed to the "
        "router; renormalisation adds 1e-6 to the sum. Dense first num_dense_layers layers.",
    ),
    "llama4_text": _LLAMA4,
    "longcat_flash": _softmax(
        "longcat_flash",
        False,
        router_attr="router",
        bias_attr="router.e_score_correction_bias",
        scaling_attr="routed_scaling_factor",
        non_compute=NonComputeChoices(NonComputeKind.IDENTITY, "zero_expert_num"),
        notes="softmax over n_routed_experts + zero_expert_num classes; selection on probs + correction bias; "
        "weights = unbiased probs (not renormalised) times routed_scaling_factor. Ids >= n_routed_experts are "
        "zero-compute (identity) experts. Router linear is `router.classifier` (its bias, if any, is unused).",
    ),
    "mellum": _softmax("mellum", "norm_topk_prob"),
    "mimo_v2_flash": _deepseek_v3("mimo_v2_flash", shared_experts_attr=None),
    "minimax": _softmax("minimax", True),
    "minimax_m2": _sigmoid_biased(
        "minimax_m2",
        "e_score_correction_bias",
        renormalize=True,
        notes="Correction bias lives on the block and is passed to the router's forward.",
    ),
    "minimax_m3_vl_text": _sigmoid_biased(
        "minimax_m3_vl_text",
        "gate.e_score_correction_bias",
        renormalize=True,
        output_scale_attr="routed_scaling_factor",
        shared_experts_attr="shared_experts",
        notes="routed_scaling_factor multiplies the block output, not the weights.",
    ),
    "mixtral": _softmax("mixtral", True),
    "nemotron_h": _deepseek_v3(
        "nemotron_h",
        shared_experts_count=1,  # one MLP of moe_shared_expert_intermediate_size; n_shared_experts is unused
        notes="DeepSeek-V3 routing in a hybrid Mamba model; experts may run in a latent projection.",
    ),
    "olmoe": _softmax("olmoe", "norm_topk_prob"),
    "phimoe": RouterSpec(
        family="phimoe",
        scoring=Scoring.SPARSEMIXER,
        router_attr="router",
        notes="sparsemixer, always top-2. Eval: expert 1 = argmax logit, weight = softmax over the logits within "
        "2*router_jitter_noise (relative) of the max; expert 2 = argmax of the rest, weight = softmax over the rest "
        "within the same margin of their max. Training samples (Gumbel), so capture in eval mode.",
    ),
    "qwen2_moe": _softmax(
        "qwen2_moe", "norm_topk_prob", shared_experts_attr="shared_expert", notes="Shared expert gated by sigmoid."
    ),
    "qwen3_5_moe_text": _softmax(
        "qwen3_5_moe_text", True, shared_experts_attr="shared_expert", notes="Shared expert gated by sigmoid."
    ),
    "qwen3_moe": _softmax("qwen3_moe", "norm_topk_prob"),
    "qwen3_next": _softmax(
        "qwen3_next", "norm_topk_prob", shared_experts_attr="shared_expert", notes="Shared expert gated by sigmoid."
    ),
    "qwen4_exp_text": _softmax(
        "qwen4_exp_text", "norm_topk_prob", shared_experts_attr="shared_expert", notes="Shared expert gated by sigmoid."
    ),
    "solar_open": _deepseek_v3("solar_open"),
    "zaya": _ZAYA,
}

# Multimodal families without a causal LM of their own: their text decoders route as below (tested on the
# text model built from the text sub-config).
FAMILIES.update(
    {
        "deepseek_ocr2_text": replace(FAMILIES["deepseek_v2"], family="deepseek_ocr2_text"),
        "ernie4_5_vl_moe_text": _softmax(
            "ernie4_5_vl_moe_text",
            True,
            bias_attr="gate.moe_statics.e_score_correction_bias",
            shared_experts_count="moe_num_shared_experts",
            notes="Ernie-4.5 routing, with modality-isolated experts: each decoder MoE layer holds two blocks, "
            "`text_moe` and `vision_moe` (each a gate + experts), and a token runs through exactly one of them; "
            "text-only input never calls `vision_moe`. Shared experts sit on their parent.",
        ),
        "glm4v_moe_text": _deepseek_v3("glm4v_moe_text"),
        "glm5_next_text": _deepseek_v3("glm5_next_text"),
        "mistral4": RouterSpec(
            family="mistral4",
            scoring=Scoring.SOFTMAX,
            renormalize="norm_topk_prob",
            scaling_attr="routed_scaling_factor",
            grouped=True,
            group_fill=0.0,
            shared_experts_attr="shared_experts",
            shared_experts_count="n_shared_experts",
            notes="softmax probabilities limited to the topk_group best of n_group groups (group score: sum of "
            "its two best probabilities; dropped experts set to 0.0), no correction bias; weights renormalised "
            "when norm_topk_prob, times routed_scaling_factor.",
        ),
        "mistral_large4_text": RouterSpec(
            family="mistral_large4_text",
            scoring=Scoring.SOFTMAX,
            renormalize=True,
            scaling_attr="routed_scaling_factor",
            grouped=True,
            group_fill=0.0,
            shared_experts_attr="shared_experts",
            shared_experts_count="n_shared_experts",
            notes="Mistral-4 routing with fp32 logits and renormalisation always on.",
        ),
        "muse_spark_text": _sigmoid_biased(
            "muse_spark_text",
            "gate.e_score_correction_bias",
            renormalize=True,
            scaling_attr="routed_scaling_factor",
            notes="Logits are multiplied by config.output_multiplier before the sigmoid (and returned so); the "
            "experts run in a projected space (pre_expert_proj, moe_hidden_size) with a per-expert output norm.",
        ),
        "qwen3_omni_moe_text": _softmax(
            "qwen3_omni_moe_text",
            "norm_topk_prob",
            notes="Thinker and talker decoders both route this way (the talker's blocks add a sigmoid-gated "
            "`shared_expert`).",
        ),
        "qwen3_vl_moe_text": _softmax("qwen3_vl_moe_text", True),
        "step3p5": _sigmoid_biased(
            "step3p5",
            "gate.e_score_correction_bias",
            renormalize=True,
            output_scale_attr="moe_router_scaling_factor",
            shared_experts_attr="shared_experts",
            notes="Step-3.7 text decoder (model_type step3p5): moe_router_scaling_factor multiplies the routed "
            "output, not the weights.",
        ),
        "unlimited_ocr_text": replace(FAMILIES["deepseek_v2"], family="unlimited_ocr_text"),
    }
)

# Composite model_types whose decoder is built from the text sub-config of the family on the right.
FAMILIES.update(_aliases(FAMILIES["aria_text"], "aria"))
FAMILIES.update(_aliases(FAMILIES["dots3_note_text"], "dots3_note"))
FAMILIES.update(_aliases(FAMILIES["gemma4_text"], "gemma4"))
FAMILIES.update(_aliases(FAMILIES["inkling_text"], "inkling_mm_model"))
FAMILIES.update(_aliases(FAMILIES["inkling2_text"], "inkling2"))
FAMILIES.update(_aliases(FAMILIES["llama4_text"], "llama4"))
FAMILIES.update(_aliases(FAMILIES["minimax_m3_vl_text"], "minimax_m3_vl"))
FAMILIES.update(_aliases(FAMILIES["qwen3_5_moe_text"], "qwen3_5_moe"))
FAMILIES.update(_aliases(FAMILIES["qwen4_exp_text"], "qwen4_exp"))
FAMILIES.update(_aliases(FAMILIES["deepseek_ocr2_text"], "deepseek_ocr2"))
FAMILIES.update(_aliases(FAMILIES["ernie4_5_vl_moe_text"], "ernie4_5_vl_moe"))
FAMILIES.update(_aliases(FAMILIES["glm4v_moe_text"], "glm4v_moe"))
FAMILIES.update(_aliases(FAMILIES["glm5_next_text"], "glm5_next"))
FAMILIES.update(_aliases(FAMILIES["mistral_large4_text"], "mistral_large4"))
FAMILIES.update(_aliases(FAMILIES["muse_spark_text"], "muse_spark"))
FAMILIES.update(_aliases(FAMILIES["qwen3_omni_moe_text"], "qwen3_omni_moe", "qwen3_omni_moe_thinker"))
# The Qwen3-Omni talker's own text decoder: same router class code as the thinker's.
FAMILIES.update(_aliases(FAMILIES["qwen3_omni_moe_text"], "qwen3_omni_moe_talker_text"))
FAMILIES.update(_aliases(FAMILIES["qwen3_vl_moe_text"], "qwen3_vl_moe"))
FAMILIES.update(_aliases(FAMILIES["step3p5"], "step3p7"))
FAMILIES.update(_aliases(FAMILIES["unlimited_ocr_text"], "unlimited_ocr"))


UNSUPPORTED: dict[str, UnsupportedFamily] = {
    "doge": UnsupportedFamily(
        "doge",
        "product-key routing inside DogeCDMoE: no experts module receives gate weights (ids reach only the "
        "down_embed/up_embed lookups; the weights multiply activations inline), and the router output is "
        "reshaped (2, batch*seq, keys) across tokens, so it cannot be read per token from a module boundary",
    ),
    "switch_transformers": UnsupportedFamily(
        "switch_transformers",
        "encoder-decoder (no causal LM) with expert capacity: tokens over capacity are dropped, so the router's "
        "top-1 is not what the experts process",
    ),
    "nllb-moe": UnsupportedFamily(
        "nllb-moe",
        "encoder-decoder translation model (no causal LM) with expert capacity that drops tokens",
    ),
}
