"""Independent NumPy reference for the routing policy of every MoE family moescope declares.

`reference_routing(config, router_input, router_params)` computes, from the hidden states a router
receives and the router's weights, the expert ids and gate weights the experts should receive. It is
written from the math (float64 NumPy), never by calling the model's modules, and it takes the family's
policy from its own table, `POLICIES`, keyed by the config's model_type and written from the families'
transformers source (transformers/models/<family>/modeling_*.py) — never from moescope's families.py,
so a wrong RouterSpec cannot agree with its own reference (`test_reference_routing` compares the two
declarations field by field). The three custom routers (Gemma4, Inkling, ZAYA) have their own functions.

`router_inputs_and_expert_args(model, input_ids, attention_mask)` runs one forward pass with forward
pre-hooks on every router (its input) and experts module (the ids and weights it received) and returns
one `LayerRecord` per MoE block, so a test can compare the model with the reference, or with moescope's
own capture.

`config` is the config the MoE blocks were built from: for a multimodal model, its text config
(`model.config.get_text_config()`), since routing attributes live there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .tiny_configs import COMPOSITE_TEXT_TYPES

@dataclass(frozen=True)
class Policy:
    """One family's routing, as its transformers source computes it. Paths are relative to the MoE block (the
    module holding the router and the experts); `renormalize`, `scale` and `scoring_attr` name config
    attributes (or are constants)."""

    scoring: str  # "softmax" | "softmax_topk" | "sigmoid" | "sqrtsoftplus" | "sparsemixer" | "gemma4" | "inkling" | "zaya"
    router: str = "gate"  # the router module
    output_index: int | None = 0  # where its return value holds the logits (or probabilities); None: a plain tensor
    output_is_probs: bool = False
    experts: str = "experts"
    from_router_output: bool = False  # the experts take no ids/weights (Llama4, JetMoE): decode the router's output
    renormalize: str | bool | None = None  # top-k weights divided by their sum (a number p: by their L_p norm)
    bias: str | None = None  # selection-only correction bias
    scale: str | None = None  # routed scaling factor, in the weights
    output_scale: str | None = None  # routed scaling factor applied to the experts' output instead (not in the weights)
    scoring_attr: str | None = None  # config attribute choosing the score function at run time
    grouped: bool = False  # n_group / topk_group limits
    shared: str | None = None  # always-on shared experts of the block
    non_compute: tuple[str, str | int] | None = None  # (kind, count) of router classes that are not experts
    # quirks: group score "top2_sum" (DeepSeek-V3) or "max" (DeepSeek-V2); score of dropped groups' experts;
    # (config attr, value) under which grouping applies; bias added to "scores" or "logits"; tanh soft-cap and
    # logit multiplier config attrs; whether a router Linear bias counts
    group_score: str = "top2_sum"
    group_fill: float = -np.inf
    group_when: tuple[str, str] | None = None
    bias_on: str = "scores"
    softcap_attr: str | None = None
    logit_scale_attr: str | None = None
    linear_bias: bool = True


def _softmax_policy(renormalize, **kw) -> Policy:
    return Policy("softmax", renormalize=renormalize, **kw)


def _softmax_topk_policy(**kw) -> Policy:
    return Policy("softmax_topk", renormalize=True, **kw)


def _sigmoid_policy(bias, renormalize, **kw) -> Policy:
    return Policy("sigmoid", bias=bias, renormalize=renormalize, **kw)


def _noaux_tc(**kw) -> Policy:
    """DeepSeek-V3-style: sigmoid, gate.e_score_correction_bias, groups, norm_topk_prob, routed_scaling_factor."""
    return Policy(**{"scoring": "sigmoid", "bias": "gate.e_score_correction_bias", "renormalize": "norm_topk_prob",
                     "scale": "routed_scaling_factor", "grouped": True, "shared": "shared_experts", **kw})


_DEEPSEEK_V2 = dict(scoring="softmax", renormalize=False, scale="routed_scaling_factor", grouped=True,
                    shared="shared_experts", group_score="max", group_fill=0.0,
                    group_when=("topk_method", "group_limited_greedy"))
_ERNIE = dict(renormalize=True, bias="gate.moe_statics.e_score_correction_bias")

POLICIES: dict[str, Policy] = {
    "afmoe": _sigmoid_policy("expert_bias", True, router="router", scale="route_scale", shared="shared_experts"),
    "aria_text": _softmax_topk_policy(router="router", shared="shared_experts"),
    "axk1": _noaux_tc(),
    "axk2": _noaux_tc(group_fill=0.0),
    "bailing_hybrid": _noaux_tc(),
    "beam": _noaux_tc(scale=None, output_scale="routed_scaling_factor", shared=None),
    "cohere2_moe": Policy("softmax_topk", scoring_attr="expert_selection_fn", renormalize="norm_topk_prob",
                          shared="shared_experts"),
    "dbrx": _softmax_policy("ffn_config.moe_normalize_expert_weights", router="router", output_index=None),
    "deepseek_ocr2_text": Policy(**_DEEPSEEK_V2),
    "deepseek_v2": Policy(**_DEEPSEEK_V2),
    "deepseek_v3": _noaux_tc(),
    "deepseek_v32": _noaux_tc(),
    "deepseek_v4": Policy("sqrtsoftplus", scoring_attr="scoring_func", renormalize=True,
                          bias="gate.e_score_correction_bias", scale="routed_scaling_factor", shared="shared_experts"),
    "dots1": _noaux_tc(),
    "dots3_note_text": _noaux_tc(),
    "ernie4_5_moe": _softmax_policy(shared="shared_experts", **_ERNIE),
    "ernie4_5_vl_moe_text": _softmax_policy(**_ERNIE),
    "exaone_moe": _noaux_tc(),
    "flex_olmo": _softmax_policy("norm_topk_prob"),
    "flint": Policy("sigmoid", renormalize="norm_topk_prob", shared="shared_expert"),
    "gemma4_text": Policy("gemma4", router="router", output_is_probs=True, renormalize=True, shared="mlp"),
    "glm4_moe": _noaux_tc(),
    "glm4_moe_lite": _noaux_tc(),
    "glm4v_moe_text": _noaux_tc(),
    "glm5_next_text": _noaux_tc(),
    "glm_moe_dsa": _noaux_tc(),
    "gpt_oss": _softmax_topk_policy(router="router"),
    "granitemoe": _softmax_topk_policy(router="router"),
    "granitemoe_swa": _softmax_topk_policy(router="router"),
    "granitemoehybrid": _softmax_topk_policy(router="router"),
    "granitemoeshared": _softmax_topk_policy(router="router"),
    "hunyuan_v1_moe": _softmax_policy(True, shared="shared_mlp"),
    "hy_v3": _sigmoid_policy("e_score_correction_bias", True, scale="router_scaling_factor", shared="shared_experts"),
    "hy_v4": _noaux_tc(),
    "inkling_text": Policy("inkling", bias="gate.e_score_correction_bias", scale="route_scale", shared="shared_experts"),
    "inkling2_text": Policy("sigmoid", scoring_attr="scoring_func", renormalize=True, bias="gate.e_score_correction_bias",
                            scale="routed_scaling_factor"),
    "jamba": _softmax_policy(False, router="router"),
    "jetmoe": _softmax_topk_policy(router="router", output_index=4, from_router_output=True),
    "kimi_linear": _noaux_tc(),
    "kolibri1": _sigmoid_policy("gate.e_score_correction_bias", "norm_topk_prob", shared="shared_experts", bias_on="logits"),
    "laguna": _sigmoid_policy("gate.e_score_correction_bias", True, output_scale="moe_routed_scaling_factor",
                              shared="shared_experts", softcap_attr="moe_router_logit_softcapping"),
    "lfm2_moe": _sigmoid_policy("expert_bias", "norm_topk_prob", scale="routed_scaling_factor"),
    "llama4_text": Policy("sigmoid", router="router", output_index=1, from_router_output=True, renormalize=False,
                          shared="shared_expert"),
    "longcat_flash": _softmax_policy(False, router="router", bias="router.e_score_correction_bias",
                                     scale="routed_scaling_factor", non_compute=("identity", "zero_expert_num"),
                                     linear_bias=False),
    "mellum": _softmax_policy("norm_topk_prob"),
    "mimo_v2_flash": _noaux_tc(shared=None),
    "minimax": _softmax_policy(True),
    "minimax_m2": _sigmoid_policy("e_score_correction_bias", True),
    "minimax_m3_vl_text": _sigmoid_policy("gate.e_score_correction_bias", True, output_scale="routed_scaling_factor",
                                          shared="shared_experts"),
    "mistral4": Policy("softmax", renormalize="norm_topk_prob", scale="routed_scaling_factor", grouped=True,
                       shared="shared_experts", group_fill=0.0),
    "mistral_large4_text": Policy("softmax", renormalize=True, scale="routed_scaling_factor", grouped=True,
                                  shared="shared_experts", group_fill=0.0),
    "mixtral": _softmax_policy(True),
    "muse_spark_text": _sigmoid_policy("gate.e_score_correction_bias", True, scale="routed_scaling_factor",
                                       logit_scale_attr="output_multiplier"),
    "nemotron_h": _noaux_tc(),
    "olmoe": _softmax_policy("norm_topk_prob"),
    "phimoe": Policy("sparsemixer", router="router"),
    "qwen2_moe": _softmax_policy("norm_topk_prob", shared="shared_expert"),
    "qwen3_5_moe_text": _softmax_policy(True, shared="shared_expert"),
    "qwen3_moe": _softmax_policy("norm_topk_prob"),
    "qwen3_next": _softmax_policy("norm_topk_prob", shared="shared_expert"),
    "qwen3_omni_moe_text": _softmax_policy("norm_topk_prob"),
    "qwen3_omni_moe_talker_text": _softmax_policy("norm_topk_prob"),  # the talker's own text decoder: same router code
    "qwen3_vl_moe_text": _softmax_policy(True),
    "qwen4_exp_text": _softmax_policy("norm_topk_prob", shared="shared_expert"),
    "solar_open": _noaux_tc(),
    "step3p5": _sigmoid_policy("gate.e_score_correction_bias", True, output_scale="moe_router_scaling_factor",
                               shared="shared_experts"),
    "unlimited_ocr_text": Policy(**_DEEPSEEK_V2),
    "zaya": Policy("zaya", non_compute=("skip", 1)),
}


def policy_of(model_type: str) -> Policy:
    """The reference policy of a model_type (composite multimodal types route like their text decoder)."""
    return POLICIES[COMPOSITE_TEXT_TYPES.get(model_type, model_type)]


# Names of a score function as config attributes spell them (scoring_attr).
_SCORING_BY_NAME = {"softmax": "softmax_topk", "sigmoid": "sigmoid", "sqrtsoftplus": "sqrtsoftplus"}
_TOP_K_ATTRS = ("num_experts_per_tok", "moe_topk", "top_k_experts", "ffn_config.moe_top_k", "moe_top_k")


# --- small numerics ------------------------------------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _sqrtsoftplus(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.logaddexp(0.0, x))


def _gelu(x: np.ndarray) -> np.ndarray:  # exact (erf) GELU
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)).astype(np.float64))


def _rms_norm(x: np.ndarray, eps: float, weight: np.ndarray | None = None) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (stable: lower index wins exact ties)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _take(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, ids, axis=-1)


def config_value(config, path: str | bool | float | None):
    """A constant, or the value of a (dotted) config attribute; None when absent."""
    if path is None or isinstance(path, (bool, int, float)):
        return path
    value = config
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def config_top_k(config) -> int:
    for attr in _TOP_K_ATTRS:
        value = config_value(config, attr)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"cannot find top-k in {type(config).__name__}")


# --- router parameters ---------------------------------------------------------------------------------
def _get_path(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def router_params(block: nn.Module, policy: Policy) -> dict[str, np.ndarray]:
    """Every parameter and buffer of the block's router (float64 / int64 NumPy, by local name), plus the
    selection-only correction bias under "correction_bias" when the policy has one and it exists."""
    router = block.get_submodule(policy.router)
    params = {}
    for name, tensor in [*router.named_parameters(), *router.named_buffers()]:
        array = tensor.detach().cpu()
        params[name] = array.double().numpy() if array.is_floating_point() else array.numpy()
    if policy.bias is not None:
        bias = _get_path(block, policy.bias)
        if isinstance(bias, torch.Tensor):
            params["correction_bias"] = bias.detach().cpu().double().numpy().reshape(-1)
    return params


def _linear(params: Mapping[str, np.ndarray], use_bias: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The router's [E, H] weight (named `weight`, else its only 2-D parameter) and its Linear bias, if any."""
    if "weight" in params:
        prefix = ""
    else:
        matrices = [n for n, v in params.items() if n.endswith("weight") and v.ndim == 2]
        if len(matrices) != 1:
            raise ValueError(f"router has no single [E, H] weight: {sorted(params)}")
        prefix = matrices[0][: -len("weight")]
    bias = params.get(prefix + "bias") if use_bias else None
    return params[prefix + "weight"], bias


