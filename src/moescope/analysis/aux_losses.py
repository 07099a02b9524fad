"""Auxiliary router losses recomputed from captured router outputs.

Switch-Transformer load-balancing loss, as transformers' `load_balancing_loss_func` computes it:
    loss = E * sum_i f_i * P_i,  f_i = (slots routed to expert i) / tokens  (sums to k),
                                 P_i = mean router probability of expert i.
Per layer it is the loss of that layer alone; OVERALL pools every (layer, token) row exactly like
transformers does when given the tuple of all layers' logits (so it is *not* the mean of per-layer
losses). Perfect balance gives k. Pooling hides imbalance: layers that prefer different experts average
out in f and P, so the pooled loss can sit at k while every layer is far above it. The summary therefore
leads with the worst layer and the mean over layers, and names the pooled value
`load_balancing_loss_pooled_transformers`. f uses the experts the model actually selected (captured ids), which is
transformers' top-k of softmax(logits) for plain softmax routers. Both f and P cover the routed experts only
(a router's non-compute classes, LongCat's identity experts or ZAYA's skip, are no expert's load).

Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2. It needs logits; when the trace holds
probabilities it is skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import jsonable, merge_arrays
from moescope.analysis.result import layer_labels, worst_and_mean
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "aux_losses"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)


@dataclass(frozen=True, eq=False)
class AuxLossState:
    layers: tuple[int, ...]
    counts: np.ndarray  # int64 [L, E] selected slots per expert
    n_tokens: int
    prob_sum: np.ndarray | None  # float64 [L, E] sum over tokens of router probabilities
    lse_sq_sum: np.ndarray | None  # float64 [L] sum over tokens of logsumexp(logits)^2


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> AuxLossState:
    view = ShardView.of(shard, ctx)
    probs, lse = view.router_probs, view.router_logsumexp
    return AuxLossState(
        view.layers,
        view.load[:, : view.E].copy(),
        view.T,
        None if probs is None else probs[: view.E].sum(axis=2, dtype=np.float64).T,  # [R, L, T] -> [L, E]: routed experts
        None if lse is None else np.square(lse).sum(axis=1),
    )


def merge(a: AuxLossState, b: AuxLossState) -> AuxLossState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge states of different layers {a.layers} and {b.layers}")
    if (a.prob_sum is None) != (b.prob_sum is None) or (a.lse_sq_sum is None) != (b.lse_sq_sum is None):
        raise MoescopeError("cannot merge shards with and without router outputs")
    return AuxLossState(
        a.layers,
        a.counts + b.counts,
        a.n_tokens + b.n_tokens,
        merge_arrays(a.prob_sum, b.prob_sum),
        merge_arrays(a.lse_sq_sum, b.lse_sq_sum),
    )


@dataclass(frozen=True, eq=False)
class AuxLossResult:
    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    tokens_fraction: np.ndarray  # float64 [L, E]: f_i per layer
    mean_prob: np.ndarray  # float64 [L, E]: P_i per layer (NaN without router outputs)
    load_balancing_loss: np.ndarray  # float64 [L + 1]: per layer, then OVERALL (pooled)
    z_loss: np.ndarray  # float64 [L + 1]: per layer, then OVERALL (NaN without logits)
    notes: tuple[str, ...] = ()

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        L, E = self.tokens_fraction.shape
        per_layer = pd.DataFrame(
            {"layer": layer_labels(self.layers), "load_balancing_loss": self.load_balancing_loss, "z_loss": self.z_loss}
        )
        per_expert = pd.DataFrame(
            {
                "layer": np.repeat(self.layers, E),
                "expert": np.tile(np.arange(E), L),
                "tokens_fraction": self.tokens_fraction.ravel(),
                "mean_prob": self.mean_prob.ravel(),
            }
        )
        return {"per_layer": per_layer, "per_expert": per_expert}

    def summary(self) -> dict:
        """Per-layer losses first (worst layer, mean over layers), then the pooled one transformers computes."""
        return jsonable(
            {
                **worst_and_mean(self.load_balancing_loss[:-1], self.layers, "load_balancing_loss", worst=np.nanargmax),
                "load_balancing_loss_balanced": float(self.top_k),
                "load_balancing_loss_pooled_transformers": self.load_balancing_loss[-1],
                "z_loss": self.z_loss[-1],
                "notes": list(self.notes),
            }
        )


def finalize(state: AuxLossState, ctx: AnalysisContext) -> AuxLossResult:
    L, E = state.counts.shape
    T = max(state.n_tokens, 1)
    f = state.counts / T  # [L, E]
    notes: list[str] = []
    if state.prob_sum is None:
        notes.append(ctx.missing_router_output("the load-balancing loss and z-loss"))
        P = np.full((L, E), np.nan)
        lb = np.full(L + 1, np.nan)
    else:
        P = state.prob_sum / T
        lb = np.append(E * (f * P).sum(axis=1), E * (f.sum(axis=0) / L * P.sum(axis=0) / L).sum())
    if state.lse_sq_sum is None:
        if state.prob_sum is not None:
            notes.append("router outputs are probabilities: the z-loss needs logits and is skipped")
        z = np.full(L + 1, np.nan)
    else:
        z = np.append(state.lse_sq_sum / T, state.lse_sq_sum.sum() / (L * T))
    return AuxLossResult(state.layers, E, ctx.top_k, f, P, lb, z, tuple(notes))
