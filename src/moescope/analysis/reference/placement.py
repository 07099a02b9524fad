"""What a placement does to a trace, one token at a time (see analysis/placement_balance.py and analysis/placement.py):
the load matrix and the load of each window of consecutive tokens, GPU loads, and per token the distinct GPUs
and nodes its experts are on. Placements are given as physical_to_logical lists [layer][slot]."""

from __future__ import annotations

from moescope.analysis.reference.rows import real, token_rows


def gpu_loads(p2l: list[list[int]], load: list[list[float]], gpus: int) -> list[list[float]]:
    """[layer][gpu] tokens served, a replicated expert's tokens split evenly over its replicas."""
    out = []
    for layout, w in zip(p2l, load):
        per_gpu = len(layout) // gpus
        row = [0.0] * gpus
        for s, e in enumerate(layout):
            row[s // per_gpu] += w[e] / layout.count(e)
        out.append(row)
    return out


def fanout(p2l: list[list[int]], ids, n_experts: int, gpus: int, nodes: int, first_index: int = 0):
    """Per layer, a list per token of (distinct GPUs, distinct nodes); ids [L][T][k]; token t reaches replica
    (first_index + t) mod replicas of each of its experts."""
    out = []
    for layout, tokens in zip(p2l, ids):
        per_gpu = len(layout) // gpus
        rows = []
        for t, chosen in enumerate(tokens):
            touched = set()
            for e in chosen:
                if 0 <= e < n_experts:
                    replicas = [s for s, x in enumerate(layout) if x == e]
                    touched.add(replicas[(first_index + t) % len(replicas)] // per_gpu)
            rows.append((len(touched), len({g // (gpus // nodes) for g in touched})))
        out.append(rows)
    return out


def compute(shards, ctx, placements: dict[str, list[list[int]]], gpus: int, nodes: int, window: int) -> dict:
    """{"load": [layer][expert], "windows": [[layer][expert] per window], "fanout": {policy: [layer][k + 1] token
    counts by distinct GPUs}, "fanout_nodes": the same by nodes}."""
    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    load = [[0] * E for _ in range(L)]
    windows = []
    spots = {policy: [[[s for s, x in enumerate(layout[l]) if x == e] for e in range(E)] for l in range(L)]
             for policy, layout in placements.items()}
    hist = {policy: [[0] * (k + 1) for _ in range(L)] for policy in placements}
    hist_nodes = {policy: [[0] * (k + 1) for _ in range(L)] for policy in placements}
    for t, row in enumerate(token_rows(shards)):
        if t % window == 0:
            windows.append([[0] * E for _ in range(L)])
        for l in range(L):
            chosen = real(row.experts[l], E)
            for e in chosen:
                load[l][e] += 1
                windows[-1][l][e] += 1
            for policy, where in spots.items():
                per_gpu = len(placements[policy][l]) // gpus
                touched = {where[l][e][t % len(where[l][e])] // per_gpu for e in chosen}
                hist[policy][l][len(touched)] += 1
                hist_nodes[policy][l][len({g // (gpus // nodes) for g in touched})] += 1
    return {"load": load, "windows": windows, "fanout": hist, "fanout_nodes": hist_nodes}
