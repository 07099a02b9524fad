"""Per-domain expert counts and Jensen-Shannon divergence, one token at a time."""

from __future__ import annotations

import math

from moescope.analysis.reference.rows import real, token_rows


def _js_bits(p: list[float], q: list[float]) -> float:
    sp, sq = sum(p), sum(q)
    p = [x / sp for x in p]
    q = [x / sq for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q)]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)) / math.log(2)


def compute(shards, ctx) -> dict:
    E, L = ctx.n_experts, ctx.n_layers
    counts: dict[str, list[list[int]]] = {}
    for row in token_rows(shards):
        table = counts.setdefault(row.domain, [[0] * E for _ in range(L)])
        for layer in range(L):
            for e in real(row.experts[layer], E):
                table[layer][e] += 1
    names = sorted(counts)
    jsd = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            per_layer = [_js_bits(counts[a][l], counts[b][l]) for l in range(L)]
            jsd[(a, b)] = per_layer + [sum(per_layer) / L]
    return {"counts": counts, "js_divergence": jsd}
