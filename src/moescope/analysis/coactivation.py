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
from moescope.analysis.kernels import jsonable, pair_counts, symmetrised, token_count_dtype, widened
from moescope.analysis.result import TABLE_PIECE_ROWS, ChunkedTable
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "coactivation"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)


@dataclass(frozen=True, eq=False)
class CoactivationState:
    layers: tuple[int, ...]
    counts: np.ndarray  # int32 (int64 past 2**31 - 1 tokens) [L, E, E]: each pair in one of its two cells (kernels.
    # pair_counts' triangle: the cell its slots came in), the diagonal the load; symmetrised at finalize
    n_tokens: int


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> CoactivationState:
    view = ShardView.of(shard, ctx)
    counts = np.zeros((view.L, view.E, view.E), token_count_dtype(view.T))
    ids = view.ids
    return CoactivationState(view.layers, pair_counts(ids, ids, view.E, out=counts, triangle=True), view.T)


def accumulate_into(state: CoactivationState, shard: ShardData | ShardView, ctx: AnalysisContext) -> CoactivationState:
    """`merge(state, accumulate(shard))`, adding into `state`'s own counts (which it must own)."""
    view = ShardView.of(shard, ctx)
    if state.layers != view.layers:
        raise MoescopeError(f"cannot merge co-activation states of different layers {state.layers} and {view.layers}")
    counts = widened(state.counts, state.n_tokens + view.T)
    ids = view.ids
    pair_counts(ids, ids, view.E, out=counts, triangle=True)
    return CoactivationState(state.layers, counts, state.n_tokens + view.T)


def merge(a: CoactivationState, b: CoactivationState) -> CoactivationState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge co-activation states of different layers {a.layers} and {b.layers}")
    tokens = a.n_tokens + b.n_tokens
    return CoactivationState(a.layers, widened(a.counts, tokens) + b.counts, tokens)


@dataclass(frozen=True, eq=False)
class CoactivationResult:
    layers: tuple[int, ...]
    counts: np.ndarray  # int32 or int64 [L, E, E]
    n_tokens: int
    top_n: int
    min_count: int  # pairs seen fewer times are left out of the summary's lift figures
    notes: tuple[str, ...] = ()

    def pairs(self) -> pd.DataFrame:
        """One row per layer (then OVERALL) and expert pair i < j."""
        return self.pair_table().to_pandas()

    def _rows(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """The columns of `pairs()` for stacked layers lo..hi-1 of [L + 1] (index L: OVERALL, every layer summed)."""
        L, E, _ = self.counts.shape
        i, j = np.triu_indices(E, 1)
        stacked = np.stack([self.counts[l] if l < L else self.counts.sum(axis=0) for l in range(lo, hi)])  # [n, E, E]
        tokens = np.array([self.n_tokens if l < L else self.n_tokens * L for l in range(lo, hi)], np.float64)
        together = stacked[:, i, j].astype(np.float64)  # [n, P]
        load = np.diagonal(stacked, axis1=1, axis2=2).astype(np.float64)  # [n, E]
        with np.errstate(invalid="ignore", divide="ignore"):
            lift = together * tokens[:, None] / (load[:, i] * load[:, j])
            jaccard = together / (load[:, i] + load[:, j] - together)
        labels = np.array([*self.layers, OVERALL])[lo:hi]
        return {
            "layer": np.repeat(labels, i.size),
            "expert_a": np.tile(i, hi - lo),
            "expert_b": np.tile(j, hi - lo),
            "count": together.ravel().astype(np.int64),
            "rate": (together / np.maximum(tokens[:, None], 1)).ravel(),
            "lift": lift.ravel(),
            "jaccard": jaccard.ravel(),
        }

    def pair_table(self) -> ChunkedTable:
        """`pairs()` built a few layers at a time (1.9 M rows at DeepSeek-V3's shape)."""
        L, E, _ = self.counts.shape
        n_pairs = E * (E - 1) // 2
        per_piece = max(1, TABLE_PIECE_ROWS // max(1, n_pairs))

        def pieces():
            for lo in range(0, L + 1, per_piece):
                yield pd.DataFrame(self._rows(lo, min(lo + per_piece, L + 1)))

        return ChunkedTable(pieces, (L + 1) * n_pairs)

    def top_pairs(self) -> pd.DataFrame:
        """The top_n pairs of each layer by count (ties to the lower pair), all layers ordered by count descending,
        then layer."""
        L = self.counts.shape[0]
        best = []
        for l in range(L):  # one layer's pairs at a time
            rows = pd.DataFrame(self._rows(l, l + 1))
            best.append(rows.sort_values("count", ascending=False, kind="stable").head(self.top_n))
        top = pd.concat(best) if best else pd.DataFrame(self._rows(0, 0))
        return top.sort_values(["count", "layer"], ascending=[False, True], kind="stable").reset_index(drop=True)

    def chunked_tables(self) -> dict[str, pd.DataFrame | ChunkedTable]:
        return {"pairs": self.pair_table(), "top_pairs": self.top_pairs()}

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        return {"pairs": self.pairs(), "top_pairs": self.top_pairs()}

    def summary(self) -> dict:
        columns = ("layer", "expert_a", "expert_b", "rate", "lift")
        lifts, frequent = [], []  # per layer: the lifts of pairs seen often enough, its 10 highest rates
        for l in range(self.counts.shape[0]):  # one layer's pairs at a time
            rows = self._rows(l, l + 1)
            keep = np.flatnonzero(rows["count"] >= max(self.min_count, 1))
            lifts.append(rows["lift"][keep])
            best = keep[np.argsort(-rows["rate"][keep], kind="stable")[:10]]
            frequent.append(pd.DataFrame({c: rows[c][best] for c in columns}))
        lift = pd.Series(np.concatenate(lifts))
        frequent = pd.concat(frequent, ignore_index=True)
        frequent = frequent.iloc[np.argsort(-frequent["rate"].to_numpy(), kind="stable")[:10]]
        return jsonable(
            {
                "most_frequent_pairs": frequent.to_dict("records"),
                "max_lift": lift.max() if len(lift) else None,
                "mean_lift": lift.mean() if len(lift) else None,
            }
        )


def finalize(state: CoactivationState, ctx: AnalysisContext) -> CoactivationResult:
    notes = ("top-1 routing: no expert pairs",) if ctx.top_k < 2 else ()
    th = ctx.thresholds
    return CoactivationResult(state.layers, symmetrised(state.counts), state.n_tokens, th.top_n, th.min_count, notes)
