"""moescope.intervene against hand-written hooks in this test, and the model restored bit for bit.

drop: the test's own router hook masks the expert and redoes the family's selection by hand (Qwen3-MoE:
softmax, top-k, renormalise; DeepSeek-V3: sigmoid, bias, group limit, top-k, renormalise, scale); the
model's logits under `intervene` must equal the logits under that hook. zero: equal to a copy of the model
whose expert weights the test zeroed. force: checked at the experts' input.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moescope
from moescope.adapters.discover import find_moe_layers
from moescope.errors import InterventionError
from moescope.recording.loading import load_model

from tests.adapters.tiny_configs import build_tiny_model


@pytest.fixture(scope="module")
def tiny_moe():
    return load_model("moescope:tiny-moe", device="cpu", dtype="float32")[0]


@pytest.fixture(scope="module")
def dsv3():
    return build_tiny_model("deepseek_v3")


def tokens(n=2, t=12, vocab=256, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
               + len(m._forward_pre_hooks_with_kwargs) for m in model.modules())


def snapshot(model) -> dict:
    state = {name: (t.data_ptr(), t.dtype, t.detach().cpu().numpy().tobytes())
             for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return {"tensors": state, "modules": [(n, type(m).__name__) for n, m in model.named_modules()]}


def _hand_routed(model, layer_index, replace):
    """Run with the test's own forward hook on one router returning `replace(router, logits)`'s (weights, ids)."""
    layer = find_moe_layers(model)[layer_index]
    router = model.get_submodule(layer.block_path).get_submodule(layer.spec.router_attr)

    def hook(module, args, output):
        weights, ids = replace(module, output[0].float())
        return output[0], weights.to(output[1].dtype), ids

    return router.register_forward_hook(hook)


def _qwen3_without(expert):
    def replace(router, logits):
        logits = logits.clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        weights, ids = probs.topk(router.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids  # tiny-moe renormalises (norm_topk_prob)

    return replace


def _deepseek_v3_without(expert, config):
    """Dropped: never chosen; a group scores the sum of its best two remaining experts (one if one is left)."""
    def replace(router, logits):
        scores = torch.sigmoid(logits)
        choice = scores + router.e_score_correction_bias
        choice[:, expert] = float("-inf")
        best = choice.view(len(choice), config.n_group, -1).topk(2, dim=-1).values
        groups = torch.nan_to_num(best, neginf=0.0).sum(-1)
        groups[torch.isinf(best).all(-1)] = float("-inf")
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(config.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(logits.shape[-1] // config.n_group, dim=-1), float("-inf"))
        ids = choice.topk(router.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if config.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * config.routed_scaling_factor, ids

    return replace


@pytest.mark.parametrize("which", ["tiny_moe", "dsv3"])
def test_drop_equals_a_hand_written_router_mask(which, request):
    model = request.getfixturevalue(which)
    ids = tokens(vocab=model.config.vocab_size)
    layer, expert = 1, 3
    replace = _qwen3_without(expert) if which == "tiny_moe" else _deepseek_v3_without(expert, model.config)
    handle = _hand_routed(model, layer, replace)
    try:
        expected = logits(model, ids)
    finally:
        handle.remove()
    with moescope.intervene(model, drop={layer: [expert]}):
        got = logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(model, ids))  # dropping the expert changed the model's output


def test_zero_equals_the_expert_weights_zeroed(tiny_moe):
    ids = tokens(vocab=tiny_moe.config.vocab_size)
    busiest = int(_experts_received(tiny_moe, 2, ids)[0].flatten().mode().values)
    zeroed = copy.deepcopy(tiny_moe)
    layer = find_moe_layers(zeroed)[2]
    experts = zeroed.get_submodule(layer.block_path).experts
    with torch.no_grad():
        experts.down_proj[busiest] = 0.0
    with moescope.intervene(tiny_moe, zero={2: [busiest]}):
        got = logits(tiny_moe, ids)
    torch.testing.assert_close(got, logits(zeroed, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(tiny_moe, ids))


def _experts_received(model, layer_index, ids):
    layer = find_moe_layers(model)[layer_index]
    seen = []
    handle = model.get_submodule(layer.block_path).experts.register_forward_pre_hook(
        lambda m, args: seen.append((args[1].clone(), args[2].clone())))
    try:
        logits(model, ids)
    finally:
        handle.remove()
    return seen[0]


def test_force_a_list_and_a_function(dsv3):
    ids = tokens()
    with moescope.intervene(dsv3, force={1: [6]}):
        got_ids, got_w = _experts_received(dsv3, 1, ids)
    assert (got_ids == 6).any(-1).all()
    with moescope.intervene(dsv3, force={1: lambda chosen: torch.tensor([[0, 4]]).expand_as(chosen)}):
        got_ids, got_w = _experts_received(dsv3, 1, ids)
    assert (got_ids == torch.tensor([0, 4])).all()
    layer = find_moe_layers(dsv3)[1]
    gate = dsv3.get_submodule(layer.block_path).gate
    x = []
    handle = gate.register_forward_pre_hook(lambda m, args: x.append(args[0]))
    logits(dsv3, ids)
    handle.remove()
    scores = torch.sigmoid(torch.nn.functional.linear(x[0].reshape(-1, x[0].shape[-1]), gate.weight))[:, [0, 4]]
    expected = scores / scores.sum(-1, keepdim=True) * dsv3.config.routed_scaling_factor  # by hand
    torch.testing.assert_close(got_w, expected)


def test_route_gets_the_routing_and_logits_and_sets_what_the_experts_receive(dsv3):
    """route=fn sees the chosen ids, their weights and the router's logits; what it returns is what the experts
    get; weigh() gives the block's own weights (here checked against the force= path, tested by hand above)."""
    ids = tokens()
    plain_ids, plain_w = _experts_received(dsv3, 1, ids)
    seen = {}

    def swap(chosen, weights, router_logits, weigh):
        seen.update(chosen=chosen.clone(), weights=weights.clone(), logits=router_logits.clone())
        new = torch.tensor([[0, 4]]).expand_as(chosen)
        return new, weigh(new)

    with moescope.intervene(dsv3, route={1: swap}):
        got_ids, got_w = _experts_received(dsv3, 1, ids)
    assert torch.equal(seen["chosen"], plain_ids.reshape(seen["chosen"].shape).long())
    torch.testing.assert_close(seen["weights"], plain_w.reshape(seen["weights"].shape).float())
    assert seen["logits"].shape == (seen["chosen"].shape[0], dsv3.config.n_routed_experts)
    with moescope.intervene(dsv3, force={1: lambda chosen: torch.tensor([[0, 4]]).expand_as(chosen)}):
        forced_ids, forced_w = _experts_received(dsv3, 1, ids)
    assert torch.equal(got_ids, forced_ids)
    torch.testing.assert_close(got_w, forced_w)
    with pytest.raises(InterventionError, match="route: the function for MoE layer 1"):
        with moescope.intervene(dsv3, route={1: lambda chosen, w, lg, weigh: (chosen.float(), w)}):
            logits(dsv3, ids)
    assert n_hooks(dsv3) == 0


