"""The compiled loops (numba) of the analyses: only the work NumPy cannot express without materialising
arrays many times the size of the input. Each has a plain NumPy or per-event reference in the tests.

  lru_rank_pass   LRU stack distance of every touch of a stream of expert batches (stack_distance.py); for up to
                  16 experts lru_rank_pass_packed keeps the whole recency order in one 64-bit word
  pair_count_pass counts[l, i, j] += 1 for every (slot of a, slot of b) of every token (kernels.pair_counts):
                  NumPy needs one int64 code per pair (64 per row at top-8) and a bincount over them, ~4x slower;
                  counted in a small table the core's cache holds, then added into the large one in order
  slot_count_pass counts[group of t, l, e] += 1 (or the slot's weight) for every slot of ids [L, T, k]
                  (kernels.expert_counts): NumPy builds an intp key per slot and bincounts them, ~3x slower
  group_count_pass (token, inner key) counts of token_specialisation, sorted, without a dense table of every token's
                  cells (NumPy's bincount over it was most of the analysis)
  row_count_pass  the same counts of a piece added straight into a run's dense table of the kept tokens' cells
  set_overlap_pass |S_t & S_t'| of two id sets per position (shard_view.set_overlap): NumPy compares whole arrays
                  ka x kb times
  top_k_pass      the k largest of each row of an integer [N, E] table (the learned prefetch predictions: 2 x L
                  tables of E x E): one pass per row instead of a partition, a tie check and two sorts
  histogram_moments_pass fixed-bin histogram, count, mean and second moment of each row of a [L, T] feature in two
                  passes over it (kernels.histogram_moments): NumPy takes about a dozen whole-array passes

Compiled on first use and cached on disk (numba's cache=True, next to this file or in NUMBA_CACHE_DIR).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros  # LLVM's cttz: in numba since 0.40, used by its own code

from moescope.analysis.ranks import NO_PRIOR_USE, NOT_AN_EXPERT


@numba.njit(cache=True, nogil=True)
def pair_count_pass(a, b, group, n_experts, out, triangle=False):  # pragma: no cover - compiled
    """out[g(t), l, a[l, t, i], b[l, t, j]] += 1 for all l, t, i, j whose ids are in [0, n_experts) (with `triangle`,
    for j >= i only: a and b the same ids, each unordered pair of slots counted once).

    a: int [L, T, ka], b: int [L, T, kb], group: int [T] (empty: every token in group 0), out: int64 or int32 [G, L, E, E].
    The increments go to a uint16 scratch table per group ([G, E + 1, E + 1]: 130 KiB at 256 experts, held in the
    core's cache), added into `out` row by row every `block` tokens (a cell gains at most ka * kb per token, so it
    never wraps): `out` is read and written sequentially, not missed into at random (half the time on a cold table).
    An id outside [0, E) is clamped to E (as unsigned, so negatives too): its counts land in the scratch's extra row
    or column, which is never added, so no increment needs a branch (1.5x faster at top-8).
    """
    L, T, ka = a.shape
    kb = b.shape[2]
    G = out.shape[0]
    grouped = group.shape[0] > 0
    block = max(1, 65535 // max(1, ka * kb))
    none = np.uint64(n_experts)
    scratch = np.zeros((G, n_experts + 1, n_experts + 1), np.uint16)
    for l in range(L):
        for t0 in range(0, T, block):
            for t in range(t0, min(T, t0 + block)):
                counts = scratch[group[t] if grouped else 0]
                src, dst = a[l, t], b[l, t]
                for i in range(ka):
                    row = counts[min(np.uint64(src[i]), none)]
                    for j in range(i if triangle else 0, kb):
                        row[min(np.uint64(dst[j]), none)] += 1
            for g in range(G):
                total, part = out[g, l], scratch[g]
                for x in range(n_experts):
                    for y in range(n_experts):
                        total[x, y] += part[x, y]
                        part[x, y] = 0
                part[n_experts, :] = 0
                part[:, n_experts] = 0


@numba.njit(cache=True, nogil=True)
def slot_count_pass(ids, group, n_experts, weights, out):  # pragma: no cover - compiled
    """out[g, l, e] += 1 (or weights[l, t, c]) for each slot c of token t at layer l, g = group[t] (0 when group is
    empty), e = ids[l, t, c], or n_experts for an id outside [0, n_experts). Weights are added in (l, t, c) order."""
    L, T, k = ids.shape
    grouped = group.shape[0] > 0
    weighted = weights.shape[0] > 0
    for layer in range(L):
        for t in range(T):
            g = group[t] if grouped else 0
            for c in range(k):
                e = ids[layer, t, c]
                if e < 0 or e >= n_experts:
                    e = n_experts
                if weighted:
                    out[g, layer, e] += weights[layer, t, c]
                else:
                    out[g, layer, e] += 1


@numba.njit(cache=True, nogil=True)
def group_count_pass(group, n_groups, inner, inner_size, keys, counts):  # pragma: no cover - compiled
    """Count the keys group[t] * inner_size + inner[l, t, c] over all l, t, c with inner >= 0, into keys/counts
    (each at least as long as inner.size) in ascending key order; returns how many distinct keys there are.

    group: int [T] in [0, n_groups); inner: int [L, T, m] in [-1, inner_size). Tokens are bucketed by group, and
    each group counted in a dense row of inner_size cells of which only the touched ones are sorted and emitted:
    no table of n_groups * inner_size cells is allocated or scanned.
    """
    L, T, m = inner.shape
    start = np.zeros(n_groups + 1, np.int64)  # tokens of group u: order[start[u]:start[u + 1]]
    for t in range(T):
        start[group[t] + 1] += 1
    for u in range(n_groups):
        start[u + 1] += start[u]
    order = np.empty(T, np.int64)
    fill = start[:-1].copy()
    for t in range(T):
        order[fill[group[t]]] = t
        fill[group[t]] += 1
    row = np.zeros(inner_size, np.int64)
    touched = np.empty(inner_size, np.int64)
    n = 0
    for u in range(n_groups):
        seen = 0
        for i in range(start[u], start[u + 1]):
            t = order[i]
            for l in range(L):
                for c in range(m):
                    v = inner[l, t, c]
                    if v < 0:
                        continue
                    if row[v] == 0:
                        touched[seen] = v
                        seen += 1
                    row[v] += 1
        cells = np.sort(touched[:seen])
        for v in cells:
            keys[n] = u * inner_size + v
            counts[n] = row[v]
            row[v] = 0
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def row_count_pass(row, inner, out):  # pragma: no cover - compiled
    """out[row[t], inner[l, t, c]] += 1 for all l, t, c with inner >= 0 (row: int [T]; inner: int [L, T, m];
    out: int64 [rows, cells]): token_specialisation's counts of a piece added into its running dense table."""
    L, T, m = inner.shape
    for t in range(T):
        counts = out[row[t]]
        for l in range(L):
            for c in range(m):
                v = inner[l, t, c]
                if v >= 0:
                    counts[v] += 1


