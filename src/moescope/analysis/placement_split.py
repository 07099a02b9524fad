"""The best split of a window's tokens over an expert's replicas: the linear-programming bound on the busiest GPU.

Engines split a replicated expert's tokens evenly over its replicas (placement_balance.gpu_load). Given the
placement, a balancer that chooses the split per batch (DeepSeek's LPLB, SGLang's LP dispatch) can do no
better than this LP, solved per layer:

    minimise T   subject to   sum over replicas s of e: x[s] = w[e]   for every expert e
                              sum over slots s on GPU g: x[s] <= T   for every GPU g,    x >= 0

All layers go into one LP (the objective sum of T per layer: the layers are independent), solved exactly by
HiGHS through scipy.optimize.linprog. Experts with one replica have nothing to split; a layer whose experts
all have one replica gets the even split's maximum.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sparse
from scipy.optimize import linprog

from moescope.analysis.placement_balance import gpu_load
from moescope.analysis.placement_policies import Placement
from moescope.errors import MoescopeError


def lp_busiest_gpu(placement: Placement, load: np.ndarray) -> np.ndarray:
    """float64 [L]: the busiest GPU's tokens under the best split of each layer's load [L, E] over replicas."""
    w = np.asarray(load, np.float64)
    L, S = placement.physical_to_logical.shape
    G = placement.n_gpus
    even = gpu_load(placement, w).max(axis=1)  # [L] what the even split gives (an upper bound)
    free = (placement.replica_count() > 1).any(axis=1) & (w.sum(axis=1) > 0)  # layers with something to split
    layers = np.flatnonzero(free)
    if not layers.size:
        return even
    n = len(layers)
    p2l = placement.physical_to_logical[layers]  # [n, S]
    E = placement.n_experts
    x = np.arange(n * S)  # variable of slot s of layer i: i * S + s; then T_i at n * S + i
    row_eq = (np.arange(n)[:, None] * E + p2l).ravel()  # the (layer, expert) each slot's tokens count towards
    a_eq = sparse.csr_matrix((np.ones(n * S), (row_eq, x)), shape=(n * E, n * S + n))
    gpu = np.arange(S) // placement.slots_per_gpu
    row_ub = (np.arange(n)[:, None] * G + gpu[None, :]).ravel()
    a_ub = sparse.csr_matrix((np.concatenate([np.ones(n * S), -np.ones(n * G)]),
                              (np.concatenate([row_ub, np.arange(n * G)]), np.concatenate([x, n * S + np.repeat(np.arange(n), G)]))),
                             shape=(n * G, n * S + n))
    cost = np.concatenate([np.zeros(n * S), np.ones(n)])
    solved = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n * G), A_eq=a_eq, b_eq=w[layers].ravel(), bounds=(0, None),
                     method="highs")
    if solved.status != 0:
        raise MoescopeError(f"the replica-split LP did not solve: {solved.message}")
    out = even.copy()
    out[layers] = np.minimum(solved.x[n * S:], even[layers])  # never above the even split (solver tolerance)
    return out


def lp_balancedness(placement: Placement, load: np.ndarray) -> np.ndarray:
    """float64 [L + 1]: mean / busiest GPU load with the LP's split, per layer then pooled over layers."""
    mean = np.asarray(load, np.float64).sum(axis=1) / placement.n_gpus
    peak = lp_busiest_gpu(placement, load)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.append(mean / peak, mean.sum() / peak.sum())
