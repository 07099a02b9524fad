"""A second, independent implementation of the placements (plain Python loops over lists), written from the
same published description as moescope/analysis/placement_policies.py (DeepSeek EPLB's README) and sharing no code with
it. (Per-token loops for what a placement does to a trace: moescope.analysis.reference.placement.)"""

from __future__ import annotations


def pack(weights: list[float], n_packs: int) -> tuple[list[int], list[int]]:
    """(pack of each item, its arrival order in the pack): heaviest item first, to the lightest pack with room."""
    n = len(weights)
    per_pack = n // n_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    loads, filled = [0.0] * n_packs, [0] * n_packs
    pack_of, rank = [None] * n, [None] * n
    for item in sorted(range(n), key=lambda i: (-weights[i], i)):
        best = None
        for p in range(n_packs):
            if filled[p] < per_pack and (best is None or loads[p] < loads[best]):
                best = p
        pack_of[item], rank[item] = best, filled[best]
        loads[best] += weights[item]
        filled[best] += 1
    return pack_of, rank


def replicate(weights: list[float], n_physical: int) -> tuple[list[int], list[int]]:
    """(logical expert of each physical one, replicas per expert): extra replicas to the most load per replica."""
    experts, count = list(range(len(weights))), [1] * len(weights)
    while len(experts) < n_physical:
        best = max(range(len(weights)), key=lambda e: (weights[e] / count[e], -e))
        experts.append(best)
        count[best] += 1
    return experts, count


def _layout(local: list[int], weights: list[float], n_physical: int, gpus: int, per_gpu: int) -> list[int]:
    physical, count = replicate(weights, n_physical)
    share = [weights[i] / count[i] for i in physical]
    gpu, rank = pack(share, gpus)
    slots = [None] * n_physical
    for j, i in enumerate(physical):
        slots[gpu[j] * per_gpu + rank[j]] = local[i]
    return slots


def eplb(load: list[list[float]], n_slots: int, groups: int, nodes: int, gpus: int) -> list[list[int]]:
    if groups % nodes:
        groups = nodes = 1
    out = []
    for w in load:
        E = len(w)
        size = E // groups
        group_load = [sum(w[g * size:(g + 1) * size]) for g in range(groups)]
        node_of, rank = pack(group_load, nodes)
        layout = []
        for node in range(nodes):
            mine = sorted((g for g in range(groups) if node_of[g] == node), key=lambda g: rank[g])
            local = [e for g in mine for e in range(g * size, (g + 1) * size)]
            layout += _layout(local, [w[e] for e in local], n_slots // nodes, gpus // nodes, n_slots // gpus)
        out.append(layout)
    return out


def greedy(load: list[list[float]], redundant: int, gpus: int) -> list[list[int]]:
    out = []
    for w in load:
        E = len(w)
        hottest = sorted(range(E), key=lambda e: (-w[e], e))[:redundant]
        physical = list(range(E)) + hottest
        count = [1 + hottest.count(e) for e in range(E)]
        gpu, rank = pack([w[e] / count[e] for e in physical], gpus)
        per_gpu = len(physical) // gpus
        slots = [None] * len(physical)
        for j, e in enumerate(physical):
            slots[gpu[j] * per_gpu + rank[j]] = e
        out.append(slots)
    return out


def static(n_layers: int, n_experts: int, n_slots: int) -> list[list[int]]:
    return [[s % n_experts for s in range(n_slots)] for _ in range(n_layers)]


def _max_flow(capacity: dict, source, sink) -> float:
    """Edmonds-Karp on a dict-of-dicts graph of float capacities (changed in place to residuals)."""
    from collections import deque

    total = 0.0
    while True:
        parent, queue = {source: None}, deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v, c in capacity[u].items():
                if c > 1e-12 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return total
        path, v = [], sink
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(capacity[u][v] for u, v in path)
        for u, v in path:
            capacity[u][v] -= push
            capacity[v].setdefault(u, 0.0)
            capacity[v][u] += push
        total += push


def best_split_peak(layout: list[int], w: list[float], gpus: int) -> float:
    """The smallest busiest-GPU load over all splits of each expert's tokens over its replicas (one layer), by
    bisection on T: T is reachable when a flow source -> expert (w[e]) -> GPU holding a replica -> sink (T)
    carries every token."""
    per_gpu = len(layout) // gpus
    total = sum(w)
    lo, hi = total / gpus, total  # no split beats the mean; one GPU taking everything is always possible

    def feasible(t):
        graph = {"s": {}, "t": {}}
        for e, tokens in enumerate(w):
            graph["s"][("e", e)] = float(tokens)
            graph[("e", e)] = {}
        for g in range(gpus):
            graph[("g", g)] = {"t": t}
        for slot, e in enumerate(layout):
            graph[("e", e)][("g", slot // per_gpu)] = float("inf")
        return _max_flow(graph, "s", "t") >= total * (1 - 1e-12)

    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
    return hi


def gpu_peak(layout: list[int], w: list[float], gpus: int) -> float:
    """The busiest GPU's tokens of one layer, a replicated expert's tokens split evenly over its replicas."""
    per_gpu = len(layout) // gpus
    loads = [0.0] * gpus
    for slot, e in enumerate(layout):
        loads[slot // per_gpu] += w[e] / layout.count(e)
    return max(loads)


def best_budgets(load: list[list[float]], redundant: int, groups: int, nodes: int, gpus: int) -> float:
    """The least sum over layers of the busiest GPU when layer l takes R_l redundant slots (E + R_l a multiple
    of the GPUs, R_l <= E, sum R_l <= layers x redundant), every allocation tried, each layer placed by eplb()."""
    import itertools

    E = len(load[0])
    counts = [r for r in range(E + 1) if (E + r) % gpus == 0]
    peak = [{r: gpu_peak(eplb([w], E + r, groups, nodes, gpus)[0], w, gpus) for r in counts} for w in load]
    best = float("inf")
    for chosen in itertools.product(counts, repeat=len(load)):
        if sum(chosen) <= len(load) * redundant:
            best = min(best, sum(peak[layer][r] for layer, r in enumerate(chosen)))
    return best


def coactivation(load: list[list[float]], together: list[list[list[int]]], n_slots: int, gpus: int,
                 slack: float) -> list[list[int]]:
    """Experts chosen together on one GPU while it stays under (1 + slack) x the mean GPU load."""
    out = []
    for w, pairs in zip(load, together):
        physical, count = replicate(w, n_slots)
        share = [w[e] / count[e] for e in physical]
        per_gpu, cap = n_slots // gpus, (1 + slack) * sum(w) / gpus
        on_gpu = [[] for _ in range(gpus)]
        tokens = [0.0] * gpus
        for j in sorted(range(n_slots), key=lambda j: (-share[j], j)):
            e = physical[j]
            room = [g for g in range(gpus) if len(on_gpu[g]) < per_gpu]
            fresh = [g for g in room if e not in on_gpu[g]] or room
            under = [g for g in fresh if tokens[g] + share[j] <= cap * (1 + 1e-12)]
            if under:
                gpu = max(under, key=lambda g: (sum(pairs[e][x] for x in on_gpu[g]), -tokens[g], -g))
            else:
                gpu = min(fresh, key=lambda g: (tokens[g], g))
            on_gpu[gpu].append(e)
            tokens[gpu] += share[j]
        out.append([e for g in range(gpus) for e in on_gpu[g]])
    return out
