"""Co-activation: how often each pair of experts is selected for the same token in the same layer.

counts[l, i, j] = tokens whose top-k set at layer l holds both i and j (symmetric; the diagonal is the
load). For each pair i < j: rate = counts / tokens, lift = P(i and j) / (P(i) P(j)) (1 = independent,
> 1 = chosen together more than chance), Jaccard = counts / (load_i + load_j - counts).
OVERALL sums the counts over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.kernels import jsonable, pair_counts
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "coactivation"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)


@dataclass(frozen=True, eq=False)
class CoactivationState:
    layers: tuple[int, ...]
    counts: np.ndarray  # int64 [L, E, E]
    n_tokens: int


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> CoactivationState:
    view = ShardView.of(shard, ctx)
    return CoactivationState(view.layers, pair_counts(view.ids, view.ids, view.E), view.T)


def accumulate_into(state: CoactivationState, shard: ShardData | ShardView, ctx: AnalysisContext) -> CoactivationState:
    """`merge(state, accumulate(shard))`, adding into `state`'s own counts (which it must own)."""
    view = ShardView.of(shard, ctx)
    if state.layers != view.layers:
        raise MoescopeError(f"cannot merge co-activation states of different layers {state.layers} and {view.layers}")
    pair_counts(view.ids, view.ids, view.E, out=state.counts)
    return CoactivationState(state.layers, state.counts, state.n_tokens + view.T)


def merge(a: CoactivationState, b: CoactivationState) -> CoactivationState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge co-activation states of different layers {a.layers} and {b.layers}")
    return CoactivationState(a.layers, a.counts + b.counts, a.n_tokens + b.n_tokens)


@dataclass(frozen=True, eq=False)
class CoactivationResult:
    layers: tuple[int, ...]
    counts: np.ndarray  # int64 [L, E, E]
    n_tokens: int
    top_n: int
    min_count: int  # pairs seen fewer times are left out of the summary's lift figures
    notes: tuple[str, ...] = ()

    def pairs(self) -> pd.DataFrame:
        """One row per layer (then OVERALL) and expert pair i < j."""
        L, E, _ = self.counts.shape
        stacked = np.concatenate([self.counts, self.counts.sum(axis=0, keepdims=True)])  # [L + 1, E, E]
        tokens = np.array([self.n_tokens] * L + [self.n_tokens * L], np.float64)
        i, j = np.triu_indices(E, 1)
        together = stacked[:, i, j].astype(np.float64)  # [L + 1, P]
        load = np.diagonal(stacked, axis1=1, axis2=2).astype(np.float64)  # [L + 1, E]
        with np.errstate(invalid="ignore", divide="ignore"):
            lift = together * tokens[:, None] / (load[:, i] * load[:, j])
            jaccard = together / (load[:, i] + load[:, j] - together)
        n_pairs = i.size
        return pd.DataFrame(
            {
                "layer": np.repeat([*self.layers, OVERALL], n_pairs),
                "expert_a": np.tile(i, L + 1),
                "expert_b": np.tile(j, L + 1),
                "count": together.ravel().astype(np.int64),
                "rate": (together / np.maximum(tokens[:, None], 1)).ravel(),
                "lift": lift.ravel(),
                "jaccard": jaccard.ravel(),
            }
        )

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        pairs = self.pairs()
        top = pairs[pairs.layer != OVERALL].sort_values(["count", "layer"], ascending=[False, True], kind="stable")
        return {"pairs": pairs, "top_pairs": top.groupby("layer", sort=True).head(self.top_n).reset_index(drop=True)}

    def summary(self) -> dict:
        pairs = self.pairs()
        per_layer = pairs[(pairs.layer != OVERALL) & (pairs["count"] >= max(self.min_count, 1))]
        frequent = per_layer.sort_values("rate", ascending=False, kind="stable").head(10)
        return jsonable(
            {
                "most_frequent_pairs": frequent[["layer", "expert_a", "expert_b", "rate", "lift"]].to_dict("records"),
                "max_lift": per_layer["lift"].max() if len(per_layer) else None,
                "mean_lift": per_layer["lift"].mean() if len(per_layer) else None,
            }
        )


def finalize(state: CoactivationState, ctx: AnalysisContext) -> CoactivationResult:
    notes = ("top-1 routing: no expert pairs",) if ctx.top_k < 2 else ()
    th = ctx.thresholds
    return CoactivationResult(state.layers, state.counts, state.n_tokens, th.top_n, th.min_count, notes)
