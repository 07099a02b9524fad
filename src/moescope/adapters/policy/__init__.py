"""A family's declared selection policy as executable code: from a router's output to what its experts receive.

`layer_policy(model, layer)` binds one MoE layer's RouterSpec to the live model: config values (top-k,
scoring function, renormalisation, routed scaling, groups) and the block's own tensors (correction bias,
per-expert scales, hash table), the tensors read at call time so a patched buffer is seen. Then

    policy.select(output, x)        the router's return value (and its input x) -> ids [N, k], weights [N, k]
    policy.route(x, **inputs)       the router's input -> the same, calling the router module (no hooks)
    policy.weigh(output, x, ids)    the weights the block gives to ids [N, k] chosen some other way

compute exactly what the block computes, and with `exclude=(ids...)` what a model without those experts
would choose, under the same policy; `force=(ids...)` makes experts always chosen. One file per policy:

    base.py         softmax / top-k softmax / sigmoid / sqrt-softplus scores, correction bias (selection only),
                    group-limited top-k, token-id hash tables, renormalisation (sum or L_p), routed scaling
    sparsemixer.py  PhiMoE
    custom.py       Gemma-4 (per-expert scale), Inkling (routed and shared gates normalised together), ZAYA (skip)

What cannot be re-derived raises RoutingPolicyError (a MoescopeError) saying why — never a TypeError.

>>> policy = layer_policy(model, layers[1])                      # doctest: +SKIP
>>> ids, weights = policy.route(hidden, exclude=(3,))            # as if expert 3 had been pruned
"""

from __future__ import annotations

from torch import nn

from moescope.adapters.policy.base import LayerPolicy, config_value, router_module, router_tensor
from moescope.adapters.policy.custom import CUSTOM_POLICIES
from moescope.adapters.policy.sparsemixer import SparsemixerPolicy
from moescope.adapters.spec import MoELayer, Scoring
from moescope.errors import RoutingPolicyError

PER_TOKEN_INPUTS = ("input_ids",)  # router inputs equal for every layer: a lookahead may hand them on


def layer_policy(model: nn.Module, layer: MoELayer) -> LayerPolicy:
    """The selection policy of `layer` (a MoELayer of `model`), bound to the model's live block."""
    spec = layer.spec
    if spec.scoring == Scoring.SPARSEMIXER:
        return SparsemixerPolicy(model, layer)
    if spec.scoring == Scoring.CUSTOM:
        policy = CUSTOM_POLICIES.get(spec.selection_policy or "")
        if policy is None:
            raise RoutingPolicyError(
                f"MoE layer {layer.index} ({spec.family}): its routing is not declared (found by structure), so it "
                "cannot be re-derived; moescope records what its experts receive, but cannot re-route it")
        return policy(model, layer)
    return LayerPolicy(model, layer)


__all__ = ["LayerPolicy", "PER_TOKEN_INPUTS", "RoutingPolicyError", "config_value", "layer_policy", "router_module",
           "router_tensor"]
