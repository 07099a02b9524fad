"""Pinned expert sets: a cache that holds a fixed set of experts and never changes (a miss is fetched, used and
dropped), as engines that pin a hot set learned from a profile do.

  static         each layer's C most used experts (scope "layer"; "global": the C most used (layer, expert)
                 keys) learned on the OTHER fold of documents (cross_layer's folds), as the learned
                 prefetchers are: a token of fold f is served by the set learned on fold 1 - f;
  static-oracle  the best fixed set in hindsight: the C most used of the evaluated lookups themselves, per
                 phase (no fixed set of C serves that phase's lookups better).
A random fixed set of C of a cache's K keys hits a lookup with probability C / K: its expected hit rate.
Ties go to the lower expert (key) index. Pinned caches take no prefetches, so they are simulated under
prefetch "none" only. Everything here follows from coverage.py's lookup counts, without replaying the trace.
"""

from __future__ import annotations

import numpy as np

STATIC = ("static", "static-oracle")


def pinned(load: np.ndarray, capacity: int, scope: str) -> np.ndarray:
    """bool [L, E]: the pinned set of a load [L, E]: the `capacity` most used experts per layer ("layer"),
    or of all (layer, expert) keys ("global")."""
    L, E = load.shape
    rows = load.reshape(1, L * E) if scope == "global" else load
    chosen = np.argsort(-rows, axis=1, kind="stable")[:, :capacity]
    mask = np.zeros(rows.shape, bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask.reshape(L, E)


def pinned_counts(by_fold: np.ndarray, capacity: int, scope: str, policy: str) -> np.ndarray:
    """int64 [2 phases, L, E]: the lookups of each expert that hit the pinned cache; by_fold int64
    [2 folds, 2 phases, L, E] lookups (coverage.LookupCounts.by_fold)."""
    if policy == "static-oracle":
        by_phase = by_fold.sum(axis=0)  # [2, L, E]
        return np.stack([by_phase[q] * pinned(by_phase[q], capacity, scope) for q in range(2)])
    learned = [pinned(by_fold[1 - f].sum(axis=0), capacity, scope) for f in range(2)]  # set serving fold f
    return sum(by_fold[f] * learned[f][None] for f in range(2))


def random_set_hit_rate(capacity: int, n_keys: int) -> float:
    """Expected hit rate of a fixed set of `capacity` keys drawn uniformly from `n_keys`."""
    return min(capacity, n_keys) / n_keys
