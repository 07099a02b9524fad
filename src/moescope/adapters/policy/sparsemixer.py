"""PhiMoE's sparsemixer (eval path): two rounds of argmax, each weighted by a softmax over the logits near the max.

Round r: the best remaining logit m_r is chosen; its weight is its softmax probability among the logits l
with (m_r - l) / max(|l|, m_r) <= 2 * router_jitter_noise (the others are masked). Round 2 masks round 1's
expert first. Dropped experts enter as logits of -inf, which is what removing their router rows gives.
"""

from __future__ import annotations

import torch

from moescope.adapters.policy.base import NEG_INF, LayerPolicy, Scored, router_tensor
from moescope.errors import RoutingPolicyError


class SparsemixerPolicy(LayerPolicy):
    can_force_list = False

    def __init__(self, model, layer):
        super().__init__(model, layer)
        if self.k != 2:
            raise RoutingPolicyError(f"MoE layer {layer.index}: sparsemixer routes to exactly 2 experts, not {self.k}")
        self.jitter = float(getattr(self.router, "router_jitter_noise", None) or getattr(self.config, "router_jitter_noise", 0.0))

    def scored(self, output, x, exclude) -> Scored:
        logits = router_tensor(output, self.spec.router_output_index).float()
        mask = self._mask(exclude, logits.shape[-1], logits.device)
        logits = logits if mask is None else logits.masked_fill(mask, NEG_INF)
        return Scored(logits, logits)

    def select(self, output, x=None, *, input_ids=None, exclude=None, force=None):
        if force is not None:
            raise RoutingPolicyError(f"MoE layer {self.layer.index} (sparsemixer): each choice depends on the one "
                                     "before, so a forced expert list is not defined; force with a function of ids")
        logits = self.scored(output, x, exclude).source
        if exclude is not None and bool((torch.isfinite(logits).sum(-1) < 2).any()):
            raise RoutingPolicyError(f"MoE layer {self.layer.index}: fewer than 2 experts are left to choose from")
        first = logits.argmax(dim=-1, keepdim=True)  # [N, 1]
        second = logits.scatter(-1, first, NEG_INF).argmax(dim=-1, keepdim=True)
        ids = torch.cat([first, second], dim=-1)
        return ids, self._gates(logits, ids)

    def weigh_scored(self, scored: Scored, ids: torch.Tensor) -> torch.Tensor:
        return self._gates(scored.source, ids)

    def _gates(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weight of round 1's expert ids[:, 0] and round 2's ids[:, 1]; [N, 2]."""
        gates, masked = [], logits
        for r in range(2):
            chosen = ids[:, r : r + 1]
            top = masked.gather(-1, chosen)  # the round's max
            factor = logits.abs().clamp(min=top)
            far = (top - logits) / factor > 2 * self.jitter
            gates.append(torch.softmax(masked.masked_fill(far, NEG_INF), dim=-1).gather(-1, chosen))
            masked = masked.scatter(-1, chosen, NEG_INF)
        return torch.cat(gates, dim=-1)
