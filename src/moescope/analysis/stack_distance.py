"""LRU stack distances of expert lookups: the one LRU engine of the expert-cache analysis and the offload simulator.

Cache model (one cache per stream, e.g. per layer, cold at the start of every sequence): each token touches up
to two *batches* of experts, in order: an optional prefetch batch (a predictor's guess), then the batch of
experts the token actually uses. Every id of a batch is ranked before the batch is applied; then all of them
become the most recent entries, an earlier column counting as more recent (the router's first choice is kept
longest). An id that already occurs in an earlier column of the same batch is not a touch (NOT_AN_EXPERT).

    rank(e) = #distinct experts touched later than e's last touch in this sequence   (Mattson et al. 1970)

An LRU cache of C >= batch size entries holds, after every batch, exactly the C most recent experts, so a
touch finds e cached  <=>  rank(e) < C: one pass of ranks answers every capacity at once (a histogram of
ranks, cumulated, is the hit count of every C). NO_PRIOR_USE marks e not touched earlier in the sequence.

The pass walks each stream token by token in a compiled loop (compiled.py, numba): per touch it compares e's
last stamp with the E stamps of a small array (SIMD over int16 stamps, renumbered in order every couple of thousand
tokens so that they fit), O(E) with no memory traffic beyond that array; up to 16
experts the whole recency order is one 64-bit word of 4-bit entries instead (a rank and a move to the front are
a few word operations: about 1.6x faster per token at Mixtral's 8 experts). NumPy
cannot express the sequential dependency without materialising [E, N] histories (the previous kernel did,
at ~6x the cost at 256 experts / top-8).
"""

from __future__ import annotations

import numpy as np

from moescope.analysis.ranks import NO_PRIOR_USE, NOT_AN_EXPERT

__all__ = ["NOT_AN_EXPERT", "NO_PRIOR_USE", "drop_repeats", "hits_from_ranks", "lru_ranks", "rank_counts",
           "rank_histogram"]


PACKED_MAX_KEYS = 16  # up to here the recency order is one 64-bit word of 4-bit entries (a rank: a few word operations)
SCAN_MAX_KEYS = 1024  # up to here a touch scans every key's stamp (SIMD); above, a Fenwick tree (O(log n))
SCAN_LIMIT_KEYS = 16384  # the scan's int16 stamps hold at most this many keys (with room for a token's batches)


