"""Expert load, one token at a time (see analysis/load.py for the definitions)."""

from __future__ import annotations

import math

from moescope.analysis.reference.rows import real, token_rows


def load_stats(counts: list[float], th) -> dict[str, float]:
    n = len(counts)
    mean = sum(counts) / n
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / n)
    total = sum(counts)
    entropy = -sum(c / total * math.log(c / total) for c in counts if c > 0) if total else math.nan
    return {
        "slots": total,
        "mean": mean,
        "std": std,
        "min": min(counts),
        "max": max(counts),
        "max_over_mean": max(counts) / mean if mean > 0 else math.nan,
        "cv": std / mean if mean > 0 else math.nan,
        "balance_score": 1 - std / mean if mean > 0 else math.nan,
        "load_entropy_norm": entropy / math.log(n) if n > 1 and mean > 0 else math.nan,
        "n_dead": sum(c <= th.dead_max_count for c in counts),
        "n_underused": sum(c < th.underused_factor * mean for c in counts),
        "n_overloaded": sum(c > th.overloaded_factor * mean for c in counts),
    }


def compute(shards, ctx) -> dict:
    E, L = ctx.n_experts, ctx.n_layers
    counts = [[0] * E for _ in range(L)]
    n_tokens = 0
    for row in token_rows(shards):
        n_tokens += 1
        for layer in range(L):
            for e in real(row.experts[layer], E):
                counts[layer][e] += 1
    per_layer = [load_stats(c, ctx.thresholds) for c in counts]
    overall = load_stats([c for layer in counts for c in layer], ctx.thresholds)
    return {"counts": counts, "n_tokens": n_tokens, "stats": per_layer + [overall]}
