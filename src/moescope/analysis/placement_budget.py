"""Replica budgets per layer: one total of redundant slots spread over the layers where it lowers the busiest
GPU most (as CRAFT, arXiv 2603.28768, argues), against the same count in every layer.

`--redundant R` gives every layer R redundant slots: L x R in all. A layer may take R_l slots with E + R_l a
multiple of G (every GPU holds as many slots of a layer) and R_l <= E, so R_l runs over r0, r0 + G, ...
with r0 = (-E) mod G. Each layer is placed by EPLB at every such count; then the counts with
sum R_l <= L x R that minimise the sum over layers of the busiest GPU's tokens (the layers run one after
another, each as slow as its busiest GPU) are found exactly by dynamic programming over the layers.
Among equal sums, the dynamic programme's first minimum (fewer slots in the later layers) wins.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from moescope.analysis.placement_balance import gpu_load
from moescope.analysis.placement_policies import PlacementOptions, eplb_placement


def budget_levels(options: PlacementOptions) -> np.ndarray:
    """int64 [J]: the redundant-slot counts a layer may take."""
    E, G = options.n_experts, options.n_gpus
    return np.arange((-E) % G, E + 1, G)


def busiest_gpu_by_level(load: np.ndarray, options: PlacementOptions) -> np.ndarray:
    """float64 [L, J]: the busiest GPU's tokens of each layer placed by EPLB with each count of budget_levels."""
    return np.stack([gpu_load(eplb_placement(load, dataclasses.replace(options, n_redundant=int(r))), load).max(axis=1)
                     for r in budget_levels(options)], axis=1)


def replica_budgets(load: np.ndarray, options: PlacementOptions) -> tuple[np.ndarray, np.ndarray]:
    """(redundant int64 [L], busiest float64 [L]): the per-layer counts of least summed busiest GPU load under
    the total L x options.n_redundant, and each layer's busiest GPU with its count."""
    levels = budget_levels(options)
    peak = busiest_gpu_by_level(load, options)  # [L, J]
    L, J = peak.shape
    units = (L * options.n_redundant - L * int(levels[0])) // options.n_gpus  # steps of G slots above r0 to share
    best = np.zeros(units + 1)  # best[u]: least summed peak of the layers so far using at most u steps
    choice = np.zeros((L, units + 1), np.int64)
    for layer in range(L):
        used = np.arange(units + 1)[:, None] - np.arange(J)[None, :]  # [U, J] steps left for the earlier layers
        total = np.where(used >= 0, best[np.maximum(used, 0)] + peak[layer][None, :], np.inf)
        choice[layer] = np.argmin(total, axis=1)  # first minimum: the fewest steps in this layer
        best = total[np.arange(units + 1), choice[layer]]
    steps = np.zeros(L, np.int64)
    left = units
    for layer in reversed(range(L)):
        steps[layer] = choice[layer, left]
        left -= steps[layer]
    return levels[steps], peak[np.arange(L), steps]


def budget_frame(load: np.ndarray, options: PlacementOptions, layers: tuple[int, ...]) -> pd.DataFrame:
    """Per layer (then pooled): the uniform count and the budget's, each one's busiest GPU and balancedness."""
    from moescope.analysis.context import OVERALL

    counts, busiest = replica_budgets(load, options)
    uniform = gpu_load(eplb_placement(load, options), load).max(axis=1)  # [L]
    mean = np.asarray(load, np.float64).sum(axis=1) / options.n_gpus
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({
            "layer": [*layers, OVERALL],
            "redundant_uniform": np.append(np.full(len(layers), options.n_redundant), options.n_redundant * len(layers)),
            "redundant_budget": np.append(counts, counts.sum()),
            "mean_gpu_load": np.append(mean, mean.sum()),
            "busiest_gpu_uniform": np.append(uniform, uniform.sum()),
            "busiest_gpu_budget": np.append(busiest, busiest.sum()),
            "balancedness_uniform": np.append(mean, mean.sum()) / np.append(uniform, uniform.sum()),
            "balancedness_budget": np.append(mean, mean.sum()) / np.append(busiest, busiest.sum()),
        })
