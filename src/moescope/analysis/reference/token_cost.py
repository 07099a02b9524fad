"""Cost per token for variable-size experts, one token at a time (see analysis/token_cost.py)."""

from __future__ import annotations

import math
from collections import Counter

from moescope.analysis.reference.rows import token_rows


def compute(shards, ctx) -> dict:
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    sizes = ctx.expert_sizes.tolist()
    th = ctx.thresholds.large_expert_size
    threshold = [th if th is not None else (min(s) + max(s)) / 2 for s in sizes]
    per_size = 2.0 * ctx.expert_matrices * ctx.hidden_size
    distribution: Counter = Counter()
    selected = [0] * L
    large = [0] * L
    mostly_large = [0] * L
    pairs = []  # (flops, entropy) where entropy is recorded
    n = 0
    for row in token_rows(shards):
        n += 1
        size_t = 0
        for layer in range(L):
            chosen = [sizes[layer][e] if 0 <= e < E else 0 for e in row.experts[layer]]
            size_t += sum(chosen)
            selected[layer] += sum(chosen)
            large[layer] += sum(s > threshold[layer] for s in chosen)
            mostly_large[layer] += sum(chosen) / k > threshold[layer]
        distribution[size_t] += 1
        if math.isfinite(row.entropy):
            pairs.append((size_t * per_size, row.entropy))
    values = sorted(distribution.elements())
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    quantiles = {f"p{int(q * 100)}": values[math.ceil(q * n) - 1] * per_size for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    pearson = math.nan
    if len(pairs) > 1:
        mx = sum(x for x, _ in pairs) / len(pairs)
        my = sum(y for _, y in pairs) / len(pairs)
        sxy = sum((x - mx) * (y - my) for x, y in pairs)
        sxx = sum((x - mx) ** 2 for x, _ in pairs)
        syy = sum((y - my) ** 2 for _, y in pairs)
        pearson = sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan
    dense = sum(ctx.dense_intermediate_size or k * sum(s) / E for s in sizes)
    return {
        "distribution": dict(distribution),
        "mean_flops_per_token": mean * per_size,
        "std_flops_per_token": std * per_size,
        **{f"{name}_flops_per_token": v for name, v in quantiles.items()},
        "fraction_of_dense": mean / dense,
        "large_share": sum(large) / (n * k * L),
        "mostly_large_share": sum(mostly_large) / (n * L),
        "mean_selected_size": [s / (n * k) for s in selected],
        "flops_entropy_pearson": pearson,
    }