@numba.njit(cache=True, nogil=True)
def set_overlap_pass(a, b, sentinel, out):  # pragma: no cover - compiled
    """out[m, n] = |set(a[m, n]) & set(b[m, n])| over ids other than `sentinel` (a: int [M, N, ka], b: int [M, N, kb],
    each row's ids distinct). Each row's ids are adjacent, and every pair is compared without a branch."""
    M, N, ka = a.shape
    kb = b.shape[2]
    for m in range(M):
        for n in range(N):
            ra, rb = a[m, n], b[m, n]
            hits = 0
            for i in range(ka):
                x = ra[i]
                same = 0
                for j in range(kb):
                    same += rb[j] == x
                hits += same if x != sentinel else 0
            out[m, n] = hits


@numba.njit(cache=True, nogil=True)
def top_k_pass(values, k, out):  # pragma: no cover - compiled
    """out[n] = indices of the k largest of values[n] (int [N, E]), descending, ties to the lower index.

    One pass per row keeping the k best so far in order (a later index enters only above an equal value's).
    """
    N, E = values.shape
    best = np.empty(k, values.dtype)
    for n in range(N):
        row, idx = values[n], out[n]
        size = 0
        for j in range(E):
            v = row[j]
            if size == k and v <= best[k - 1]:
                continue
            p = size if size < k else k - 1  # the slot it takes, then moved up past every smaller value
            while p > 0 and best[p - 1] < v:
                best[p], idx[p] = best[p - 1], idx[p - 1]
                p -= 1
            best[p], idx[p] = v, j
            if size < k:
                size += 1


