"""Consecutive-token routing agreement, one token at a time (see analysis/temporal_locality.py)."""

from __future__ import annotations

from moescope.analysis.reference.rows import first_choice, is_next_position, real, token_rows


def compute(shards, ctx) -> dict:
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    same = [0] * L
    overlap = [0] * L
    any_shared = [0] * L
    first_prev = [[0] * E for _ in range(L)]
    first_cur = [[0] * E for _ in range(L)]
    load_prev = [[0] * E for _ in range(L)]
    load_cur = [[0] * E for _ in range(L)]
    pairs = 0
    prev = None
    for row in token_rows(shards):
        if is_next_position(prev, row):
            pairs += 1
            for layer in range(L):
                a = first_choice(prev.experts[layer], prev.weights[layer], E)
                b = first_choice(row.experts[layer], row.weights[layer], E)
                same[layer] += a is not None and a == b
                if a is not None:
                    first_prev[layer][a] += 1
                if b is not None:
                    first_cur[layer][b] += 1
                shared = set(real(prev.experts[layer], E)) & set(real(row.experts[layer], E))
                overlap[layer] += len(shared)
                any_shared[layer] += bool(shared)
                for e in real(prev.experts[layer], E):
                    load_prev[layer][e] += 1
                for e in real(row.experts[layer], E):
                    load_cur[layer][e] += 1
        prev = row
    n = pairs
    chance_first = [
        sum(first_prev[l][e] * first_cur[l][e] for e in range(E)) / n / n if n else float("nan") for l in range(L)
    ]
    chance_overlap = [
        sum(load_prev[l][e] * load_cur[l][e] for e in range(E)) / n / n / k if n else float("nan") for l in range(L)
    ]

    def with_mean(xs):
        return xs + [sum(xs) / L]

    return {
        "pairs": pairs,
        "same_first": with_mean([s / n if n else float("nan") for s in same]),
        "same_first_chance": with_mean(chance_first),
        "overlap": with_mean([o / (n * k) if n else float("nan") for o in overlap]),
        "overlap_chance": with_mean(chance_overlap),
        "any_shared": with_mean([a / n if n else float("nan") for a in any_shared]),
    }
