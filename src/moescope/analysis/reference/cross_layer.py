"""Cross-layer transitions and predictor recall, one token at a time (see analysis/cross_layer.py).

Learns the transition and popularity predictors' tables in a first loop, then evaluates every predictor
token by token.
"""

from __future__ import annotations

from moescope.analysis.reference.rows import first_choice, is_next_position, real, token_rows

MASK = (1 << 64) - 1


def fold(row) -> int:
    """0 or 1: the top bit of splitmix64 of the row's document key (its seq_id without one), in Python ints."""
    z = ((row.seq_id if row.document is None else row.document) + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) >> 63


def learn(rows, ctx, max_hop: int) -> tuple[list, list]:
    """(first-choice transition counts [fold][hop-1][layer][i][j], target load [fold][layer][j])."""
    E, L = ctx.n_experts, ctx.n_layers
    counts = [[[[[0] * E for _ in range(E)] for _ in range(L)] for _ in range(max_hop)] for _ in range(2)]
    load = [[[0] * E for _ in range(L)] for _ in range(2)]
    for row in rows:
        f = fold(row)
        for layer in range(L):
            for e in real(row.experts[layer], E):
                load[f][layer][e] += 1
            fc = first_choice(row.experts[layer], row.weights[layer], E)
            if fc is None:
                continue
            for d in range(1, max_hop + 1):
                if layer + d < L:
                    for j in real(row.experts[layer + d], E):
                        counts[f][d - 1][layer][fc][j] += 1
    return counts, load


def both_folds_learned(load) -> bool:
    """Whether each fold has routed slots to learn from."""
    return all(sum(sum(layer) for layer in per_fold) > 0 for per_fold in load)


def predict(counts, load, learned_on: int, hop: int, layer: int, source: int, k: int, E: int) -> list[int]:
    """The transition predictor learned on fold `learned_on` for (hop, source layer, first-choice expert)."""
    row = counts[learned_on][hop - 1][layer][source]
    target = load[learned_on][layer + hop]
    return sorted(range(E), key=lambda j: (-row[j], -target[j], j))[:k]


def popular(load, learned_on: int, layer: int, k: int, E: int) -> list[int]:
    """The k most-loaded experts of `layer` in fold `learned_on` (ties to the lower index)."""
    return sorted(range(E), key=lambda j: (-load[learned_on][layer][j], j))[:k]


def compute(shards, ctx) -> dict:
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    K = ctx.thresholds.max_hop
    rows = list(token_rows(shards))
    counts, load = learn(rows, ctx, K)
    learned = both_folds_learned(load)
    transitions = [[[[0] * E for _ in range(E)] for _ in range(L)] for _ in range(K)]
    hits: dict[tuple[str, int, int], list[int]] = {}  # (predictor, hop, source layer) -> [hits, targets]

    def add(key, predicted, actual):
        cell = hits.setdefault(key, [0, 0])
        cell[0] += len(set(predicted) & set(actual))
        cell[1] += len(actual)

    prev = None
    for row in rows:
        other = 1 - fold(row)
        for layer in range(L):
            here = real(row.experts[layer], E)
            if learned:
                add(("popularity", 0, layer), popular(load, other, layer, k, E), here)
            for d in range(1, K + 1):
                if layer + d >= L:
                    continue
                there = real(row.experts[layer + d], E)
                for i in here:
                    for j in there:
                        transitions[d - 1][layer][i][j] += 1
                add(("same_index", d, layer), here, there)
                if learned:
                    fc = first_choice(row.experts[layer], row.weights[layer], E)
                    guess = [] if fc is None else predict(counts, load, other, d, layer, fc, k, E)
                    add(("transition", d, layer), guess, there)
                    add(("popularity", d, layer), popular(load, other, layer + d, k, E), there)
            if is_next_position(prev, row):
                add(("previous_token", 0, layer), real(prev.experts[layer], E), here)
            if row.predicted is not None and layer + 1 < L:
                add(("router_lookahead", 1, layer), real(row.predicted[layer], E), real(row.experts[layer + 1], E))
        prev = row
    return {"transitions": transitions, "recall": hits, "first_choice_counts": counts, "load_by_fold": load}