@pytest.mark.parametrize("which", ["tiny_moe", "dsv3"])
def test_model_restored_bit_for_bit_on_exit_and_on_exception(which, request):
    model = request.getfixturevalue(which)
    before = snapshot(model)
    ids = tokens(vocab=model.config.vocab_size)
    plain = logits(model, ids)
    with moescope.intervene(model, drop={0: [1]}, zero={1: [2]}, force={2: [3]}):
        logits(model, ids)
    assert n_hooks(model) == 0 and snapshot(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with moescope.intervene(model, drop={0: [1, 2]}, force={1: lambda chosen: chosen.flip(-1)}):
            logits(model, ids)
            raise RuntimeError("inside")
    assert n_hooks(model) == 0 and snapshot(model) == before
    assert torch.equal(logits(model, ids), plain)


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop={9: [0]}), "unknown MoE layer 9"),
    (dict(zero={"1": [0]}), "unknown MoE layer '1'"),
    (dict(drop={1: [8]}), "expert id 8 is out of range"),
    (dict(drop={1: [0, 1, 2, 3, 4, 5, 6]}), "fewer than top-k = 2"),
    (dict(force={1: [0, 1, 2]}), "give 1 to 2 expert ids"),
    (dict(drop={1: [0]}, force={1: [0]}), "both dropped and forced"),
    (dict(drop=[1]), "takes a dict"),
    (dict(route={1: [0]}), "takes a function"),
    (dict(route={1: lambda *a: a[:2]}, drop={1: [0]}), "do not combine it"),
])
def test_bad_input_is_one_error_and_the_model_untouched(tiny_moe, kwargs, message):
    before = snapshot(tiny_moe)
    with pytest.raises(InterventionError, match=message):
        with moescope.intervene(tiny_moe, **kwargs):
            pytest.fail("the block must not run")
    assert n_hooks(tiny_moe) == 0 and snapshot(tiny_moe) == before


@pytest.mark.parametrize("family, kwargs, message", [
    ("deepseek_v4", dict(drop={0: [1]}), "hash routing"),
    ("inkling_text", dict(drop={0: [1]}), "shared experts' gates"),
    ("llama4_text", dict(zero={0: [1]}), "take no expert ids"),
    ("phimoe", dict(force={0: [1]}), "sparsemixer"),
    ("jetmoe", dict(drop={0: [1]}), "take no expert ids"),
    ("custom", dict(zero={0: [1]}), "take no expert ids"),
])
def test_layers_that_cannot_be_intervened_on_say_why(family, kwargs, message):
    if family == "custom":  # a plain PyTorch MoE captured through a CustomRouter
        from tests.quant.quant_models import varmoe, varmoe_router

        model = varmoe()
        layers = find_moe_layers(model, varmoe_router())
    else:
        model = build_tiny_model(family)
        layers = find_moe_layers(model)
    with pytest.raises(InterventionError, match=message):
        with moescope.intervene(model, layers=layers, **kwargs):
            pass
    assert n_hooks(model) == 0


def test_a_family_with_its_own_policy_drops_and_stays_consistent():
    """Gemma-4 (per-expert scale) and ZAYA (skip class): dropped experts never reach the experts module."""
    for family in ("gemma4_text", "zaya", "phimoe"):
        model = build_tiny_model(family)
        with moescope.intervene(model, drop={1: [0, 2]}):
            got_ids, got_w = _experts_received(model, 1, tokens())
        real = got_w != 0  # ZAYA: a skip reaches the experts as (0, 0.0)
        assert not torch.isin(got_ids[real], torch.tensor([0, 2])).any(), family
