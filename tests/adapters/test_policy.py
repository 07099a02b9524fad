"""The executable selection policy (adapters/policy) against the model itself, for every family built tiny.

The test's own hooks (not moescope's recorder) take, for every MoE block, the router's input (and its other
inputs) and the ids and weights the experts module received; the policy applied to that router input must
give exactly those ids and weights. Dropping experts (`exclude`) is checked against really pruned models:
a Qwen3-MoE rebuilt with 7 experts and a DeepSeek-V3 rebuilt with one expert group fewer.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from moescope.adapters.discover import find_moe_layers
from moescope.adapters.families import FAMILIES
from moescope.adapters.policy import layer_policy
from moescope.adapters.spec import Selection
from moescope.errors import RoutingPolicyError

from .reference_routing import ROUTER_OUTPUT_DECODERS
from .test_reference_routing import TESTED, padded_batch
from .tiny_configs import COMPOSITE_TEXT_TYPES, NOT_CAPTURED, build_tiny_model, tiny_config



def _bound(module, args, kwargs) -> dict:
    return dict(inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments)


def observe(model, layers, input_ids, mask=None) -> dict[int, dict]:
    """Per MoE layer: the router's input and other inputs, and what its experts received (or, for families
    whose experts take no ids, what the block applied, decoded from the router output)."""
    seen = {layer.index: {} for layer in layers}
    handles = []

    def router_pre(i):
        def hook(module, args, kwargs):
            bound = _bound(module, args, kwargs)
            bound.pop("self")
            first = next(iter(bound))
            seen[i]["x"] = bound.pop(first).detach().clone()
            seen[i]["inputs"] = bound
        return hook

    def router_post(i):
        def hook(module, args, output):
            seen[i]["output"] = output
        return hook

    def experts_pre(i, spec):
        def hook(module, args, kwargs):
            bound = _bound(module, args, kwargs)
            ids, weights = bound[spec.ids_arg], bound[spec.weights_arg]
            seen[i]["ids"] = ids.detach().reshape(-1, ids.shape[-1]).long()
            seen[i]["weights"] = weights.detach().reshape(-1, weights.shape[-1]).float()
        return hook

    try:
        for layer in layers:
            block = model.get_submodule(layer.block_path)
            router = block.get_submodule(layer.spec.router_attr)
            handles.append(router.register_forward_pre_hook(router_pre(layer.index), with_kwargs=True))
            handles.append(router.register_forward_hook(router_post(layer.index)))
            if layer.spec.selection == Selection.EXPERTS_INPUT:
                experts = getattr(block, layer.spec.experts_attr)
                handles.append(experts.register_forward_pre_hook(experts_pre(layer.index, layer.spec), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        got = seen[layer.index]
        if layer.spec.selection == Selection.ROUTER_TOPK:
            family = COMPOSITE_TEXT_TYPES.get(layer.spec.family, layer.spec.family)
            ids, weights = ROUTER_OUTPUT_DECODERS[family](got["output"])
            got["ids"], got["weights"] = torch.from_numpy(ids), torch.from_numpy(weights).float()
    return seen


def by_id(ids: torch.Tensor, weights: torch.Tensor):
    order = ids.argsort(dim=-1, stable=True)
    return ids.gather(-1, order), weights.gather(-1, order)


def assert_routes_like_the_model(policy, got, where):
    inputs = {name: got["inputs"][name] for name in policy.needs}
    ids, weights = policy.route(got["x"], **inputs)
    got_ids, got_w = by_id(got["ids"], got["weights"])
    ids, weights = by_id(ids, weights)
    assert torch.equal(ids, got_ids), f"{where}: expert ids differ in rows {torch.nonzero((ids != got_ids).any(-1)).flatten().tolist()}"
    torch.testing.assert_close(weights, got_w, rtol=1e-5, atol=1e-6, msg=f"{where}: weights")


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.skip(reason=NOT_CAPTURED[f])) if f in NOT_CAPTURED else f
                                    for f in TESTED])
def test_policy_reproduces_what_the_experts_received(family):
    model = build_tiny_model(family)
    layers = find_moe_layers(model)
    seen = observe(model, layers, *padded_batch())
    for layer in layers:
        assert_routes_like_the_model(layer_policy(model, layer), seen[layer.index], f"{family} MoE layer {layer.index}")


def _biased_deepseek_v3():
    """A tiny DeepSeek-V3 whose correction biases are large enough that raw top-k of the logits (or of the
    sigmoid scores) is rarely what the router picks."""
    model = build_tiny_model("deepseek_v3")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            bias = model.get_submodule(layer.block_path).gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=g) * 2.0)
    return model


def test_bias_and_groups_decide_and_raw_top_k_would_not():
    model = _biased_deepseek_v3()
    layers = find_moe_layers(model)
    seen = observe(model, layers, torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(2)))
    for layer in layers:
        got = seen[layer.index]
        assert_routes_like_the_model(layer_policy(model, layer), got, f"layer {layer.index}")
        raw = got["output"][0].topk(layer.top_k, dim=-1).indices.sort(-1).values
        assert (raw != got["ids"].sort(-1).values).any(-1).float().mean() > 0.5  # the old lookahead's rule


def test_excluded_experts_are_never_chosen_and_the_rest_renormalise():
    model = build_tiny_model("qwen3_moe")
    layers = find_moe_layers(model)
    seen = observe(model, layers, *padded_batch())
    policy = layer_policy(model, layers[1])
    got = seen[1]
    dropped = (int(got["ids"][0, 0]), 5)
    ids, weights = policy.route(got["x"], exclude=dropped)
    assert not torch.isin(ids, torch.tensor(dropped)).any()
    kept = [e for e in range(8) if e not in dropped]  # by hand: the softmax over the experts that remain
    probs = torch.softmax(got["output"][0][:, kept], dim=-1)
    top, pos = probs.topk(2, dim=-1)
    if model.config.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    assert torch.equal(ids, torch.tensor(kept)[pos])
    torch.testing.assert_close(weights, top)
    with pytest.raises(RoutingPolicyError, match="fewer than top-k"):
        policy.route(got["x"], exclude=tuple(range(7)))


def _pruned_copy(family: str, model, drop: list[int], **config_changes):
    """`model` rebuilt without the experts in `drop`: router rows, correction bias and expert weights sliced."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for key, value in config_changes.items():
        setattr(config, key, value)
    keep = [e for e in range(config.num_experts if hasattr(config, "num_experts") else config.n_routed_experts) if e not in drop]
    if hasattr(config, "num_experts"):
        config.num_experts = len(keep)
    else:
        config.n_routed_experts = len(keep)
    pruned = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        is_expert_tensor = ".experts." in name + "." or name.endswith(("gate.weight", "e_score_correction_bias"))
        if is_expert_tensor and owner.split(".")[-1] in ("experts", "gate") and tensor.shape[0] == len(keep) + len(drop):
            tensor = tensor[keep]
        state[name] = tensor
    pruned.load_state_dict(state)
    return pruned, keep


