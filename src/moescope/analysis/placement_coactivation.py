"""A co-activation-aware placement: experts a token chooses together go to one GPU when the load allows, so
its dispatch reaches fewer GPUs (MoETuner, arXiv 2502.06643; Occult, ICML 2025 make the same trade).

Per layer, with `together[l, i, j]` the tokens choosing both i and j (analysis/coactivation.py): replicas are
made as EPLB makes them (placement_policies.replicate: each extra one to the expert with the most load per
replica); then the physical experts, heaviest share first (lower index on ties), each go to the GPU with a
free slot, no replica of the same expert yet, and room under (1 + SLACK) x the mean GPU load, that holds the
most co-activation with it (ties: the least loaded GPU, then the lower one); when no GPU has room under the
cap, to the least loaded GPU with a free slot (and no replica of it, where one exists). Slots fill in
arrival order. All layers are handled at once, one step per physical expert.
"""

from __future__ import annotations

import numpy as np

from moescope.analysis.placement_policies import Placement, PlacementOptions, replicate

SLACK = 0.1  # a GPU may carry 10 % more than the mean to keep experts chosen together


def coactivation_placement(load: np.ndarray, together: np.ndarray, options: PlacementOptions) -> Placement:
    w = np.asarray(load, np.float64)  # [L, E]
    pairs = np.asarray(together, np.float64)  # [L, E, E]
    L, E = w.shape
    G, S = options.n_gpus, options.n_slots
    per_gpu = S // G
    experts, count = replicate(w, S)  # [L, S], [L, E]
    share = np.take_along_axis(w / count, experts, axis=1)  # [L, S]
    order = np.argsort(-share, axis=1, kind="stable")
    cap = (1 + SLACK) * w.sum(axis=1) / G  # [L]
    gpu_tokens = np.zeros((L, G))
    filled = np.zeros((L, G), np.int64)
    holds = np.zeros((L, G, E), bool)
    affinity = np.zeros((L, G, E))  # affinity[l, g, e]: co-activation of e with the experts already on g
    p2l = np.empty((L, S), np.int64)
    rows = np.arange(L)
    for i in range(S):  # one physical expert per layer per step
        item = order[:, i]
        e = experts[rows, item]  # [L]
        tokens = share[rows, item]
        room = filled < per_gpu  # [L, G]
        fresh = room & ~holds[rows, :, e]
        allowed = np.where(fresh.any(axis=1, keepdims=True), fresh, room)
        under = allowed & (gpu_tokens + tokens[:, None] <= cap[:, None] * (1 + 1e-12))
        use_cap = under.any(axis=1)
        score = np.where(under, affinity[rows, :, e], -np.inf)
        best = score.max(axis=1, keepdims=True)
        tied = np.where(use_cap[:, None], under & (score == best), allowed)
        gpu = np.argmin(np.where(tied, gpu_tokens, np.inf), axis=1)  # least loaded, then the lower GPU
        p2l[rows, gpu * per_gpu + filled[rows, gpu]] = e
        filled[rows, gpu] += 1
        gpu_tokens[rows, gpu] += tokens
        holds[rows, gpu, e] = True
        affinity[rows, gpu] += pairs[rows, e]
    return Placement("coactivation", p2l, E, G, options.n_nodes)
