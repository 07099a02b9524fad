"""Router confidence, one token at a time (see analysis/router_confidence.py for the definitions)."""

from __future__ import annotations

import math

from moescope.analysis.reference.rows import softmax, token_rows


def bin_of(value: float, lo: float, hi: float, bins: int) -> int:
    """Index into [underflow, bins..., overflow], the binning of kernels.histogram_moments."""
    if math.isnan(value):
        return bins + 1
    if value == hi:
        return bins
    i = math.floor((value - lo) * (bins / (hi - lo)))
    return 0 if i < 0 else (bins + 1 if i >= bins else i + 1)


def compute(shards, ctx) -> dict:
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    B = ctx.thresholds.hist_bins
    log_max = math.log10(ctx.thresholds.ratio_max)
    what_if = [m for m in ctx.thresholds.what_if_top_k if m <= ctx.router_width]
    hist = {
        q: [[0] * (B + 2) for _ in range(L)]
        for q in ("top1_weight", "top2_weight", "weight_ratio", "selected_entropy", "router_entropy", "margin")
    }
    values = {q: [[] for _ in range(L)] for q in hist}
    what_if_load = {m: [[0] * E for _ in range(L)] for m in what_if}
    what_if_first = {m: [[] for _ in range(L)] for m in what_if}
    matches = [0] * L
    n = 0
    for row in token_rows(shards):
        n += 1
        for layer in range(L):
            w = sorted(row.weights[layer], reverse=True)
            total = sum(w)
            wn = [x / total for x in w] if total else [math.nan] * k
            hist["top1_weight"][layer][bin_of(wn[0], 0, 1, B)] += 1
            if math.isfinite(wn[0]):
                values["top1_weight"][layer].append(wn[0])
            if k >= 2:
                hist["top2_weight"][layer][bin_of(wn[1], 0, 1, B)] += 1
                if math.isfinite(wn[1]):
                    values["top2_weight"][layer].append(wn[1])
                ratio = w[0] / w[1] if w[1] else math.inf
                log_ratio = math.log10(ratio) if ratio > 0 else -math.inf
                hist["weight_ratio"][layer][
                    bin_of(log_ratio, 0, log_max, B) if math.isfinite(log_ratio) else (B + 1 if log_ratio > 0 else 0)
                ] += 1
                if math.isfinite(ratio):
                    values["weight_ratio"][layer].append(ratio)
                h_sel = -sum(x * math.log(x) for x in wn if x > 0)
                hist["selected_entropy"][layer][bin_of(h_sel, 0, math.log(k), B)] += 1
                values["selected_entropy"][layer].append(h_sel)
            if row.router is None:
                continue
            out = row.router[layer]  # R classes: the E experts, then non-compute choices
            R = len(out)
            p = softmax(out) if ctx.router_output_kind == "logits" else out
            h = -sum(x * math.log(x) for x in p if x > 0)
            hist["router_entropy"][layer][bin_of(h, 0, math.log(R), B)] += 1
            values["router_entropy"][layer].append(h)
            order = sorted(range(R), key=lambda e: (-p[e], e))
            if R > k:
                margin = p[order[k - 1]] - p[order[k]]
                hist["margin"][layer][bin_of(margin, 0, 1, B)] += 1
                values["margin"][layer].append(margin)
            captured = row.experts[layer]
            if all(0 <= e < R for e in captured):  # a top-k of p: no class left out is more probable
                rejected = [p[e] for e in range(R) if e not in captured]
                matches[layer] += not rejected or min(p[e] for e in captured) >= max(rejected)
            for m in what_if:
                for e in order[:m]:
                    if e < E:  # a non-compute choice loads no expert
                        what_if_load[m][layer][e] += 1
                what_if_first[m][layer].append(p[order[0]] / sum(p[e] for e in order[:m]))
    means = {q: [sum(v) / len(v) if v else math.nan for v in per_layer] for q, per_layer in values.items()}
    return {
        "n_tokens": n,
        "histograms": hist,
        "means": means,
        "what_if_load": what_if_load,
        "what_if_first_mean": {
            m: [sum(v) / len(v) if v else math.nan for v in per_layer] for m, per_layer in what_if_first.items()
        },
        "topk_matches": matches,
    }
