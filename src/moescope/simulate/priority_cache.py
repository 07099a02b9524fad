"""A cache that evicts the entry of lowest priority, where each touch gives its key a fixed priority.

LRU (priority = time of last touch), LFU (uses so far, then time) and Belady (the sooner the next use,
the higher) are all this cache with different priorities, computed up front (lru.py, lfu.py, belady.py).
All streams of `Streams` run at once, step by step; a step is up to two batches — the prefetch batch,
then the token's lookups — and a batch is handled as one unit:

    absent = keys of the batch not cached;  the present ones are protected (kept) during this batch;
    the len(absent) lowest-priority unprotected entries are evicted (empty slots first) and the absent
    keys take their slots; then every key of the batch gets the priority of this touch.

A lookup hits when its key is cached before its batch. Capacity must be at least the widest batch.
Priorities must be distinct among the keys a stream holds (ties would make slot order matter). A slot
stores its priority shifted left with its own index in the low bits, so one sort of a row's values gives
its slots from the lowest priority up.
"""

from __future__ import annotations

import numpy as np

from moescope.simulate.streams import Streams

from moescope.errors import MoescopeError

LIMIT = 1 << 62
EMPTY = -LIMIT  # priority of an empty slot (plus its index): filled first
KEEP = LIMIT  # priority of a protected entry during its batch


def simulate(streams: Streams, capacity: int, lookup_priority: np.ndarray,
             prefetch_priority: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(hit bool [M, k], loaded bool [M, kp] or None): lookups that hit; prefetched keys that had to be fetched.

    lookup_priority int64 [M, k] and prefetch_priority int64 [M, kp]: the priority each touch gives its key.
    """
    cache = _Cache(streams.n_streams, streams.n_keys, capacity)
    widest = max(np.abs(p).max(initial=0) for p in (lookup_priority, prefetch_priority) if p is not None)
    if widest >= LIMIT >> cache.shift:
        raise MoescopeError(f"a sequence of {streams.n_steps:,} steps is too long to simulate a {capacity}-slot cache; "
                            "cut the trace's sequences or use --scope layer")
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
        index = np.int32 if n_streams * (n_keys + 1) < 2**31 else np.int64
        self.slot_of = np.full(n_streams * (n_keys + 1), -1, np.int32)  # flat [N, K + 1]
        self.key_of = np.full(n_streams * (capacity + 1), n_keys, np.int32)  # flat [N, C + 1]
        self.shift = capacity.bit_length()  # low bits of a stored priority: the slot's index
        self.priority = np.tile(EMPTY + np.arange(capacity + 1, dtype=np.int64), (n_streams, 1))  # [N, C + 1]
        self.cell_base = (np.arange(n_streams, dtype=index) * (n_keys + 1))[:, None]  # [N, 1]
        self.slot_base = (np.arange(n_streams, dtype=index) * (capacity + 1))[:, None]  # [N, 1]

    def touch(self, ids: np.ndarray, priority: np.ndarray) -> np.ndarray:
        """Touch batch `ids` [n, w] of streams 0..n-1; returns bool [n, w], the keys that were not cached."""
        n, C = ids.shape[0], self.C
        cells = self.cell_base[:n] + ids  # [n, w]
        slot = self.slot_of[cells]
        real = ids < self.K
        absent = (slot < 0) & real
        need = absent.sum(axis=1)  # [n]
        rows = np.flatnonzero(need)
        if rows.size:
            self._insert(rows, ids[rows], slot[rows], absent[rows], int(need.max()))
            slot[rows] = self.slot_of[cells[rows]]
        target = np.where(real, slot, C)  # scratch slot for non-keys
        self.priority.ravel()[self.slot_base[:n] + target] = (priority << self.shift) | target
        return absent

    def _insert(self, rows, ids, slot, absent, most: int) -> None:
        """Insert the absent keys of `rows` into the lowest-priority unprotected slots."""
        C, K = self.C, self.K
        m = len(rows)
        candidates = self.priority[rows]  # [m, C + 1] copy
        present = ~absent & (ids < K)  # keys of the batch already cached: protected
        candidates.ravel()[self.slot_base[:m] + np.where(present, slot, C)] = KEEP  # (column C is the scratch slot)
        lowest = np.sort(candidates[:, :C], axis=1)[:, :most] & ((1 << self.shift) - 1)  # [m, most] slots, lowest first
        order = np.minimum(np.cumsum(absent, axis=1) - 1, most - 1)  # [m, w] which victim each absent key takes
        victim = np.where(absent, lowest.ravel()[(np.arange(m) * most)[:, None] + order], C)  # scratch where none
        key_cells = self.slot_base[rows] + victim
        old = self.key_of[key_cells]
        base = self.cell_base[rows]  # [m, 1]
        self.slot_of[base + old] = -1  # evicted (an empty slot's key is K, the no-key column)
        new = np.where(absent, ids, K)
        self.key_of[key_cells] = new
        self.slot_of[base + new] = victim
        self.slot_of[base[:, 0] + K] = -1  # the no-key column stays -1
