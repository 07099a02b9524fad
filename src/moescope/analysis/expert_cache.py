"""Expert cache: hit rate of a per-layer cache of C experts, LRU alone or fed by a prefetch predictor.

The cache model is stack_distance.py's (the offload simulator's LRU too): one LRU cache per layer, cold at each sequence start, a token's
prefetch batch inserted before its experts are looked up. Predictors (for layer l, from layer l-1):
  lru               no prefetch.
  same_index        prefetch S(l-1), the experts the token used one layer earlier.
  transition        prefetch the transition predictor's k experts for the first choice at l-1 (see
                    cross_layer.py; cross-fitted by document fold). Needs `ctx.prefetch_table`, which
                    run_analyses learns in a first pass when it can read the shards twice.
  popularity        the static baseline: prefetch layer l's k most-loaded experts in the other fold (from
                    the same table) before every token, at every layer: the popular experts stay pinned
                    as the most recent entries, and the rest of the cache is LRU.
  router_lookahead  prefetch predicted_next_ids[l-1] (layer l's router on layer l-1's input).
Layer 0 has no earlier layer, so every predictor but popularity equals LRU there. The previous-token
predictor is not simulated: its experts are already the most recent entries of an LRU cache, so it
equals LRU. When one fold of the table is empty, transition and popularity are left out with a warning.
hit_rate(C) = hits / lookups over real experts, for every C from the largest batch to E.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.cross_layer import fold_of
from moescope.analysis.kernels import jsonable
from moescope.analysis.shard_view import ShardView, predicted_next_ids_of
from moescope.analysis.stack_distance import rank_counts
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "expert_cache"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)
IDS_ONLY = True  # reads expert ids (and next-layer predictions), never gate weights or router outputs


@dataclass(frozen=True, eq=False)
class CacheState:
    layers: tuple[int, ...]
    predictors: tuple[str, ...]
    batch_size: tuple[int, ...]  # largest batch each predictor inserts (the smallest valid capacity)
    rank_counts: np.ndarray  # int64 [P, L, E + 1]: lookups by LRU rank; column E = no prior use
    n_tokens: int


def prefetch_sources(view: ShardView, ctx: AnalysisContext, dtype=np.intp) -> dict[str, np.ndarray | None]:
    """predictor -> `dtype` [L, T, kp] experts to prefetch into layer l's cache (row 0 all sentinel E); also
    what simulate/offload.py prefetches. `dtype` must hold E (the expert-cache pass takes int16 at E < 2**15)."""
    E, L, k = view.E, view.L, view.k

    def below_a_sentinel_row(rows: np.ndarray, row: np.ndarray | None = None) -> np.ndarray:
        """[L, T, kp], row 0 all E, rows 1.. `rows` [L - 1, T, kp] (or, with `row` [L - 1, T], rows[row])."""
        out = np.empty((L, view.T, rows.shape[-1]), dtype)
        out[0] = E
        if row is None:
            out[1:] = rows
        else:
            np.take(rows, row, axis=0, out=out[1:], mode="clip")  # row is in range: clip only skips a buffered copy
        return out

    sources: dict[str, np.ndarray | None] = {"lru": None, "same_index": below_a_sentinel_row(view.ids[:-1])}
    table = ctx.prefetch_table
    if table is not None and table.empty_fold_warning() is None:
        pred = table.padded_predictions(k, dtype)  # [2, L-1, E + 1, kp] learned per fold: row E (no first choice) all E
        if pred.shape[1] != L - 1:
            raise MoescopeError(f"prefetch table covers {pred.shape[1] + 1} layers, the shard {L}")
        learned_on = 1 - fold_of(view.shard)  # [T] tokens use the other fold's table
        layer = np.arange(L)[:, None]  # [L, 1]
        # one row of a flat table per (layer, token): np.take of rows, about 3x faster than indexing with three arrays
        row = (learned_on * (L - 1) + layer[:-1]) * (E + 1) + view.first_choice[:-1]  # [L - 1, T] into [2, L-1, E+1]
        sources["transition"] = below_a_sentinel_row(pred.reshape(-1, pred.shape[3]), row)
        popular = table.popular(k).astype(dtype)  # [2, L, k]
        sources["popularity"] = np.take(popular.reshape(2 * L, -1), learned_on * L + layer, axis=0)  # [L, T, k]
    predicted = predicted_next_ids_of(view.shard)
    if predicted is not None:
        sources["router_lookahead"] = below_a_sentinel_row(np.where((predicted >= 0) & (predicted < E), predicted, E)[:-1])
    return sources


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> CacheState:
    view = ShardView.of(shard, ctx)
    E = view.E
    compact = np.int16 if E < np.iinfo(np.int16).max else np.intp  # ids up to the sentinel E: less memory to walk
    sources = prefetch_sources(view, ctx, compact)
    ids = view.compact_ids if compact is np.int16 else view.ids
    # one LRU stack-distance pass per predictor over the L caches (analysis/stack_distance.py)
    counts = np.stack([rank_counts(ids, prefetch, ~view.has_previous, E) for prefetch in sources.values()])
    batch = tuple(view.k if s is None else max(view.k, s.shape[2]) for s in sources.values())
    return CacheState(view.layers, tuple(sources), batch, counts, view.T)


def merge(a: CacheState, b: CacheState) -> CacheState:
    if a.layers != b.layers or a.predictors != b.predictors:
        raise MoescopeError("cannot merge expert-cache states of different layers or predictors")
    return CacheState(a.layers, a.predictors, a.batch_size, a.rank_counts + b.rank_counts, a.n_tokens + b.n_tokens)


@dataclass(frozen=True, eq=False)
class CacheResult:
    layers: tuple[int, ...]
    predictors: tuple[str, ...]
    capacities: np.ndarray  # int64 [C] from top_k to E
    hits: np.ndarray  # int64 [P, L, C] (-1 where C is below the predictor's batch size)
    lookups: np.ndarray  # int64 [P, L]
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what a user must see (the CLI prints it on stderr): an empty fold

    def hit_rate(self) -> np.ndarray:
        """float64 [P, L + 1, C]: per layer, then OVERALL (NaN where not valid)."""
        hits = np.concatenate([self.hits, self.hits.sum(axis=1, keepdims=True)], axis=1).astype(np.float64)
        hits[hits < 0] = np.nan
        lookups = np.concatenate([self.lookups, self.lookups.sum(axis=1, keepdims=True)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return hits / lookups[..., None]

    def to_pandas(self) -> pd.DataFrame:
        P, L, C = self.hits.shape
        rate = self.hit_rate()
        hits = np.concatenate([self.hits, self.hits.sum(axis=1, keepdims=True)], axis=1)
        lookups = np.concatenate([self.lookups, self.lookups.sum(axis=1, keepdims=True)], axis=1)
        return pd.DataFrame(
            {
                "predictor": np.repeat(self.predictors, (L + 1) * C),
                "layer": np.tile(np.repeat([*self.layers, OVERALL], C), P),
                "capacity": np.tile(self.capacities, P * (L + 1)),
                "hits": np.where(hits < 0, -1, hits).ravel(),
                "lookups": np.repeat(lookups.ravel(), C),
                "hit_rate": rate.ravel(),
            }
        )

    def summary(self) -> dict:
        rate = self.hit_rate()[:, -1]  # [P, C] overall
        out = {}
        E = int(self.capacities[-1])
        k = int(self.capacities[0])
        for capacity in sorted({min(2 * k, E), max(k, E // 2)}):
            c = capacity - k
            for p, name in enumerate(self.predictors):
                out[f"hit_rate_{name}_C{capacity}"] = rate[p, c]
        out["notes"] = list(self.notes)
        return jsonable(out)


def finalize(state: CacheState, ctx: AnalysisContext) -> CacheResult:
    E, k = ctx.n_experts, ctx.top_k
    capacities = np.arange(k, E + 1)
    cumulative = np.cumsum(state.rank_counts[..., :E], axis=-1)  # [P, L, E]: lookups with rank < C at index C-1
    hits = cumulative[..., capacities - 1]  # [P, L, C]
    for p, batch in enumerate(state.batch_size):
        hits[p, :, capacities < batch] = -1
    notes = []
    warning = None if ctx.prefetch_table is None else ctx.prefetch_table.empty_fold_warning()
    if warning is not None:
        notes.append(warning)
    elif "transition" not in state.predictors:
        notes.append("transition and popularity predictors skipped: they need a prefetch table learned in a first "
                     "pass over the trace")
    if "router_lookahead" not in state.predictors:
        notes.append("router_lookahead skipped: the trace has no predicted_next_ids (needs the model during capture)")
    return CacheResult(state.layers, state.predictors, capacities, hits, state.rank_counts.sum(axis=-1), tuple(notes),
                       () if warning is None else (warning,))
