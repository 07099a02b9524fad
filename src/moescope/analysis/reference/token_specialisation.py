"""Per-token expert counts and combinations, one token at a time, with dicts and Counters as in the
variable-size-expert notebook (see analysis/token_specialisation.py for the definitions)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from moescope.analysis.reference.rows import real, token_rows


def compute(shards, ctx) -> dict:
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    expert_counts = [defaultdict(lambda: [0] * E) for _ in range(L)]
    combos = [defaultdict(Counter) for _ in range(L)]
    occurrences: Counter = Counter()
    entropy_sum: defaultdict = defaultdict(float)
    entropy_n: Counter = Counter()
    for row in token_rows(shards):
        t = row.token_id
        occurrences[t] += 1
        if math.isfinite(row.entropy):
            entropy_sum[t] += row.entropy
            entropy_n[t] += 1
        for layer in range(L):
            for e in real(row.experts[layer], E):
                expert_counts[layer][t][e] += 1
            combos[layer][t][tuple(sorted(e if 0 <= e < E else E for e in row.experts[layer]))] += 1

    flops = ctx.expert_flops().tolist() if ctx.has_costs else None
    sizes = ctx.expert_sizes.tolist() if ctx.expert_sizes is not None else None
    tokens = {}
    for t in sorted(occurrences):
        top, ent, size_sum, flop_sum, mode, share, mode_flops = [], [], 0.0, 0.0, [], [], 0.0
        for layer in range(L):
            counts = expert_counts[layer].get(t)
            if counts is not None and sum(counts):
                total = sum(counts)
                top.append(max(counts) / total)
                ent.append(-sum(c / total * math.log(c / total) for c in counts if c) / math.log(E) if E > 1 else 0.0)
                if sizes is not None:
                    size_sum += sum(c * sizes[layer][e] for e, c in enumerate(counts))
                if flops is not None:
                    flop_sum += sum(c * flops[layer][e] for e, c in enumerate(counts))
            seen = combos[layer][t]
            best = max(seen.values())
            # ties: the lowest combinatorial rank = smallest tuple compared from the largest id down
            combo = min((c for c, n in seen.items() if n == best), key=lambda c: tuple(reversed(c)))
            mode.append([e if e < E else -1 for e in combo])
            share.append(best / occurrences[t])
            if flops is not None:
                mode_flops += sum(flops[layer][e] for e in combo if e < E)
        tokens[t] = {
            "occurrences": occurrences[t],
            "mean_output_entropy": entropy_sum[t] / entropy_n[t] if entropy_n[t] else math.nan,
            "top1_share": sum(top) / len(top) if top else 0.0,
            "entropy_norm": sum(ent) / len(ent) if ent else 0.0,
            "avg_expert_size": size_sum / (occurrences[t] * L * k) if sizes is not None else None,
            "flops_per_token": flop_sum / occurrences[t] if flops is not None else None,
            "mode_combination": mode,
            "mode_share": share,
            "mode_flops": mode_flops if flops is not None else None,
        }
    return {"tokens": tokens, "expert_counts": [dict(c) for c in expert_counts]}