@numba.njit(cache=True, nogil=True)
def histogram_moments_pass(values, moment_values, lo, scale, hi, bins, finite_only, counts, n, mean,
                           m2):  # pragma: no cover - compiled
    """Per row l of values [L, T]: counts[l] [bins + 2] binned as kernels.histogram_moments says; n[l], mean[l], m2[l]
    (sum of squared deviations) of moment_values[l] [T], over its finite values when finite_only. Branch-free
    sums (a value left out adds 0.0), so the loops vectorise."""
    L, T = values.shape
    top = float(bins)
    for l in range(L):
        total = 0.0
        count = 0.0
        for t in range(T):
            x = np.float64(moment_values[l, t])
            keep = (not finite_only) or (x - x == 0.0)  # x - x is 0 for every finite x, NaN for inf and NaN
            total += x if keep else 0.0
            count += 1.0 if keep else 0.0
        mu = total / count if count > 0 else 0.0
        squares = 0.0
        for t in range(T):
            x = np.float64(moment_values[l, t])
            keep = (not finite_only) or (x - x == 0.0)
            d = x - mu
            squares += d * d if keep else 0.0
        for t in range(T):
            v = np.float64(values[l, t])
            idx = np.floor((v - lo) * scale)
            if v == hi:
                idx -= 1.0  # right edge inclusive
            if not idx <= top:  # above the range, +inf or NaN: overflow
                idx = top
            elif idx < -1.0:
                idx = -1.0
            counts[l, int(idx) + 1] += 1
        n[l] = count
        mean[l] = mu
        m2[l] = squares


STAMP_LIMIT = 32767  # the scan's stamps are int16: renumbered (_restamp) before the next batch would pass this


@numba.njit(cache=True, nogil=True)
def _newer(last, mine):  # pragma: no cover - compiled
    """How many stamps are later than `mine`: SIMD over the E int16 stamps, counted in int16 lanes (at most
    SCAN_MAX_KEYS, far below 2**15): 32 lanes a vector, 1.6x faster at 256 stamps than int32 stamps counted in float32."""
    one, zero = np.int16(1), np.int16(0)
    count = np.int16(0)
    for f in range(last.shape[0]):
        count = np.int16(count + (one if last[f] > mine else zero))
    return int(count)


@numba.njit(cache=True, nogil=True)
def _restamp(last, start):  # pragma: no cover - compiled
    """Renumber the stamps of the current sequence (>= start) 0, 1, ... in their order and the older ones -1: every
    rank stays the same (ranks compare stamps, never their values). Returns the next free stamp (the new start is 0)."""
    order = np.argsort(last)
    n = 0
    for i in range(order.shape[0]):
        e = order[i]
        if last[e] >= start:
            last[e] = n
            n += 1
        else:
            last[e] = -1
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _rank_batch(last, batch, out, mark, batch_id, E, start):  # pragma: no cover - compiled
    """Rank every id of one batch (before it is applied); `mark` spots an id repeated within the batch."""
    for c in range(batch.shape[0]):
        e = batch[c]
        if e < 0 or e >= E or mark[e] == batch_id:
            out[c] = NOT_AN_EXPERT
            continue
        mark[e] = batch_id
        mine = last[e]
        out[c] = NO_PRIOR_USE if mine < start else _newer(last, mine)


@numba.njit(cache=True, nogil=True, inline="always")
def _touch(last, batch, E, base, kk):  # pragma: no cover - compiled
    """Apply a batch: column c gets stamp base + kk - 1 - c (an earlier column is more recent)."""
    for c in range(batch.shape[0] - 1, -1, -1):  # last column first, so a repeat keeps its earliest column's stamp
        e = batch[c]
        if 0 <= e < E:
            last[e] = base + kk - 1 - c


@numba.njit(cache=True, nogil=True, inline="always")
def _count_rank(hist, stream, r, E):  # pragma: no cover - compiled
    """Count one lookup's rank r in hist[stream] [E + 1] (column E: NO_PRIOR_USE). Scalars only: passing the loops'
    rows as array views made them 2.5x slower."""
    if r >= 0:
        hist[stream, r] += 1
    elif r == NO_PRIOR_USE:
        hist[stream, E] += 1


