"""InterventionHooks: the only place moescope puts hooks that change what a model computes.

(recording/hooks.py, beside it, is the only place for hooks that observe.) Per intervened MoE layer:

    router forward hook      keeps the router's input and return value of the current block call
    experts forward pre-hook replaces the (ids, weights) the experts receive:
                             drop / force  -> the layer's selection policy on that router output, with the
                                              experts excluded / forced (adapters/policy)
                             force=fn      -> fn(ids), weighted by the policy as the block would
                             route=fn      -> fn(ids, weights, router logits, weigh): ids and weights as fn
                                              decides them (a cache-dependent routing, simulate/lossy.py)
                             zero          -> weights of those experts' slots set to 0 (routing unchanged)

No parameter or buffer of the model is written: leaving the context removes exactly the handles it added
(in `finally`, also after an exception), and the model is as before, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from moescope.adapters.discover import forward_param_index
from moescope.adapters.policy.base import router_tensor
from moescope.adapters.spec import RouterOutput
from moescope.errors import InterventionError
from moescope.intervention.plan import LayerIntervention, bound_policy
from moescope.recording.hooks import HookHandles, expert_args, with_expert_args


class InterventionHooks(HookHandles):
    """Context manager applying `plans` (from `plan_interventions`) to every forward pass of `model`."""

    def __init__(self, model: nn.Module, plans: list[LayerIntervention]):
        self.model, self.plans = model, plans
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "InterventionHooks":
        try:
            for plan in self.plans:
                block = self.model.get_submodule(plan.layer.block_path)
                experts = getattr(block, plan.layer.spec.experts_attr)
                positions = (forward_param_index(experts, plan.layer.spec.ids_arg),
                             forward_param_index(experts, plan.layer.spec.weights_arg))
                call: dict = {}  # the router's (input, output) of the block call now running
                policy = bound_policy(self.model, plan.layer) if plan.reroutes else None
                if policy is not None:
                    self._handles.append(policy.router.register_forward_hook(_keeper(call), with_kwargs=True))
                hook = _experts_hook(plan, policy, call, positions)
                self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self


def _keeper(call: dict):
    def hook(module, args, kwargs, output):
        call["x"] = args[0] if args else kwargs.get("hidden_states")
        call["output"] = output

    return hook


def _experts_hook(plan: LayerIntervention, policy, call: dict, positions):
    spec, k, n_experts = plan.layer.spec, plan.layer.top_k, plan.layer.n_experts
    drop = plan.drop or None
    listed = plan.force if isinstance(plan.force, tuple) else None
    zero = torch.tensor(plan.zero, dtype=torch.long) if plan.zero else None
    where = f"MoE layer {plan.layer.index}"

    def hook(module, args, kwargs):
        ids, weights = expert_args(args, kwargs, positions, spec)
        new_ids, new_weights = ids.reshape(-1, ids.shape[-1]).long(), weights.reshape(-1, weights.shape[-1]).float()
        if policy is not None:
            if "output" not in call:
                raise InterventionError(f"{where}: its experts ran without its router running first in the same call")
            x, output = call.pop("x"), call.pop("output")
            if drop is not None or listed is not None:
                new_ids, new_weights = policy.select(output, x, exclude=drop, force=listed)
            if callable(plan.force):
                new_ids = _forced(plan.force(new_ids), new_ids.shape, n_experts, where)
                new_weights = policy.weigh(output, x, new_ids, exclude=drop)
            if plan.route is not None:
                new_ids, new_weights = _routed(plan.route, new_ids, new_weights, policy, output, x, n_experts, where)
        if zero is not None:
            new_weights = new_weights.masked_fill(torch.isin(new_ids, zero.to(new_ids.device)), 0.0)
        return with_expert_args(args, kwargs, positions, spec, new_ids.to(ids.dtype).reshape(ids.shape[:-1] + (k,)),
                                new_weights.to(weights.dtype).reshape(weights.shape[:-1] + (k,)))

    return hook


def _routed(route, ids, weights, policy, output, x, n_experts: int, where: str):
    """route(ids, weights, logits, weigh), checked: integer ids and float weights of the routing's shape."""
    logits = router_tensor(output, policy.spec.router_output_index).float()
    if policy.spec.router_output == RouterOutput.PROBS:
        logits = logits.log()
    new_ids, new_weights = route(ids, weights, logits, lambda chosen: policy.weigh(output, x, chosen.long()))
    new_ids = _forced(new_ids, ids.shape, n_experts, where, "route")
    if not isinstance(new_weights, torch.Tensor) or tuple(new_weights.shape) != tuple(weights.shape):
        raise InterventionError(f"route: the function for {where} must return weights of shape {tuple(weights.shape)}")
    return new_ids, new_weights.float()


def _forced(ids, shape, n_experts: int, where: str, kind: str = "force") -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(shape) or ids.is_floating_point():
        raise InterventionError(f"{kind}: the function for {where} must return integer ids of shape {tuple(shape)}")
    if bool(((ids < 0) | (ids >= n_experts)).any()):
        raise InterventionError(f"{kind}: the function for {where} returned expert ids outside 0..{n_experts - 1}")
    return ids.long()
