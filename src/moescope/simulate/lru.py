"""LRU: evict the expert touched longest ago (analysis/expert_cache.py's model; tested equal to its kernel).

A touch's priority is its time: prefetch batch of step p at 2p, lookups at 2p + 1, and within a batch an
earlier column counts as more recent (the router's first choice is kept longest), as lru_kernel.py does.
"""

from __future__ import annotations

import numpy as np

from moescope.simulate import priority_cache
from moescope.simulate.streams import Streams


def stamps(streams: Streams) -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 [M, k], int64 [M, kp] or None): the time of every lookup and prefetch touch."""
    k = streams.lookups.shape[1]
    kp = 0 if streams.prefetch is None else streams.prefetch.shape[1]
    kk = max(k, kp)
    step = streams.step_of_row()[:, None]
    lookup = (2 * step + 1) * kk + (kk - 1 - np.arange(k))
    return lookup, None if streams.prefetch is None else 2 * step * kk + (kk - 1 - np.arange(kp))


def simulate(streams: Streams, capacity: int):
    return priority_cache.simulate(streams, capacity, *stamps(streams))
