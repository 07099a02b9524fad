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