@numba.njit(cache=True, nogil=True)
def lru_rank_pass(lookups, prefetch, new_sequence, E, kk, has_prefetch, rank_prefetch, out, out_pre, rows_per_stream,
                  hist):  # pragma: no cover - compiled
    """LRU stack distance of every lookup (and prefetch touch when rank_prefetch) into out (and out_pre); when
    hist [S, E + 1] is not empty, lookups of row t are also counted in hist[t // rows_per_stream] by rank
    (column E: NO_PRIOR_USE). Stamps are int16, renumbered every (STAMP_LIMIT - E) / (2 kk) tokens (_restamp)."""
    N, k = lookups.shape
    last = np.full(E, -1, np.int16)  # stamp of each expert's last touch (valid when >= start)
    mark = np.full(E, -1, np.int64)  # the batch that last ranked each expert
    start = 0
    clock = 0  # the next free stamp
    counting = hist.shape[0] > 0
    for t in range(N):
        if clock + 2 * kk > STAMP_LIMIT:
            clock, start = _restamp(last, start), 0
        base = clock  # prefetch batch at base, lookups at base + kk
        clock += 2 * kk
        if new_sequence[t]:
            start = base  # every earlier stamp is below: the cache is cold
        if has_prefetch:
            if rank_prefetch:
                _rank_batch(last, prefetch[t], out_pre[t], mark, 2 * t, E, start)
            _touch(last, prefetch[t], E, base, kk)
        _rank_batch(last, lookups[t], out[t], mark, 2 * t + 1, E, start)
        _touch(last, lookups[t], E, base + kk, kk)
        if counting:
            stream = t // rows_per_stream
            for c in range(k):
                _count_rank(hist, stream, out[t, c], E)


@numba.njit(cache=True, nogil=True, inline="always")
def _repeats_earlier(batch, c):  # pragma: no cover - compiled
    for i in range(c):
        if batch[i] == batch[c]:
            return True
    return False


@numba.njit(cache=True, nogil=True, inline="always")
def _tree_add(tree, pos, size, delta):  # pragma: no cover - compiled
    while pos <= size:
        tree[pos] += delta
        pos += pos & -pos


@numba.njit(cache=True, nogil=True, inline="always")
def _tree_prefix(tree, pos):  # pragma: no cover - compiled
    total = 0
    while pos > 0:
        total += tree[pos]
        pos -= pos & -pos
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def _tree_rank(tree, last, e, E, start, total, column, batch):  # pragma: no cover - compiled
    if e < 0 or e >= E or _repeats_earlier(batch, column):
        return NOT_AN_EXPERT
    if last[e] < start:
        return NO_PRIOR_USE
    return total - _tree_prefix(tree, last[e] - start + 1)  # markers after e's own: experts touched later


@numba.njit(cache=True, nogil=True, inline="always")
def _tree_touch(tree, last, batch, E, stamp0, kk, start, size, total):  # pragma: no cover - compiled
    for c in range(batch.shape[0] - 1, -1, -1):
        e = batch[c]
        if e < 0 or e >= E or _repeats_earlier(batch, c):
            continue
        if last[e] >= start:
            _tree_add(tree, last[e] - start + 1, size, -1)  # one marker per expert: at its last touch
        else:
            total += 1
        last[e] = stamp0 + kk - 1 - c
        _tree_add(tree, last[e] - start + 1, size, 1)
    return total


@numba.njit(cache=True, nogil=True)
def lru_rank_pass_tree(lookups, prefetch, new_sequence, length, E, kk, has_prefetch, rank_prefetch, out,
                       out_pre):  # pragma: no cover - compiled
    """lru_rank_pass for many keys (a cache shared by every layer): O(log n) per touch instead of O(E).

    A Fenwick tree over the sequence's stamps holds one marker per expert, at its last touch; rank(e) = markers
    after e's. length: int64 [N], the sequence's length in tokens at each new_sequence row.
    """
    N, k = lookups.shape
    longest = 1
    for t in range(N):
        if new_sequence[t] and length[t] > longest:
            longest = length[t]
    tree = np.zeros(2 * kk * (longest + 1) + 2, np.int64)
    last = np.full(E, -1, np.int64)
    start, size, total = np.int64(0), 0, 0
    for t in range(N):
        base = np.int64(2 * kk * (t + 1))
        if new_sequence[t]:
            tree[: size + 1] = 0
            start, size, total = base, 2 * kk * (length[t] + 1), 0
        if has_prefetch:
            batch = prefetch[t]
            if rank_prefetch:
                for c in range(batch.shape[0]):
                    out_pre[t, c] = _tree_rank(tree, last, batch[c], E, start, total, c, batch)
            total = _tree_touch(tree, last, batch, E, base, kk, start, size, total)
        batch = lookups[t]
        for c in range(k):
            out[t, c] = _tree_rank(tree, last, batch[c], E, start, total, c, batch)
        total = _tree_touch(tree, last, batch, E, base + kk, kk, start, size, total)


