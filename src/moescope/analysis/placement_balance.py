"""How a placement serves a load: GPU loads, balancedness, imbalance, and all-to-all fan-out per token.

GPU load: a replicated expert's tokens are split evenly over its replicas, so slot s carries
w[l, e] / replicas[l, e] for its expert e, and a GPU the sum over its slots.
  balancedness = mean / max GPU load (1 = even; vLLM logs it)
  imbalance    = max / mean - 1      (0 = even; TensorRT-LLM reports it)
Pooled over layers (which run one after another, each as slow as its busiest GPU): sum of the layers'
means over the sum of their maxima.

Fan-out: the distinct GPUs (and nodes) a token's top-k experts live on, the all-to-all messages its
dispatch sends. A replicated expert is reached at replica (token index mod replicas), round robin.
"""

from __future__ import annotations

import math

import numpy as np

from moescope.analysis.placement_policies import Placement


def gpu_load(placement: Placement, load: np.ndarray) -> np.ndarray:
    """float64 [L, G]: tokens each GPU serves per layer."""
    w = np.asarray(load, np.float64)  # [L, E]
    share = w / np.maximum(placement.replica_count(), 1)  # [L, E] per replica
    per_slot = np.take_along_axis(share, placement.physical_to_logical, axis=1)  # [L, S]
    return per_slot.reshape(w.shape[0], placement.n_gpus, placement.slots_per_gpu).sum(axis=2)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """float64 [L + 1]: mean / max GPU load per layer, then pooled over layers (NaN where nothing ran)."""
    mean, peak = loads.mean(axis=1), loads.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.append(mean / peak, mean.sum() / peak.sum())


def imbalance(loads: np.ndarray) -> np.ndarray:
    """float64 [L + 1]: max / mean - 1 per layer, then pooled."""
    return 1.0 / balancedness(loads) - 1.0


def fanout(placement: Placement, ids: np.ndarray, token_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gpus int64 [L, T], nodes int64 [L, T]): distinct GPUs / nodes each token's real experts are on.

    ids: intp [L, T, k] expert ids, the sentinel E for slots that are no expert; token_index: int64 [T]
    (chooses the replica, round robin). A token with no real expert touches 0.
    """
    L, T, k = ids.shape
    E = placement.n_experts
    count = placement.replica_count()  # [L, E]
    period = math.lcm(*range(1, int(count.max()) + 1))  # replica choice repeats with this period of tokens
    if placement.n_gpus > 64 or period > 64:
        return _fanout_by_sorting(placement, ids, token_index)
    # bits[l, e, j]: 1 << the GPU (node) of the replica token j (mod period) reaches; row E: no expert
    replica = np.arange(period)[None, None, :] % count[:, :, None]  # [L, E, P]
    gpu = np.take_along_axis(placement.logical_to_physical(), replica, axis=2) // placement.slots_per_gpu
    words = []
    for unit in (gpu, placement.node_of_gpu[gpu]):
        bits = np.zeros((L, E + 1, period), np.uint64)
        bits[:, :E] = np.left_shift(np.uint64(1), unit.astype(np.uint64))
        words.append(bits.ravel())
    base = (np.arange(L)[:, None] * (E + 1)) * period + (token_index % period)[None, :]  # [L, T]
    touched = []
    for bits in words:
        mask = np.zeros((L, T), np.uint64)
        for c in range(k):  # one gather per slot
            mask |= bits[base + ids[:, :, c] * period]
        touched.append(np.bitwise_count(mask).astype(np.int64))
    return touched[0], touched[1]


def _fanout_by_sorting(placement: Placement, ids: np.ndarray, token_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fanout() for more than 64 GPUs or long replica cycles: look up every slot's GPU, count distinct ones."""
    L, T, k = ids.shape
    E = placement.n_experts
    l2p = placement.logical_to_physical()  # [L, E, X]
    count = placement.replica_count()  # [L, E]
    real = ids < E
    e = np.where(real, ids, 0)
    layer = np.arange(L)[:, None, None]
    replica = token_index[None, :, None] % count[layer, e]  # [L, T, k]
    gpu = l2p[layer, e, replica] // placement.slots_per_gpu
    node = placement.node_of_gpu[gpu]
    return _distinct(np.where(real, gpu, -1)), _distinct(np.where(real, node, -1))


def _distinct(values: np.ndarray) -> np.ndarray:
    """int64 [...]: distinct non-negative values along the last axis."""
    ordered = np.sort(values, axis=-1)
    new = np.ones(ordered.shape, bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return (new & (ordered >= 0)).sum(axis=-1)


def fanout_histogram(placement: Placement, ids: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """int64 [2, L, k + 1]: tokens per layer touching 0..k distinct GPUs (row 0) and nodes (row 1)."""
    L, T, k = ids.shape
    gpus, nodes = fanout(placement, ids, token_index)
    offsets = (np.arange(L) * (k + 1))[:, None]
    return np.stack([np.bincount((x + offsets).ravel(), minlength=L * (k + 1)).reshape(L, k + 1) for x in (gpus, nodes)])
