"""LRU: evict the expert touched longest ago (analysis/expert_cache.py's model and its engine).

A touch's time: prefetch batch of step p at 2p, lookups at 2p + 1, and within a batch an earlier column
counts as more recent (the router's first choice is kept longest). The cache holds the C most recently
touched keys, so a touch hits <=> its LRU stack distance (analysis/stack_distance.py) is below C: the
distances of every touch are computed once per Streams and answer every capacity.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from moescope.analysis.stack_distance import NOT_AN_EXPERT, hits_from_ranks, lru_ranks
from moescope.simulate.streams import Streams


def stamps(streams: Streams) -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 [M, k], int64 [M, kp] or None): the time of every lookup and prefetch touch (LFU breaks ties by it)."""
    k = streams.lookups.shape[1]
    kp = 0 if streams.prefetch is None else streams.prefetch.shape[1]
    kk = max(k, kp)
    step = streams.step_of_row()[:, None]
    lookup = (2 * step + 1) * kk + (kk - 1 - np.arange(k))
    return lookup, None if streams.prefetch is None else 2 * step * kk + (kk - 1 - np.arange(kp))


@lru_cache(maxsize=1)  # the capacities of one simulation share the Streams object: one pass for all of them
def ranks(streams: Streams) -> tuple[np.ndarray, np.ndarray | None]:
    """(int32 [M, k], int32 [M, kp] or None): LRU stack distance of every lookup and prefetch touch, rows as
    in `streams` (NO_PRIOR_USE: first touch in its stream; NOT_AN_EXPERT: no key or a repeat in its batch)."""
    stream, step = streams.stream_of_row(), streams.step_of_row()
    order = np.lexsort((step, stream))  # stream by stream, steps in order
    new_stream = np.ones(order.size, bool)
    new_stream[1:] = stream[order][1:] != stream[order][:-1]
    lookup, prefetch = lru_ranks(streams.lookups[order], None if streams.prefetch is None else streams.prefetch[order],
                                 new_stream, streams.n_keys, prefetch_ranks=True)
    lookup_rank = np.empty_like(lookup)
    lookup_rank[order] = lookup
    if prefetch is None:
        return lookup_rank, None
    prefetch_rank = np.empty_like(prefetch)
    prefetch_rank[order] = prefetch
    return lookup_rank, prefetch_rank


def simulate(streams: Streams, capacity: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(hit bool [M, k], loaded bool [M, kp] or None): lookups that hit; prefetched keys that had to be fetched.
    Capacity must be at least the widest batch (offload.py checks)."""
    lookup, prefetch = ranks(streams)
    loaded = None if prefetch is None else (prefetch != NOT_AN_EXPERT) & ~hits_from_ranks(prefetch, capacity)
    return hits_from_ranks(lookup, capacity), loaded
