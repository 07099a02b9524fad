"""LFU: evict the expert looked up least often so far in the sequence (ties: the one touched longest ago).

Counts are kept for evicted experts too ("perfect" LFU) and start at zero with each sequence, like the
cache itself. A prefetch touches an expert (it becomes the most recent of its count) without counting as
a use.
"""

from __future__ import annotations

import numpy as np

from moescope.simulate import priority_cache
from moescope.simulate.lru import stamps
from moescope.simulate.streams import Streams



def priorities(streams: Streams) -> tuple[np.ndarray, np.ndarray | None]:
    lookup_time, prefetch_time = stamps(streams)
    uses = np.zeros(streams.n_streams * (streams.n_keys + 1), np.int64)  # flat [N, K + 1] lookups so far
    base = (np.arange(streams.n_streams, dtype=np.int64) * (streams.n_keys + 1))[:, None]
    lookup = np.empty_like(lookup_time)
    prefetch = None if prefetch_time is None else np.empty_like(prefetch_time)
    for p in range(streams.n_steps):  # forward over steps, every stream at once
        rows = streams.step(p)
        n = rows.stop - rows.start
        if prefetch is not None:
            prefetch[rows] = uses[base[:n] + streams.prefetch[rows]]
        cells = base[:n] + streams.lookups[rows]
        uses[cells] += 1  # keys are distinct within a batch (the no-key column's count is never read)
        lookup[rows] = uses[cells]
    count = np.int64(1) << int(lookup_time.max(initial=0)).bit_length()  # priority = uses * count + time
    lookup = lookup * count + lookup_time
    return lookup, None if prefetch is None else prefetch * count + prefetch_time


def simulate(streams: Streams, capacity: int):
    return priority_cache.simulate(streams, capacity, *priorities(streams))
