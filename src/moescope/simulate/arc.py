"""ARC (Megiddo & Modha, FAST 2003): recency list T1 and frequency list T2 with ghost lists B1, B2 and an
adaptive target p for |T1|, request by request as in the paper's Figure 4, with c = capacity.

Batches (see priority_cache.py for the step model): a lookup batch's hits are determined before any of
its keys is handled; then its hits move to the MRU end of T2 (column order), then its misses are handled
in column order (a ghost hit adapts p and goes to T2, a new key goes to T1). An entry touched in the
current batch is never the one replaced: when the list REPLACE picks holds only such entries, the other
list gives its LRU entry. A prefetched key that is cached moves to the MRU end of its own list; one that
is not is inserted like a new key (leaving its ghost list without adapting p: a prediction is not a
request). Every stream runs at once; the columns of a batch are handled one after another.
"""

from __future__ import annotations

import numpy as np

from moescope.simulate.streams import Streams

T1, T2, B1, B2 = 1, 2, 3, 4
LATEST = np.iinfo(np.int64).max
LIST = 58  # tag = list << LIST | stamp


def simulate(streams: Streams, capacity: int) -> tuple[np.ndarray, np.ndarray | None]:
    arc = _Arc(streams.n_streams, streams.n_keys, capacity)
    k = streams.lookups.shape[1]
    kp = 0 if streams.prefetch is None else streams.prefetch.shape[1]
    kk = max(k, kp)
    hit = np.zeros(streams.lookups.shape, bool)
    loaded = None if streams.prefetch is None else np.zeros(streams.prefetch.shape, bool)
    for p in range(streams.n_steps):  # one step of every running stream at once
        rows = streams.step(p)
        if loaded is not None:
            loaded[rows] = arc.prefetch(streams.prefetch[rows], 4 * p * kk)  # stamps below (4p + 2) kk
        hit[rows] = arc.lookup(streams.lookups[rows], (4 * p + 2) * kk, kk)
    return hit, loaded