# --- the policies --------------------------------------------------------------------------------------
@dataclass
class Routing:
    ids: np.ndarray  # int64 [N, k]: the router's choices (a non-compute choice by its own class id)
    weights: np.ndarray  # float64 [N, k]
    selection_scores: np.ndarray  # float64 [N, E']: what top-k was taken over (for near-tie checks)
    router_output: np.ndarray  # float64 [N, E']: what the router returns at its output index


def _scoring(policy: Policy, config) -> str:
    if policy.scoring_attr is None:
        return policy.scoring
    name = config_value(config, policy.scoring_attr)
    if name not in _SCORING_BY_NAME:
        raise NotImplementedError(f"{config.model_type}: {policy.scoring_attr}={name!r} has no reference")
    return _SCORING_BY_NAME[name]


def _renormalize(weights: np.ndarray, policy: Policy, config) -> np.ndarray:
    value = config_value(config, policy.renormalize)
    if value is None or value is False:
        return weights
    if value is True:
        return weights / weights.sum(-1, keepdims=True)
    p = float(value)  # an L_p norm (DBRX)
    return weights / (np.abs(weights) ** p).sum(-1, keepdims=True) ** (1.0 / p)


def _group_limit(scores: np.ndarray, config, policy: Policy) -> np.ndarray:
    n_group, topk_group = config_value(config, "n_group"), config_value(config, "topk_group")
    when = policy.group_when
    if not n_group or (when is not None and config_value(config, when[0]) != when[1]):
        return scores
    n, e = scores.shape
    grouped = scores.reshape(n, n_group, e // n_group)  # (N, G, E/G)
    if policy.group_score == "max":
        group_scores = grouped.max(-1)
    else:
        group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
    keep = np.zeros((n, n_group), dtype=bool)
    np.put_along_axis(keep, _topk(group_scores, topk_group), True, axis=-1)
    keep = np.repeat(keep, e // n_group, axis=-1)  # (N, E)
    return np.where(keep, scores, policy.group_fill)


def _scored(policy, config, x, params, k, extra) -> Routing:
    """softmax / softmax_topk / sigmoid / sqrtsoftplus, with bias, groups, renormalisation and scaling."""
    weight, bias = _linear(params, policy.linear_bias)
    logits = x @ weight.T + (0.0 if bias is None else bias)  # (N, E)
    multiplier = config_value(config, policy.logit_scale_attr)
    if multiplier is not None:
        logits = logits * multiplier
    cap = config_value(config, policy.softcap_attr)
    if cap:
        logits = np.tanh(logits / cap) * cap
    scoring = _scoring(policy, config)
    correction = params.get("correction_bias", 0.0) if policy.bias else 0.0

    if scoring == "softmax_topk":
        ids = _topk(logits, k)
        weights = _softmax(_take(logits, ids))
        return Routing(ids, weights * _scale(policy, config), logits, logits)

    scores = {"softmax": _softmax, "sigmoid": _sigmoid, "sqrtsoftplus": _sqrtsoftplus}[scoring](logits)
    selection = (logits if policy.bias_on == "logits" else scores) + correction
    if policy.grouped:
        selection = _group_limit(selection, config, policy)
    if "tid2eid" in params:  # DeepSeek-V4 hash layers: a frozen token -> experts table
        ids = params["tid2eid"][extra["input_ids"].reshape(-1)]
    else:
        ids = _topk(selection, k)
    weights = _renormalize(_take(scores, ids), policy, config)
    return Routing(ids, weights * _scale(policy, config), selection, logits)


def _scale(policy: Policy, config) -> float:
    value = config_value(config, policy.scale)
    return 1.0 if value is None else float(value)


def _sparsemixer(policy, config, x, params, k, extra) -> Routing:
    """PhiMoE sparsemixer, eval path: two rounds of (argmax, softmax over the logits near the max)."""
    logits = x @ _linear(params, True)[0].T  # (N, E)
    eps = float(config.router_jitter_noise)
    ids, weights, masked = [], [], logits.copy()
    for _ in range(2):
        top = masked.max(-1, keepdims=True)  # (N, 1)
        choice = masked.argmax(-1)[:, None]
        factor = np.maximum(np.abs(logits), top)
        far = (top - logits) / factor > 2 * eps
        gates = _softmax(np.where(far, -np.inf, masked))
        ids.append(choice)
        weights.append(_take(gates, choice))
        np.put_along_axis(masked, choice, -np.inf, axis=-1)
    return Routing(np.concatenate(ids, -1), np.concatenate(weights, -1), logits, logits)


def _gemma4(policy, config, x, params, k, extra) -> Routing:
    h = _rms_norm(x, config.rms_norm_eps) * params["scale"] * x.shape[-1] ** -0.5
    probs = _softmax(h @ params["proj.weight"].T)
    ids = _topk(probs, k)
    weights = _take(probs, ids)
    weights = weights / weights.sum(-1, keepdims=True) * params["per_expert_scale"][ids]
    return Routing(ids, weights, probs, probs)


def _inkling(policy, config, x, params, k, extra) -> Routing:
    n_shared = int(config.n_shared_experts)
    logits = x @ params["weight"].T  # (N, E + S)
    routed, shared = logits[:, :-n_shared], logits[:, -n_shared:]
    selection = _sigmoid(routed) + params["correction_bias"]
    ids = _topk(selection, k)
    gates = _sigmoid(np.concatenate([_take(routed, ids), shared], -1))  # (N, k + S)
    weights = gates / gates.sum(-1, keepdims=True) * float(config.route_scale) * params["global_scale"].item()
    return Routing(ids, weights[:, :k], selection, routed)


def _zaya(policy, config, x, params, k, extra) -> Routing:
    """The router's choice among E experts + 1 skip class (id E, weight 0.0); the experts receive a skip as
    expert 0 with weight 0.0 (see `as_experts_receive`)."""
    h = x @ params["down_proj.weight"].T + params["down_proj.bias"]  # (N, R)
    states = extra.get("router_states")
    if "router_states_scale" in params and states is not None:
        h = h + states.reshape(h.shape) * params["router_states_scale"]
    h = _rms_norm(h, config.rms_norm_eps, params["router_mlp.norm.weight"])
    h = _gelu(h @ params["router_mlp.fc1.weight"].T + params["router_mlp.fc1.bias"])
    h = _gelu(h @ params["router_mlp.fc2.weight"].T + params["router_mlp.fc2.bias"])
    logits = h @ params["router_mlp.out_proj.weight"].T  # (N, E + 1): the last class skips
    probs = _softmax(logits)
    selection = probs + params["balancing_biases"]
    ids = _topk(selection, k)
    weights = _take(probs, ids)
    skip = ids == logits.shape[-1] - 1
    return Routing(ids, np.where(skip, 0.0, weights), selection, logits)


def as_experts_receive(routing: Routing, config) -> Routing:
    """ZAYA's experts receive a skip (the router's last class) as expert 0 with weight 0.0."""
    if policy_of(config.model_type).scoring != "zaya":
        return routing
    skip = routing.ids == config.num_experts
    return Routing(np.where(skip, 0, routing.ids), routing.weights, routing.selection_scores, routing.router_output)


_POLICY_FUNCTIONS = {"gemma4": _gemma4, "inkling": _inkling, "zaya": _zaya, "sparsemixer": _sparsemixer}


def reference_routing(
    config,
    router_input: np.ndarray,
    router_params: Mapping[str, np.ndarray],
    *,
    top_k: int | None = None,
    extra_inputs: Mapping[str, np.ndarray] | None = None,
) -> Routing:
    """Full reference result (ids, weights, selection scores, router output) for one MoE layer of a model
    built from `config`, whose model_type picks the policy."""
    x = np.asarray(router_input, dtype=np.float64).reshape(-1, router_input.shape[-1])  # (N, H)
    k = top_k or config_top_k(config)
    policy = policy_of(config.model_type)
    compute = _POLICY_FUNCTIONS.get(policy.scoring, _scored)
    return compute(policy, config, x, router_params, k, dict(extra_inputs or {}))


def reference_route(config, router_input, router_params, *, top_k=None, extra_inputs=None) -> tuple[np.ndarray, np.ndarray]:
    """ids int64 [N, k] and gate weights float64 [N, k] the router chose."""
    routing = reference_routing(config, router_input, router_params, top_k=top_k, extra_inputs=extra_inputs)
    return routing.ids, routing.weights


# --- what the model actually did -----------------------------------------------------------------------
@dataclass
class LayerRecord:
    """One MoE block in one forward pass."""

    block_path: str
    top_k: int
    router_input: np.ndarray  # float64 [N, H]
    extra_inputs: dict[str, np.ndarray]  # other tensor inputs of the router's forward, by parameter name
    router_output: np.ndarray | None  # float64 [N, E'] at the policy's output index
    ids: np.ndarray  # int64 [N, k]: what the experts received (or, for ROUTER_TOPK families, used)
    weights: np.ndarray  # float64 [N, k]
    params: dict[str, np.ndarray] = field(default_factory=dict)


def moe_blocks(model: nn.Module, policy: Policy) -> list[tuple[str, nn.Module]]:
    """(path, block) of every module with the policy's router child (and experts child, if read there)."""
    found = []
    for path, module in model.named_modules():
        router = _get_path(module, policy.router)
        if not isinstance(router, nn.Module) or router is module:
            continue
        experts = getattr(module, policy.experts, None)
        if not policy.from_router_output and not isinstance(experts, nn.Module):
            continue
        found.append((path, module))
    return found


def _bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    signature = inspect.signature(type(module).forward)
    return dict(signature.bind(module, *args, **kwargs).arguments)


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return tensor.double().numpy() if tensor.is_floating_point() else tensor.long().numpy()


def _llama4_used(output) -> tuple[np.ndarray, np.ndarray]:
    """Llama4: router output 0 is [N, E] sigmoid scores, zero outside the chosen experts; the block scales
    each expert's input by it. Recover (ids, scores) of the non-zero entries."""
    scores = _as_array(output[0])
    k = int((scores[0] != 0).sum())
    ids = np.sort(_topk(scores, k), axis=-1)
    return ids, _take(scores, ids)


def _jetmoe_used(output) -> tuple[np.ndarray, np.ndarray]:
    """JetMoE gating returns (sorted slot, token of each sorted slot, gate of each sorted slot, group sizes,
    logits); the experts process sorted slots grouped by expert, so slot j goes to expert e where j falls
    in e's group. Rebuild the per-token (ids, gates) the experts actually applied."""
    sorted_slot, token, gates, sizes = (output[0], output[1], output[2], output[3])
    expert = np.repeat(np.arange(len(sizes)), sizes)  # expert of each sorted slot
    sorted_slot, token, gates = _as_array(sorted_slot), _as_array(token), _as_array(gates)
    n_tokens = int(token.max()) + 1
    k = len(token) // n_tokens
    ids = np.zeros((n_tokens, k), dtype=np.int64)
    weights = np.zeros((n_tokens, k))
    slot_in_token = sorted_slot % k  # sorted_slot = token * k + position in that token's top-k
    ids[token, slot_in_token] = expert
    weights[token, slot_in_token] = gates
    return ids, weights


# ROUTER_TOPK families: how to read, from the router's full return value, the routing the block used.
ROUTER_OUTPUT_DECODERS = {"llama4_text": _llama4_used, "jetmoe": _jetmoe_used}


_EXPERTS_ARGS = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))