# lru_rank_pass_packed: a cache of up to 16 experts as one uint64, 4 bits per entry, most recent entry lowest
_NIBBLE_ONES = np.uint64(0x1111111111111111)
_NIBBLE_HIGHS = np.uint64(0x8888888888888888)


@numba.njit(cache=True, nogil=True, inline="always")
def _packed_position(stack, n, e):  # pragma: no cover - compiled
    """Position of expert e among the n entries of a packed stack (0 = most recent), or -1. The lowest zero nibble of
    stack ^ (e in every nibble) is the first match (a borrow only runs upward from a zero nibble)."""
    x = stack ^ (np.uint64(e) * _NIBBLE_ONES)
    zero = (x - _NIBBLE_ONES) & ~x & _NIBBLE_HIGHS
    if zero == 0:
        return -1
    p = np.int64(trailing_zeros(zero)) >> 2  # int64: a uint64 beside -1 would make numba return a float
    return p if p < n else -1  # past the n entries only stale nibbles


@numba.njit(cache=True, nogil=True, inline="always")
def _packed_rank_batch(stack, n, batch, out, E):  # pragma: no cover - compiled
    """Rank every id of one batch before it is applied (as _rank_batch): its position, NO_PRIOR_USE, NOT_AN_EXPERT."""
    for c in range(batch.shape[0]):
        e = batch[c]
        if e < 0 or e >= E or _repeats_earlier(batch, c):
            out[c] = NOT_AN_EXPERT
            continue
        p = _packed_position(stack, n, e)
        out[c] = NO_PRIOR_USE if p < 0 else p


@numba.njit(cache=True, nogil=True, inline="always")
def _packed_touch(stack, n, batch, E):  # pragma: no cover - compiled
    """Apply a batch, last column first (an earlier column ends more recent): each id leaves its place, if it has one,
    and enters at position 0. Returns (stack, n)."""
    for c in range(batch.shape[0] - 1, -1, -1):
        e = batch[c]
        if e < 0 or e >= E:
            continue
        p = _packed_position(stack, n, e)
        if p >= 0:  # close the gap: entries above p move down one place
            below = (np.uint64(1) << np.uint64(4 * p)) - np.uint64(1)
            stack = (stack & below) | ((stack >> np.uint64(4)) & ~below)
            n -= 1
        stack = (stack << np.uint64(4)) | np.uint64(e)
        n += 1
    return stack, n


@numba.njit(cache=True, nogil=True)
def lru_rank_pass_packed(lookups, prefetch, new_sequence, E, has_prefetch, rank_prefetch, out, out_pre,
                         rows_per_stream, hist):  # pragma: no cover - compiled
    """lru_rank_pass for E <= 16 experts (Mixtral's 8, DBRX's 16): the cache's recency order is one uint64 of 4-bit
    entries, so a rank is a few word operations instead of a scan of E stamps; the same ranks and counts."""
    N, k = lookups.shape
    counting = hist.shape[0] > 0
    stack, n = np.uint64(0), 0
    stream, left = 0, rows_per_stream
    for t in range(N):
        if new_sequence[t]:
            stack, n = np.uint64(0), 0
        if has_prefetch:
            if rank_prefetch:
                _packed_rank_batch(stack, n, prefetch[t], out_pre[t], E)
            stack, n = _packed_touch(stack, n, prefetch[t], E)
        _packed_rank_batch(stack, n, lookups[t], out[t], E)
        stack, n = _packed_touch(stack, n, lookups[t], E)
        if counting:
            row = hist[stream]
            for c in range(k):
                r = out[t, c]
                if r >= 0:
                    row[r] += 1
                elif r == NO_PRIOR_USE:
                    row[E] += 1
            left -= 1
            if left == 0:
                stream, left = stream + 1, rows_per_stream