class _Arc:
    """N streams. Cache slots 0..C-1 (T1/T2 entries), ghost slots C..2C-1 (B1/B2); slot_of[n, key] is the
    key's slot or -1; per slot its key (K = free) and tag = list << 58 | stamp, the stamp being the time the
    entry became its list's MRU: a list's entries are the tags in [list << 58, (list + 1) << 58), its LRU
    entry the smallest (see _oldest)."""

    def __init__(self, n_streams: int, n_keys: int, capacity: int):
        N, K, C = n_streams, n_keys, capacity
        self.K, self.C = K, C
        self.slot_of = np.full(N * (K + 1), -1, np.int32)  # flat [N, K + 1]
        self.key = np.full((N, 2 * C), K, np.int32)
        self.tag = np.zeros((N, 2 * C), np.int64)  # list 0: free
        self.size = np.zeros((N, 5), np.int64)  # [N, list] entries per list (column 0 unused)
        self.p = np.zeros(N, np.float64)
        self.cell_base = np.arange(N, dtype=np.int64) * (K + 1)

    # -- batches ---------------------------------------------------------------------------------
    def lookup(self, ids: np.ndarray, start: int, kk: int) -> np.ndarray:
        """Lookups [n, k] of streams 0..n-1; returns the hits. Stamps: hits start + j, misses start + kk + j."""
        n, k = ids.shape
        real = ids < self.K
        slot = self.slot_of[self.cell_base[:n, None] + ids]
        cached = (slot >= 0) & (slot < self.C)
        self._touch(cached, slot, T2, start)  # hits first: to the MRU end of T2, in column order
        for j in range(k):  # then misses, in column order
            rows = np.flatnonzero(real[:, j] & ~cached[:, j])
            if rows.size:
                self._miss(rows, ids[rows, j], start, start + kk + j, request=True)
        return cached & real

    def prefetch(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Prefetch batch [n, kp]; returns the keys that had to be fetched (not cached before the batch)."""
        n, kp = ids.shape
        slot = self.slot_of[self.cell_base[:n, None] + ids]
        cached = (slot >= 0) & (slot < self.C)
        absent = (ids < self.K) & ~cached
        self._touch(cached, slot, None, start)  # cached keys first: to the MRU end of their own list
        for j in range(kp):
            rows = np.flatnonzero(absent[:, j])
            if rows.size:
                self._miss(rows, ids[rows, j], start, start + kp + j, request=False)
        return absent

    def _touch(self, cached, slot, lst, start: int) -> None:
        """Cached keys of a batch ([n, w] mask and slots) become the MRU entries of `lst` (None: their own)."""
        r, c = np.nonzero(cached)
        s = slot[r, c]
        old = self.tag[r, s] >> LIST
        if lst is not None:
            moved = np.bincount(r[old == T1], minlength=cached.shape[0])  # [n] T1 -> T2
            self.size[: cached.shape[0], T1] -= moved
            self.size[: cached.shape[0], T2] += moved
            old = lst
        self.tag[r, s] = old << LIST | (start + c)

    # -- one key per row -----------------------------------------------------------------------------
    def _miss(self, rows, x, batch_start: int, now: int, request: bool) -> None:
        """Handle key x [m] (not cached) of each row: the paper's cases II-IV, then insert it."""
        C, K = self.C, self.K
        ghost = self.slot_of[self.cell_base[rows] + x]  # [m] ghost slot or -1
        where = np.where(ghost >= 0, self.tag[rows, np.maximum(ghost, 0)] >> LIST, 0)
        in_b1, in_b2 = (where == B1) & request, (where == B2) & request  # a prefetched key counts as new
        size = self.size[rows]  # [m, 5]
        if request and (in_b1 | in_b2).any():  # cases II and III: adapt the target size of T1
            b1, b2 = size[:, B1].astype(np.float64), size[:, B2].astype(np.float64)
            p = self.p[rows]
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(in_b1, np.minimum(C, p + np.maximum(1.0, b2 / b1)), p)
                p = np.where(in_b2, np.maximum(0.0, p - np.maximum(1.0, b1 / b2)), p)
            self.p[rows] = p
        g = np.flatnonzero(where)  # x leaves its ghost list
        if g.size:
            self._clear(rows[g], ghost[g], where[g])
            size[g, where[g]] -= 1
        t1, t2, b1, b2 = size[:, T1], size[:, T2], size[:, B1], size[:, B2]
        new = ~(in_b1 | in_b2)
        case_a = new & (t1 + b1 >= C)  # case IV A: |T1| + |B1| = c
        drop_t1 = case_a & (t1 >= C)  # out of the cache, no ghost
        for drop, lst in ((case_a & (t1 < C), B1), (new & ~case_a & (t1 + t2 + b1 + b2 >= 2 * C), B2)):
            d = rows[drop]  # case IV A drops B1's LRU entry, case IV B with a full directory B2's
            if d.size:
                self._clear(d, C + _oldest(self.tag[d, C:], lst, LATEST), lst)  # ghosts are never protected
        replace = (t1 + t2 >= C) & ~drop_t1
        out = np.flatnonzero(replace | drop_t1)  # rows whose cache gives up an entry
        free = np.full(len(rows), -1)
        if out.size:
            tags = self.tag[rows[out], :C]  # [o, C]
            t1o, p = t1[out], self.p[rows[out]]
            want_t1 = drop_t1[out] | ((t1o >= 1) & ((t1o > p) | (in_b2[out] & (t1o == p))))
            from_t1 = want_t1.copy()
            victim = _oldest(tags, np.where(want_t1, T1, T2)[:, None], batch_start)
            other = np.flatnonzero(victim < 0)  # the list REPLACE picked holds only this batch's keys: the other one
            if other.size:
                from_t1[other] = ~want_t1[other]
                victim[other] = _oldest(tags[other], np.where(from_t1[other], T1, T2)[:, None], batch_start)
            victim_key = self.key[rows[out], victim]
            self._clear(rows[out], victim, np.where(from_t1, T1, T2))
            free[out] = victim
            keep = replace[out]
            moved, victim_key, from_t1 = rows[out[keep]], victim_key[keep], from_t1[keep]
            ghost_slot = C + np.argmax(self.key[moved, C:] == K, axis=1)  # to the MRU end of its ghost list
            self._put(moved, victim_key, ghost_slot, np.where(from_t1, B1, B2), now)
        empty = np.flatnonzero(free < 0)  # the cache had room
        if empty.size:
            free[empty] = np.argmax(self.key[rows[empty], :C] == K, axis=1)
        self._put(rows, x, free, np.where(new, T1, T2), now)

    # -- slots ---------------------------------------------------------------------------------------
    def _clear(self, rows, slot, lst) -> None:
        """Empty `slot` of each row (its key leaves list `lst`)."""
        self.slot_of[self.cell_base[rows] + self.key[rows, slot]] = -1
        self.size[rows, lst] -= 1
        self.key[rows, slot] = self.K
        self.tag[rows, slot] = 0

    def _put(self, rows, keys, slot, lst, now) -> None:
        self.key[rows, slot] = keys
        self.tag[rows, slot] = np.left_shift(lst, LIST, dtype=np.int64) | now
        self.slot_of[self.cell_base[rows] + keys] = slot
        self.size[rows, lst] += 1


def _oldest(tags, lst, before: int) -> np.ndarray:
    """intp [m]: per row the slot of the oldest entry of list `lst` (an int or [m, 1]) stamped before `before`,
    or -1. Subtracting lst << LIST maps that list's entries to their stamps and every other tag (free slots,
    other lists) to a negative number or one of 2**LIST or more, which unsigned are all larger."""
    offset = (tags - np.left_shift(lst, LIST, dtype=np.int64)).view(np.uint64)  # [m, C]
    best = np.argmin(offset, axis=1)
    return np.where(np.take_along_axis(offset, best[:, None], axis=1)[:, 0] < min(before, 1 << LIST), best, -1)
