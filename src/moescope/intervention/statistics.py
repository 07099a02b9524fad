"""Routing statistics per expert from a trace, the orders they give for pruning, and rank correlation.

    frequency         share of tokens routed to the expert (slots / tokens)
    mean_gate_weight  mean gate weight over the tokens routed to it
    reap              mean over the tokens routed to it of gate weight x ||expert output|| (REAP; needs the
                      trace's optional expert_norms column, `capture --save-expert-norms`)

Sums are taken per shard with the analyses' counting kernel (analysis/kernels.expert_counts: one offset
bincount each, no per-token Python) and added over shards: accumulate, merge, finalize.
Non-compute choices (ids >= n_experts) count toward no expert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce

import numpy as np
import pandas as pd

from moescope.analysis.kernels import expert_counts

STATISTICS = ("frequency", "mean_gate_weight", "reap")


@dataclass
class RoutingSums:
    n_tokens: np.ndarray  # int64 [D]: tokens per domain
    slots: np.ndarray  # int64 [D, L, E]: routing slots per domain, layer and expert
    weight: np.ndarray  # float64 [L, E]: summed gate weight
    reap: np.ndarray  # float64 [L, E]: summed gate weight x expert output norm (NaN without norms)
    domains: tuple[str, ...]
    n_experts: list[int]  # per layer
    norms_missing: bool = False  # a shard had no expert_norms: reap is NaN once finalized


def accumulate(shard, n_experts: list[int], domains: tuple[str, ...]) -> RoutingSums:
    """One shard's sums (a moescope.trace.shard.ShardData), counted with the analyses' kernel (expert_counts)."""
    L, E, D = len(n_experts), max(n_experts), max(len(domains), 1)
    limit = np.asarray(n_experts)[:, None, None]
    ids = np.where(shard.topk_ids < limit, shard.topk_ids, -1)  # [L, T, k]; beyond the layer's experts: none
    weights = shard.topk_weights.astype(np.float64)
    norms_missing = shard.expert_norms is None
    reap = np.zeros((L, E)) if norms_missing else expert_counts(ids, E, weights=weights * shard.expert_norms)
    return RoutingSums(np.bincount(shard.domain, minlength=D)[:D], expert_counts(ids, E, group=shard.domain, n_groups=D),
                       expert_counts(ids, E, weights=weights), reap, domains, n_experts, norms_missing)


def merge(a: RoutingSums, b: RoutingSums) -> RoutingSums:
    return RoutingSums(a.n_tokens + b.n_tokens, a.slots + b.slots, a.weight + b.weight, a.reap + b.reap, a.domains,
                       a.n_experts, a.norms_missing or b.norms_missing)


def finalize(sums: RoutingSums) -> RoutingSums:
    """The sums as the statistics read them: reap NaN when any shard had no expert norms."""
    return replace(sums, reap=np.full_like(sums.reap, np.nan)) if sums.norms_missing else sums


def routing_sums(trace) -> RoutingSums:
    """Sums over every shard of `trace` (a moescope.trace.reader.Trace): accumulate, merge, finalize."""
    n_experts, domains = [int(layer["n_experts"]) for layer in trace.layers], tuple(trace.domain_names)
    L, E, D = len(n_experts), max(n_experts), max(len(domains), 1)
    empty = RoutingSums(np.zeros(D, np.int64), np.zeros((D, L, E), np.int64), np.zeros((L, E)), np.zeros((L, E)),
                        domains, n_experts)
    return finalize(reduce(merge, (accumulate(shard, n_experts, domains) for shard in trace.shards()), empty))


def expert_statistics(sums: RoutingSums) -> pd.DataFrame:
    """One row per (layer, expert): n_slots, frequency, mean_gate_weight, reap."""
    slots = sums.slots.sum(0)  # [L, E]
    tokens = max(int(sums.n_tokens.sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_weight = np.where(slots > 0, sums.weight / slots, np.nan)
        reap = np.where(slots > 0, sums.reap / slots, np.nan)
    layer, expert = _cells(sums)
    return pd.DataFrame({"layer": layer, "expert": expert, "n_slots": slots[layer, expert],
                         "frequency": slots[layer, expert] / tokens, "mean_gate_weight": mean_weight[layer, expert],
                         "reap": reap[layer, expert]})


def _cells(sums: RoutingSums) -> tuple[np.ndarray, np.ndarray]:
    """(layer, expert) index arrays of every real expert, layer-major."""
    E = sums.slots.shape[2]
    real = np.arange(E)[None, :] < np.asarray(sums.n_experts)[:, None]  # [L, E]
    return np.nonzero(real)


def domain_frequency(sums: RoutingSums) -> pd.DataFrame:
    """One row per (layer, domain, expert): the expert's routing frequency on that domain's tokens and on all
    other tokens, and their difference (how specific to the domain it is)."""
    total_slots, total_tokens = sums.slots.sum(0), sums.n_tokens.sum()
    layer, expert = _cells(sums)
    frames = []
    for d, domain in enumerate(sums.domains):
        inside = (sums.slots[d] / max(int(sums.n_tokens[d]), 1))[layer, expert]
        outside = ((total_slots - sums.slots[d]) / max(int(total_tokens - sums.n_tokens[d]), 1))[layer, expert]
        frames.append(pd.DataFrame({"layer": layer, "domain": domain, "expert": expert, "frequency_in_domain": inside,
                                    "frequency_elsewhere": outside, "specificity": inside - outside}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["layer", "domain", "expert", "frequency_in_domain", "frequency_elsewhere", "specificity"])


def most_specific(freq: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, domain): the expert with the largest specificity (ties: the lower id)."""
    ranked = freq.sort_values(["layer", "domain", "specificity", "expert"], ascending=[True, True, False, True])
    return ranked.groupby(["layer", "domain"], sort=True).head(1).reset_index(drop=True)


def pruning_order(experts: pd.DataFrame, criterion: str, seed: int = 0) -> dict[int, list[int]]:
    """Per layer, its experts from the least to the most important by `criterion` (a column of `experts`,
    higher = more important; NaN counts as least), or "random" (a fixed permutation per layer)."""
    order = {}
    rng = np.random.default_rng(seed)
    for layer, group in experts.groupby("layer", sort=True):
        if criterion == "random":
            order[int(layer)] = [int(e) for e in rng.permutation(group["expert"].to_numpy())]
            continue
        score = group[criterion].to_numpy(dtype=float)
        key = np.where(np.isnan(score), -np.inf, score)
        ranked = np.lexsort((group["expert"].to_numpy(), key))  # ascending score, then expert id
        order[int(layer)] = [int(e) for e in group["expert"].to_numpy()[ranked]]
    return order


def spearman(x, y) -> float:
    """Spearman rank correlation of the pairs where both are finite (average ranks for ties); NaN if fewer
    than 3 pairs or either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    rx, ry = pd.Series(x[keep]).rank().to_numpy(), pd.Series(y[keep]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
