"""A cache that evicts the entry of lowest priority, where each touch gives its key a fixed priority.

LRU (priority = time of last touch), LFU (uses so far, then time) and Belady (the sooner the next use,
the higher) are all this cache with different priorities, computed up front (lru.py, lfu.py, belady.py).
All streams of `Streams` run at once, step by step; a step is up to two batches — the prefetch batch,
then the token's lookups — and a batch is handled as one unit:

    absent = keys of the batch not cached;  the present ones are protected (kept) during this batch;
    the len(absent) lowest-priority unprotected entries are evicted (empty slots first) and the absent
    keys take their slots; then every key of the batch gets the priority of this touch.

A lookup hits when its key is cached before its batch. Capacity must be at least the widest batch.
Priorities must be distinct among the keys a stream holds (ties would make slot order matter).
"""

from __future__ import annotations

import numpy as np

from moescope.simulate.streams import Streams

EMPTY = np.iinfo(np.int64).min  # priority of an empty slot: filled first
KEEP = np.iinfo(np.int64).max  # priority of a protected entry during its batch


def simulate(streams: Streams, capacity: int, lookup_priority: np.ndarray,
             prefetch_priority: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(hit bool [M, k], loaded bool [M, kp] or None): lookups that hit; prefetched keys that had to be fetched.

    lookup_priority int64 [M, k] and prefetch_priority int64 [M, kp]: the priority each touch gives its key.
    """
    cache = _Cache(streams.n_streams, streams.n_keys, capacity)
    hit = np.zeros(streams.lookups.shape, bool)
    loaded = None if streams.prefetch is None else np.zeros(streams.prefetch.shape, bool)
    for p in range(streams.n_steps):  # one step of every running stream at once
        rows = streams.step(p)
        if loaded is not None:
            loaded[rows] = cache.touch(streams.prefetch[rows], prefetch_priority[rows])
        ids = streams.lookups[rows]
        hit[rows] = ~cache.touch(ids, lookup_priority[rows]) & (ids < streams.n_keys)
    return hit, loaded


class _Cache:
    """N caches of C slots over K keys. slot_of[n, key] is the key's slot or -1 (column K: no key, always -1);
    key_of[n, slot] and priority[n, slot] the slot's key and priority (column C: a scratch slot)."""

    def __init__(self, n_streams: int, n_keys: int, capacity: int):
        self.K, self.C = n_keys, capacity
        self.slot_of = np.full(n_streams * (n_keys + 1), -1, np.int32)  # flat [N, K + 1]
        self.key_of = np.full(n_streams * (capacity + 1), n_keys, np.int32)  # flat [N, C + 1]
        self.priority = np.full((n_streams, capacity + 1), EMPTY, np.int64)  # [N, C + 1]
        self.cell_base = (np.arange(n_streams, dtype=np.int64) * (n_keys + 1))[:, None]  # [N, 1]

    def touch(self, ids: np.ndarray, priority: np.ndarray) -> np.ndarray:
        """Touch batch `ids` [n, w] of streams 0..n-1; returns bool [n, w], the keys that were not cached."""
        n, C = ids.shape[0], self.C
        cells = self.cell_base[:n] + ids  # [n, w]
        slot = self.slot_of[cells]
        absent = (slot < 0) & (ids < self.K)
        need = absent.sum(axis=1)  # [n]
        rows = np.flatnonzero(need)
        if rows.size:
            self._insert(rows, ids[rows], slot[rows], absent[rows], int(need.max()))
            slot = self.slot_of[cells]
        target = np.where(ids < self.K, slot, C)  # scratch slot for non-keys
        self.priority[np.arange(n)[:, None], target] = priority
        return absent

    def _insert(self, rows, ids, slot, absent, most: int) -> None:
        """Insert the absent keys of `rows` into the lowest-priority unprotected slots."""
        C, K = self.C, self.K
        candidates = self.priority[rows, :C]  # [m, C] copy
        r, c = np.nonzero(~absent & (ids < K))  # present keys of the batch: protected
        candidates[r, slot[r, c]] = KEEP
        if most >= C:
            lowest = np.argsort(candidates, axis=1)
        else:
            lowest = np.argpartition(candidates, most - 1, axis=1)[:, :most] if most > 1 else candidates.argmin(axis=1)[:, None]
            lowest = np.take_along_axis(lowest, np.argsort(np.take_along_axis(candidates, lowest, axis=1), axis=1), axis=1)
        order = np.cumsum(absent, axis=1) - 1  # [m, w] which victim each absent key takes
        victim = np.take_along_axis(lowest, np.minimum(order, lowest.shape[1] - 1), axis=1)
        victim = np.where(absent, victim, C)  # [m, w]; scratch slot where nothing is inserted
        key_cells = rows[:, None] * (C + 1) + victim
        old = self.key_of[key_cells]
        base = rows[:, None].astype(np.int64) * (K + 1)
        self.slot_of[base + old] = -1  # evicted (an empty slot's key is K, the no-key column)
        self.key_of[key_cells] = np.where(absent, ids, K)
        self.slot_of[base + np.where(absent, ids, K)] = victim
        self.slot_of[base[:, 0] + K] = -1  # the no-key column stays -1
