"""Cost per token when experts differ in size (e.g. 4 x 2432 + 4 x 128 intermediate units).

For token t: size(t) = sum over layers and its k slots of the selected experts' intermediate sizes (a slot
holding no expert costs 0), and expert FLOPs(t) = sum of 2 * matrices * H * I over those experts
(context.expert_flops: 2 FLOPs per multiply-add, 3 matrices for SwiGLU). Its distribution is kept exactly
(counts per distinct size(t)), so quantiles are exact (inverted-CDF definition, numpy's
method="inverted_cdf"). Dense equivalent per token: sum over layers of 2 * matrices * H * D with
D = dense_intermediate_size, or k * mean expert size of the layer (a uniform-expert model with the same
parameters and k). An expert is large when its size exceeds `large_expert_size` (default: the midpoint
of the layer's smallest and largest expert); a token is "mostly large" at a layer when its mean selected
size there exceeds that threshold. With output entropy recorded, the Pearson correlation between
FLOPs(t) and the entropy of the model's next-token distribution at t, and mean entropy per cost level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import CoMoments, SparseCounts, jsonable
from moescope.analysis.result import layer_labels
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "token_cost"


@dataclass(frozen=True, eq=False)
class CostState:
    layers: tuple[int, ...]
    n_tokens: int
    size_distribution: SparseCounts | None  # key size(t); sums [entropy sum, entropy count]
    selected_size: np.ndarray | None  # int64 [L] sum of selected sizes
    large_slots: np.ndarray | None  # int64 [L]
    mostly_large: np.ndarray | None  # int64 [L] tokens whose mean selected size at l is large
    flops_entropy: CoMoments | None  # scalar moments of (FLOPs(t), entropy(t)) where entropy is finite


def large_threshold(ctx: AnalysisContext) -> np.ndarray:
    """float64 [L]: expert sizes above this are 'large'."""
    if ctx.thresholds.large_expert_size is not None:
        return np.full(ctx.n_layers, float(ctx.thresholds.large_expert_size))
    sizes = ctx.expert_sizes
    return (sizes.min(axis=1) + sizes.max(axis=1)) / 2.0


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> CostState:
    view = ShardView.of(shard, ctx)
    if ctx.expert_sizes is None:
        return CostState(view.layers, view.T, None, None, None, None, None)
    sizes = np.concatenate([ctx.expert_sizes, np.zeros((view.L, 1), np.int64)], axis=1)  # [L, E + 1]
    selected = sizes[np.arange(view.L)[:, None, None], view.ids]  # [L, T, k]
    per_layer = selected.sum(axis=2)  # [L, T]
    size_t = per_layer.sum(axis=0)  # [T]
    threshold = large_threshold(ctx)[:, None]
    entropy = view.shard.output_entropy
    entropy = np.full(view.T, np.nan) if entropy is None else entropy.astype(np.float64)
    finite = np.isfinite(entropy)
    moments = None
    if ctx.has_costs:
        flops = size_t * (2.0 * ctx.expert_matrices * ctx.hidden_size)
        moments = CoMoments.of(flops, entropy, axis=0, mask=finite)
    return CostState(
        view.layers,
        view.T,
        SparseCounts.from_keys(size_t, sums=np.stack([np.where(finite, entropy, 0.0), finite], axis=1)),
        per_layer.sum(axis=1),
        (selected > threshold[..., None]).sum(axis=(1, 2)),
        (per_layer > threshold * view.k).sum(axis=1),
        moments,
    )


def merge(a: CostState, b: CostState) -> CostState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge cost states of different layers {a.layers} and {b.layers}")
    if a.size_distribution is None or b.size_distribution is None:
        return CostState(a.layers, a.n_tokens + b.n_tokens, None, None, None, None, None)
    return CostState(
        a.layers,
        a.n_tokens + b.n_tokens,
        a.size_distribution.merge(b.size_distribution),
        a.selected_size + b.selected_size,
        a.large_slots + b.large_slots,
        a.mostly_large + b.mostly_large,
        None if a.flops_entropy is None else a.flops_entropy.merge(b.flops_entropy),
    )


@dataclass(frozen=True, eq=False)
class CostResult:
    layers: tuple[int, ...]
    n_tokens: int
    flops_per_size: float  # FLOPs per unit of summed intermediate size: 2 * matrices * H (NaN without H)
    size_values: np.ndarray  # int64 [N] distinct size(t), ascending
    size_counts: np.ndarray  # int64 [N]
    entropy_by_size: np.ndarray  # float64 [N] mean output entropy of tokens with that size(t) (NaN if none)
    per_layer: pd.DataFrame  # layer, mean_selected_size, large_share, mostly_large_share, mean_flops
    headline: dict  # mean/std/quantiles of FLOPs per token, dense equivalent, correlation
    notes: tuple[str, ...] = ()

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        distribution = pd.DataFrame(
            {
                "size_sum": self.size_values,
                "flops": self.size_values * self.flops_per_size,
                "count": self.size_counts,
                "share": self.size_counts / max(self.n_tokens, 1),
                "mean_output_entropy": self.entropy_by_size,
            }
        )
        return {"per_layer": self.per_layer, "distribution": distribution}

    def summary(self) -> dict:
        return jsonable({**self.headline, "notes": list(self.notes)})


def finalize(state: CostState, ctx: AnalysisContext) -> CostResult | None:
    L = len(state.layers)
    if state.size_distribution is None:
        empty = np.zeros(0, np.int64)
        return CostResult(
            state.layers,
            state.n_tokens,
            np.nan,
            empty,
            empty,
            np.zeros(0),
            pd.DataFrame(),
            {},
            ("no expert sizes in the context: cost per token skipped",),
        )
    dist = state.size_distribution
    values, counts = dist.keys, dist.counts
    n = counts.sum()
    per_size = 2.0 * ctx.expert_matrices * ctx.hidden_size if ctx.has_costs else np.nan
    mean_size = (values * counts).sum() / n
    std_size = np.sqrt(((values - mean_size) ** 2 * counts).sum() / n)
    cum = np.cumsum(counts)
    quantiles = {
        f"p{int(q * 100)}": values[np.searchsorted(cum, q * n, side="left")] for q in (0.1, 0.25, 0.5, 0.75, 0.9)
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy_by_size = np.where(dist.sums[:, 1] > 0, dist.sums[:, 0] / dist.sums[:, 1], np.nan)
    dense_size = (
        np.full(L, float(ctx.dense_intermediate_size))
        if ctx.dense_intermediate_size
        else ctx.top_k * ctx.expert_sizes.mean(axis=1)
    )
    slots = state.n_tokens * ctx.top_k
    mean_selected = state.selected_size / max(slots, 1)
    per_layer = pd.DataFrame(
        {
            "layer": layer_labels(state.layers),
            "mean_selected_size": np.append(mean_selected, mean_selected.mean()),
            "large_share": np.append(state.large_slots, state.large_slots.sum() / L) / max(slots, 1),
            "mostly_large_share": np.append(state.mostly_large, state.mostly_large.sum() / L) / max(state.n_tokens, 1),
            "mean_flops": np.append(mean_selected * ctx.top_k, mean_selected.sum() * ctx.top_k) * per_size,
        }
    )
    headline = {
        "mean_selected_size": mean_size / (L * ctx.top_k),
        "mean_flops_per_token": mean_size * per_size,
        "std_flops_per_token": std_size * per_size,
        "min_flops_per_token": values[0] * per_size,
        "max_flops_per_token": values[-1] * per_size,
        **{f"{name}_flops_per_token": v * per_size for name, v in quantiles.items()},
        "dense_equivalent_flops_per_token": dense_size.sum() * per_size,
        "fraction_of_dense": mean_size / dense_size.sum(),
        "large_share": state.large_slots.sum() / max(slots * L, 1),
        "mostly_large_share": state.mostly_large.sum() / max(state.n_tokens * L, 1),
        "flops_entropy_pearson": state.flops_entropy.pearson() if state.flops_entropy is not None else np.nan,
        "tokens_with_entropy": state.flops_entropy.n if state.flops_entropy is not None else 0,
    }
    notes = []
    if not ctx.has_costs:
        notes.append("no hidden size in the context: sizes reported, FLOPs are NaN")
    if state.flops_entropy is None or not state.flops_entropy.n:
        notes.append("no output entropy recorded: no correlation with cost")
    if (ctx.expert_sizes.min(axis=1) == ctx.expert_sizes.max(axis=1)).all():
        notes.append("all experts have the same size: every token costs the same")
    return CostResult(
        state.layers, state.n_tokens, per_size, values, counts, entropy_by_size, per_layer, headline, tuple(notes)
    )
