"""Pair co-selection counts, one token at a time (see analysis/coactivation.py)."""

from __future__ import annotations

from moescope.analysis.reference.rows import real, token_rows


def compute(shards, ctx) -> dict:
    E, L = ctx.n_experts, ctx.n_layers
    counts = [[[0] * E for _ in range(E)] for _ in range(L)]
    for row in token_rows(shards):
        for layer in range(L):
            chosen = real(row.experts[layer], E)
            for a in chosen:
                for b in chosen:
                    counts[layer][a][b] += 1
    return {"counts": counts}
