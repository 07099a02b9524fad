"""Families whose routing is their own (RouterSpec.scoring CUSTOM), one policy each, named by `selection_policy`.

    gemma4   probabilities from the router; top-k, renormalised, times the router's per_expert_scale[id]
    inkling  sigmoid(routed logits) + bias selects; the chosen routed logits and the shared-expert logits are
             normalised together (softmax of logsigmoid), times route_scale and the router's global_scale
    zaya     softmax over E + 1 classes (the last is a no-compute "skip"); top-k of probs + balancing_biases;
             weights the unbiased probs; a chosen skip reaches the experts as id 0 with weight 0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moescope.adapters.policy.base import NEG_INF, LayerPolicy, Scored, router_tensor
from moescope.errors import RoutingPolicyError


class Gemma4Policy(LayerPolicy):
    def weigh_scored(self, scored: Scored, ids: torch.Tensor) -> torch.Tensor:
        weights = scored.source.gather(-1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.router.per_expert_scale.detach().float()[ids]


class InklingPolicy(LayerPolicy):
    reroute_problem = ("Inkling normalises the shared experts' gates together with the chosen routed experts' "
                       "(the router's 4th output), so re-routing would also change the shared gates, which the "
                       "experts module never sees; only zero= interventions are supported")

    def scored(self, output, x, exclude) -> Scored:
        if x is None:
            raise RoutingPolicyError(f"MoE layer {self.layer.index} (inkling): its weights need the shared-expert "
                                     "logits, computed from the router's input")
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.router.weight.float())  # [N, E + S]
        n_shared = int(self.router.n_shared_experts)
        routed = logits[:, :-n_shared]
        mask = self._mask(exclude, routed.shape[-1], routed.device)
        if mask is not None:
            routed = routed.masked_fill(mask, NEG_INF)
        source = torch.cat([routed, logits[:, -n_shared:]], dim=-1)  # routed logits, then the shared ones
        return Scored(source, self._biased(torch.sigmoid(routed), routed))

    def weigh_scored(self, scored: Scored, ids: torch.Tensor) -> torch.Tensor:
        n_shared = int(self.router.n_shared_experts)
        chosen = torch.cat([scored.source.gather(-1, ids), scored.source[:, -n_shared:]], dim=-1)  # [N, k + S]
        log_gates = F.logsigmoid(chosen)
        gates = torch.exp(log_gates - torch.logsumexp(log_gates, dim=-1, keepdim=True))
        return (gates * self.scale * self.router.global_scale.detach().float())[:, : ids.shape[-1]]


class ZayaPolicy(LayerPolicy):
    def scored(self, output, x, exclude) -> Scored:
        logits = router_tensor(output, self.spec.router_output_index).float()  # [N, E + 1]: the last class skips
        mask = self._mask(exclude, logits.shape[-1], logits.device)
        if mask is not None:
            logits = logits.masked_fill(mask, NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        return Scored(probs, probs + self.router.balancing_biases.detach().float())

    def select(self, output, x=None, *, input_ids=None, exclude=None, force=None):
        ids, weights = super().select(output, x, input_ids=input_ids, exclude=exclude, force=force)
        skip = ids == self.router.num_experts
        return ids.masked_fill(skip, 0), weights.masked_fill(skip, 0.0)


CUSTOM_POLICIES: dict[str, type[LayerPolicy]] = {"gemma4": Gemma4Policy, "inkling": InklingPolicy, "zaya": ZayaPolicy}
