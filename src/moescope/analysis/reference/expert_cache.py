"""Per-layer LRU expert cache, simulated token by token with an OrderedDict (see analysis/stack_distance.py)."""

from __future__ import annotations

from collections import OrderedDict

from moescope.analysis.reference.cross_layer import both_folds_learned, fold, learn, popular, predict
from moescope.analysis.reference.rows import first_choice, is_next_position, real, token_rows


class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[int, None] = OrderedDict()

    def insert(self, batch: list[int]) -> None:
        """Insert a batch; its first entry ends up most recently used."""
        distinct = list(dict.fromkeys(batch))
        for e in reversed(distinct):
            self.entries.pop(e, None)
            self.entries[e] = None
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def compute(shards, ctx, capacities: list[int] | None = None) -> dict:
    """hits[(predictor, layer, capacity)] and lookups[(predictor, layer)]."""
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    capacities = capacities or list(range(k, E + 1))
    rows = list(token_rows(shards))
    counts, load = learn(rows, ctx, 1)
    learned = both_folds_learned(load)
    predictors = ["lru", "same_index"] + (["transition", "popularity"] if learned else []) + (
        ["router_lookahead"] if rows and rows[0].predicted is not None else []
    )
    caches = {}
    hits = {(p, l, c): 0 for p in predictors for l in range(L) for c in capacities}
    lookups = {(p, l): 0 for p in predictors for l in range(L)}
    prev = None
    for row in rows:
        if not is_next_position(prev, row):
            caches = {(p, l, c): LRUCache(c) for p in predictors for l in range(L) for c in capacities}
        other = 1 - fold(row)
        for layer in range(L):
            used = real(row.experts[layer], E)
            prefetch = {"lru": [], "popularity": popular(load, other, layer, k, E)}
            if layer:
                prefetch["same_index"] = real(row.experts[layer - 1], E)
                fc = first_choice(row.experts[layer - 1], row.weights[layer - 1], E)
                prefetch["transition"] = [] if fc is None else predict(counts, load, other, 1, layer - 1, fc, k, E)
                if row.predicted is not None:
                    prefetch["router_lookahead"] = real(row.predicted[layer - 1], E)
            for p in predictors:
                lookups[(p, layer)] += len(used)
                for c in capacities:
                    cache = caches[(p, layer, c)]
                    if prefetch.get(p):
                        cache.insert(prefetch[p])
                    hits[(p, layer, c)] += sum(e in cache.entries for e in used)
                    cache.insert(used)
        prev = row
    return {"hits": hits, "lookups": lookups, "predictors": predictors}