def _experts_args(experts: nn.Module) -> tuple[str, str]:
    params = set(inspect.signature(type(experts).forward).parameters)
    return next((i, w) for i, w in _EXPERTS_ARGS if i in params and w in params)


def router_inputs_and_expert_args(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[LayerRecord]:
    """Run one forward pass with hooks on every router and experts module; return one record per MoE block
    the pass reached, in module order. Hooks are removed in `finally`, whatever happens. The blocks are
    found by the reference policy of the model's (text) config.
    """
    model_type = COMPOSITE_TEXT_TYPES.get(model.config.get_text_config().model_type, model.config.get_text_config().model_type)
    policy = policy_of(model_type)
    blocks = moe_blocks(model, policy)
    seen: dict[str, dict] = {path: {} for path, _ in blocks}
    handles = []

    def router_pre(path):
        def hook(module, args, kwargs):
            bound = _bound_arguments(module, args, kwargs)
            tensors = {n: v for n, v in bound.items() if isinstance(v, torch.Tensor)}
            x = tensors.pop(next(iter(tensors)))  # the first tensor argument is the hidden states
            seen[path]["router_input"] = _as_array(x).reshape(-1, x.shape[-1])
            seen[path]["extra_inputs"] = {n: _as_array(v) for n, v in tensors.items()}

        return hook

    def router_post(path):
        def hook(module, args, output):
            seen[path]["router_full_output"] = output
            tensor = output if policy.output_index is None else output[policy.output_index]
            seen[path]["router_output"] = _as_array(tensor).reshape(-1, tensor.shape[-1])

        return hook

    def experts_pre(path):
        def hook(module, args, kwargs):
            bound = _bound_arguments(module, args, kwargs)
            ids_arg, weights_arg = _experts_args(module)
            ids, weights = bound[ids_arg], bound[weights_arg]
            seen[path]["ids"] = _as_array(ids).reshape(-1, ids.shape[-1])
            seen[path]["weights"] = _as_array(weights).reshape(-1, weights.shape[-1])

        return hook

    try:
        for path, block in blocks:
            router = block.get_submodule(policy.router)
            handles.append(router.register_forward_pre_hook(router_pre(path), with_kwargs=True))
            handles.append(router.register_forward_hook(router_post(path)))
            if not policy.from_router_output:
                experts = getattr(block, policy.experts)
                handles.append(experts.register_forward_pre_hook(experts_pre(path), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()

    records = []
    for path, block in blocks:
        got = seen[path]
        if not got:  # a block this input never reaches (e.g. Ernie-4.5-VL's vision experts on text)
            continue
        if policy.from_router_output:
            got["ids"], got["weights"] = ROUTER_OUTPUT_DECODERS[model_type](got["router_full_output"])
        records.append(
            LayerRecord(
                block_path=path,
                top_k=got["ids"].shape[-1],
                router_input=got["router_input"],
                extra_inputs=got["extra_inputs"],
                router_output=got.get("router_output"),
                ids=got["ids"],
                weights=got["weights"],
                params=router_params(block, policy),
            )
        )
    return records


def is_probability_rows(x: np.ndarray, atol: float = 1e-4) -> bool:
    return bool(x.min() >= 0 and np.allclose(x.sum(-1), 1.0, atol=atol))


__all__ = [
    "POLICIES", "LayerRecord", "Policy", "ROUTER_OUTPUT_DECODERS", "Routing", "as_experts_receive", "config_top_k",
    "config_value", "is_probability_rows", "moe_blocks", "policy_of", "reference_route", "reference_routing",
    "router_inputs_and_expert_args", "router_params",
]
