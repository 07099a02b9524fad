"""Routing change between an unquantized and a quantized model: pure tensor functions, no model here.

    top-1 flip     the expert with the largest gate weight differs
    top-k flip     the set of k chosen experts differs
    Jaccard        |A & B| / |A | B| of the two top-k sets
    KL             KL(p_ref || p_quant) of the router distributions over all experts
    entropy        of the router distribution (change = quantized - reference)

`RoutingDelta` accumulates sums over batches so a layer's numbers merge across batches by addition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moescope.adapters.spec import MoELayer, RouterOutput, Scoring


def router_log_probs(scores: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    """Log of the router's distribution over experts, float32 [N, E].

    Logits: softmax (sigmoid-scored routers: sigmoid scores normalised to sum 1); probabilities: renormalised.
    """
    scores = scores.float()
    if layer.spec.router_output == RouterOutput.PROBS:
        return torch.log(scores.clamp_min(0) / scores.clamp_min(0).sum(-1, keepdim=True)).clamp_min(-1e4)
    if layer.spec.scoring == Scoring.SIGMOID:
        logp = torch.nn.functional.logsigmoid(scores)
        return logp - torch.logsumexp(logp, -1, keepdim=True)
    return torch.log_softmax(scores, dim=-1)


def top1(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The id with the largest gate weight in each row; [N]."""
    return ids.gather(-1, weights.argmax(-1, keepdim=True)).squeeze(-1)


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A & B| per row for two [N, k] id sets without repeats; [N]."""
    return (a.long()[:, :, None] == b.long()[:, None, :]).any(-1).sum(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def kl(ref_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || q) per row, [N]."""
    return (ref_logp.exp() * (ref_logp - q_logp)).sum(-1).clamp_min(0)


@dataclass
class RoutingDelta:
    """Sums over tokens for one layer; `add` per batch, `result` at the end."""

    n: int = 0
    top1_flips: int = 0
    set_flips: int = 0
    jaccard: float = 0.0
    kl: float = 0.0
    entropy_ref: float = 0.0
    entropy_q: float = 0.0
    has_dist: bool = False

    def add(self, ref_ids, ref_w, q_ids, q_w, ref_logp=None, q_logp=None) -> None:
        k = ref_ids.shape[-1]
        inter = set_overlap(ref_ids, q_ids)
        self.n += int(ref_ids.shape[0])
        self.top1_flips += int((top1(ref_ids, ref_w) != top1(q_ids, q_w)).sum())
        self.set_flips += int((inter < k).sum())
        self.jaccard += float((inter / (2 * k - inter)).sum())
        if ref_logp is not None and q_logp is not None:
            self.has_dist = True
            self.kl += float(kl(ref_logp, q_logp).sum())
            self.entropy_ref += float(entropy(ref_logp).sum())
            self.entropy_q += float(entropy(q_logp).sum())

    def result(self) -> dict:
        n = max(self.n, 1)
        nan = float("nan")
        return {
            "n_tokens": self.n,
            "flip_top1": self.top1_flips / n,
            "flip_topk_set": self.set_flips / n,
            "jaccard": self.jaccard / n,
            "kl": self.kl / n if self.has_dist else nan,
            "entropy_ref": self.entropy_ref / n if self.has_dist else nan,
            "entropy_delta": (self.entropy_q - self.entropy_ref) / n if self.has_dist else nan,
        }