def lru_ranks(lookups: np.ndarray, prefetch: np.ndarray | None, new_sequence: np.ndarray, n_experts: int,
              *, prefetch_ranks: bool = False, method: str = "auto",
              counts: tuple[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(int32 [N, k] rank of every lookup, int32 [N, kp] rank of every prefetch touch or None).

    lookups: int [N, k] experts each token uses, ids outside [0, n_experts) = no expert; prefetch: int [N, kp]
    experts inserted before token t's lookups (same rule), or None; new_sequence: bool [N], True where the
    cache starts cold (a sequence's first token; several streams can be laid end to end, each starting one).
    Prefetch ranks (is a prefetched expert already cached?) are computed only when `prefetch_ranks`.
    method: "packed" (the recency order in one 64-bit word, up to PACKED_MAX_KEYS keys), "scan" (compare with every
    key's last stamp), "tree" (Fenwick tree over stamps) or "auto" (packed, then scan up to SCAN_MAX_KEYS keys,
    then tree): the same ranks. counts: (rows per stream, int64 [S, E + 1]) to add every lookup's rank into, per
    stream of that many rows (packed and scan; what rank_counts uses).
    """
    lookups = np.ascontiguousarray(lookups)
    N, k = lookups.shape
    new_sequence = np.ascontiguousarray(new_sequence, dtype=np.bool_)
    if new_sequence.shape != (N,):
        raise ValueError(f"new_sequence has shape {new_sequence.shape}, lookups {lookups.shape}")
    if N and not new_sequence[0]:
        raise ValueError("the first token must start a sequence")
    has_prefetch = prefetch is not None
    pre = np.ascontiguousarray(prefetch) if has_prefetch else np.zeros((N, 0), lookups.dtype)
    if pre.shape[0] != N:
        raise ValueError(f"prefetch has {pre.shape[0]} rows, lookups {N}")
    out = np.empty((N, k), np.int32)
    out_pre = np.empty(pre.shape, np.int32) if has_prefetch and prefetch_ranks else np.empty((0, 0), np.int32)
    kk = max(k, pre.shape[1])
    pre = pre.astype(lookups.dtype, copy=False)
    rank_prefetch = bool(has_prefetch and prefetch_ranks)
    if method == "auto":
        method = "packed" if n_experts <= PACKED_MAX_KEYS else "scan" if n_experts <= SCAN_MAX_KEYS else "tree"
    rows, hist = counts if counts is not None else (1, np.zeros((0, n_experts + 1), np.int64))
    if method == "packed" and n_experts > PACKED_MAX_KEYS:
        raise ValueError(f"method 'packed' holds at most {PACKED_MAX_KEYS} experts, not {n_experts}")
    if method == "scan" and (n_experts > SCAN_LIMIT_KEYS or kk > SCAN_LIMIT_KEYS):
        raise ValueError(f"method 'scan' holds at most {SCAN_LIMIT_KEYS} experts and batches of as many, not "
                         f"{n_experts} and {kk}")
    if method == "packed":
        from moescope.analysis.compiled import lru_rank_pass_packed  # numba on first use

        lru_rank_pass_packed(lookups, pre, new_sequence, int(n_experts), has_prefetch, rank_prefetch, out, out_pre,
                             max(1, int(rows)), hist)
    elif method == "scan":
        from moescope.analysis.compiled import lru_rank_pass  # numba on first use: the vLLM plugin imports analysis/

        lru_rank_pass(lookups, pre, new_sequence, int(n_experts), kk, has_prefetch, rank_prefetch, out, out_pre,
                      max(1, int(rows)), hist)
    elif method == "tree" and counts is None:
        starts = np.flatnonzero(new_sequence)
        length = np.zeros(N, np.int64)
        length[starts] = np.diff(np.append(starts, N))
        from moescope.analysis.compiled import lru_rank_pass_tree

        lru_rank_pass_tree(lookups, pre, new_sequence, length, int(n_experts), kk, has_prefetch, rank_prefetch, out,
                           out_pre)
    else:
        raise ValueError(f"unknown method {method!r}")
    return out, (out_pre if has_prefetch and prefetch_ranks else None)


def rank_counts(lookups: np.ndarray, prefetch: np.ndarray | None, new_sequence: np.ndarray,
                n_experts: int) -> np.ndarray:
    """int64 [S, E + 1]: lookups of each of S streams by LRU rank 0..E-1, column E = NO_PRIOR_USE.

    lookups: int [S, T, k], prefetch: int [S, T, kp] or None, new_sequence: bool [T] (the same for every
    stream: e.g. the layers of one shard, each its own cache). Every capacity's hits are cumsum(counts)[C - 1].
    """
    S, T, k = lookups.shape
    counts = np.zeros((S, n_experts + 1), np.int64)
    if T:
        lru_ranks(lookups.reshape(S * T, k), None if prefetch is None else prefetch.reshape(S * T, -1),
                  np.tile(new_sequence, S), n_experts, method="packed" if n_experts <= PACKED_MAX_KEYS else "scan",
                  counts=(T, counts))
    return counts


def rank_histogram(ranks: np.ndarray, n_experts: int) -> np.ndarray:
    """int64 [S, E + 1]: ranks [S, n] counted per row: 0..E-1, column E = NO_PRIOR_USE; NOT_AN_EXPERT dropped."""
    S = ranks.shape[0]
    side = n_experts + 2  # ranks 0..E-1, then NO_PRIOR_USE, then NOT_AN_EXPERT
    binned = np.where(ranks < 0, n_experts - 1 - ranks, ranks) + (np.arange(S) * side)[:, None]
    return np.bincount(binned.ravel(), minlength=S * side).reshape(S, side)[:, : n_experts + 1]


def hits_from_ranks(ranks: np.ndarray, capacity: int) -> np.ndarray:
    """bool [...]: the touches an LRU cache of `capacity` entries finds cached."""
    return (ranks >= 0) & (ranks < capacity)


def drop_repeats(events: np.ndarray, sentinel: int) -> np.ndarray:
    """Replace an id that already occurs in an earlier column of the same batch (row) by the sentinel."""
    out = events.copy()
    for c in range(1, events.shape[1]):  # kk x kk column comparisons (kk is small)
        repeat = (events[:, :c] == events[:, c : c + 1]).any(axis=1)
        out[repeat, c] = sentinel
    return out
