"""Belady (MIN, offline optimal): evict the expert whose next lookup is farthest in the future.

It sees the whole future of the stream, so its hit rate bounds every policy's with the same prefetching
from above. An expert the predictor will prefetch before its next lookup counts as never needed again
(the prefetch brings it back for free). Ties (experts never needed again) evict the lower key first.
"""

from __future__ import annotations

import numpy as np

from moescope.simulate import priority_cache
from moescope.simulate.streams import Streams


def priorities(streams: Streams) -> tuple[np.ndarray, np.ndarray | None]:
    """Priority of a touch = -(time of the key's next useful lookup), made distinct by the key."""
    K = streams.n_keys
    never = 2 * streams.n_steps + 2
    upcoming = np.full(streams.n_streams * (K + 1), never, np.int64)  # flat [N, K + 1] next useful lookup
    base = (np.arange(streams.n_streams, dtype=np.int64) * (K + 1))[:, None]
    lookup = np.empty(streams.lookups.shape, np.int64)
    prefetch = None if streams.prefetch is None else np.empty(streams.prefetch.shape, np.int64)
    for p in reversed(range(streams.n_steps)):  # backward over steps: lookups at 2p + 1, prefetch at 2p
        rows = streams.step(p)
        n = rows.stop - rows.start
        cells = base[:n] + streams.lookups[rows]
        lookup[rows] = upcoming[cells]
        upcoming[cells] = 2 * p + 1
        if prefetch is not None:
            cells = base[:n] + streams.prefetch[rows]
            prefetch[rows] = upcoming[cells]
            upcoming[cells] = never  # re-fetched before any lookup: keeping it is worth nothing
    lookup = -lookup * (K + 1) + streams.lookups
    return lookup, None if prefetch is None else -prefetch * (K + 1) + streams.prefetch


def simulate(streams: Streams, capacity: int):
    return priority_cache.simulate(streams, capacity, *priorities(streams))