@pytest.mark.parametrize("family, drop, changes", [
    ("qwen3_moe", [3], {}),
    ("deepseek_v3", [2, 3], {"n_group": 3}),  # a whole group of 2: the pruned model has 3 groups of 2
])
def test_exclude_equals_a_really_pruned_model(family, drop, changes):
    model = build_tiny_model(family)
    if family == "deepseek_v3":
        with torch.no_grad():  # make the dropped group attractive, so that dropping it changes many choices
            for layer in find_moe_layers(model):
                model.get_submodule(layer.block_path).gate.e_score_correction_bias[drop] += 1.0
    pruned, keep = _pruned_copy(family, model, drop, **changes)
    layers = find_moe_layers(model)
    tokens = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    seen = observe(model, layers, tokens)
    seen_pruned = observe(pruned, find_moe_layers(pruned), tokens)
    changed = 0
    for layer in layers:
        got = seen[layer.index]
        if layer.index == 0:  # the first MoE layer's input is the same in both models
            torch.testing.assert_close(got["x"], seen_pruned[0]["x"])
        policy = layer_policy(model, layer)
        ids, weights = policy.route(seen_pruned[layer.index]["x"], exclude=tuple(drop))  # the pruned model's input
        expected_ids = torch.tensor(keep)[seen_pruned[layer.index]["ids"]]  # pruned ids -> original ids
        ids, weights = by_id(ids, weights)
        expected_ids, expected_w = by_id(expected_ids, seen_pruned[layer.index]["weights"])
        assert torch.equal(ids, expected_ids), f"{family} layer {layer.index}"
        torch.testing.assert_close(weights, expected_w, rtol=1e-5, atol=1e-6)
        changed += int(torch.isin(got["ids"], torch.tensor(drop)).any(-1).sum())
    assert changed > 5  # the dropped experts were chosen often in the unpruned model


def test_force_puts_experts_in_every_selection_and_weighs_them_as_the_block_would():
    model = _biased_deepseek_v3()
    layers = find_moe_layers(model)
    seen = observe(model, layers, *padded_batch())
    layer, got = layers[1], seen[1]
    policy = layer_policy(model, layer)
    ids, weights = policy.route(got["x"], force=(6,))
    assert (ids == 6).any(-1).all()
    # the weights of any id set: unbiased sigmoid scores, renormalised, times routed_scaling_factor (by hand)
    scores = torch.sigmoid(got["output"][0].float())
    expected = scores.gather(-1, ids)
    expected = expected / expected.sum(-1, keepdim=True) * model.config.routed_scaling_factor
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(policy.weigh(got["output"], got["x"], ids), expected)


def test_what_cannot_be_rerouted_says_why():
    model = build_tiny_model("deepseek_v4")
    layers = find_moe_layers(model)
    seen = observe(model, layers, *padded_batch())
    hashed = layer_policy(model, layers[0])
    assert hashed.needs == ("input_ids",)
    with pytest.raises(RoutingPolicyError, match="input_ids"):
        hashed.route(seen[0]["x"])
    with pytest.raises(RoutingPolicyError, match="hash routing"):
        hashed.route(seen[0]["x"], input_ids=seen[0]["inputs"]["input_ids"], exclude=(1,))
    zaya = build_tiny_model("zaya")
    with pytest.raises(RoutingPolicyError, match="router_states"):
        layer_policy(zaya, find_moe_layers(zaya)[1]).route(torch.zeros(1, 3, zaya.config.hidden_size))
    assert np.isfinite(layer_policy(model, layers[3]).route(seen[3]["x"])[1].numpy()).all()  # a scored layer runs


def test_every_declared_family_binds_a_policy_or_says_why():
    for family in TESTED:
        spec = FAMILIES[family]
        assert spec.scoring != "custom" or spec.selection_policy, family
