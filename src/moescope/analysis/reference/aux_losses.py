"""Load-balancing loss and z-loss, one token at a time (see analysis/aux_losses.py)."""

from __future__ import annotations

import math

from moescope.analysis.reference.rows import real, softmax, token_rows


def compute(shards, ctx) -> dict:
    E, L = ctx.n_experts, ctx.n_layers
    counts = [[0] * E for _ in range(L)]
    prob_sum = [[0.0] * E for _ in range(L)]
    lse_sq = [0.0] * L
    n = 0
    for row in token_rows(shards):
        n += 1
        for layer in range(L):
            for e in real(row.experts[layer], E):
                counts[layer][e] += 1
            if row.router is None:
                continue
            out = row.router[layer]
            probs = softmax(out) if ctx.router_output_kind == "logits" else out
            for e in range(E):
                prob_sum[layer][e] += probs[e]
            if ctx.router_output_kind == "logits":
                peak = max(out)
                lse_sq[layer] += (peak + math.log(sum(math.exp(v - peak) for v in out))) ** 2
    per_layer = [E * sum(counts[l][e] / n * prob_sum[l][e] / n for e in range(E)) for l in range(L)]
    pooled_f = [sum(counts[l][e] for l in range(L)) / (n * L) for e in range(E)]
    pooled_p = [sum(prob_sum[l][e] for l in range(L)) / (n * L) for e in range(E)]
    overall = E * sum(f * p for f, p in zip(pooled_f, pooled_p))
    z = [s / n for s in lse_sq] + [sum(lse_sq) / (n * L)]
    return {"load_balancing_loss": per_layer + [overall], "z_loss": z}
