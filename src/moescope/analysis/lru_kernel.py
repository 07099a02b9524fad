"""Vectorised LRU expert cache: for every expert lookup, how many other experts were used more recently.

Cache model (one cache per layer, cold at the start of every sequence, capacity C >= batch size):
each token inserts up to two *batches* of experts, in order: an optional prefetch batch (a predictor's
guess) and the batch of experts the token actually uses. A token's experts are looked up after its
prefetch batch and before its own batch; hits and misses are then both (re)inserted as most recently used,
evicting the least recently used. Inside one batch, an earlier column counts as more recent (the router's
first choice is kept longest). With C at least the batch size, the cache after every batch holds exactly
the C experts with the latest "stamps" (batch, column), so

    lookup of e hits  <=>  e was used earlier in the sequence and rank(e) < C,
    rank(e) = #distinct experts with a later stamp than e's last one,

and one rank per lookup answers every capacity at once. Last-use stamps of every expert come from one
running maximum along the stream; rank(e) then either compares e's stamp with every expert's (small E),
or counts the distinct experts in the batches strictly between e's last batch b and now (a range-OR of
bitmasks, O(1) per lookup with a sparse table) plus those of batch b in earlier columns than e that are
not in that range (large E). No per-token loop.
"""

from __future__ import annotations

import numpy as np

NO_PRIOR_USE = -1  # rank of a lookup whose expert was not used earlier in the sequence (compulsory miss)
NOT_AN_EXPERT = -2  # rank of a slot that holds no real expert (not a lookup)


def lru_ranks(
    lookups: np.ndarray,
    prefetch: np.ndarray | None,
    sequence_start: np.ndarray,
    n_experts: int,
    method: str = "auto",
) -> np.ndarray:
    """int64 [N, k] LRU rank of every lookup (or NO_PRIOR_USE / NOT_AN_EXPERT).

    lookups: intp [N, k] expert ids used by each token, `n_experts` = no expert; prefetch: intp [N, kp]
    experts a predictor inserts before token t's lookups (same sentinel), or None; sequence_start:
    intp [N] index of the first token of t's sequence (the cache starts empty there). Several caches
    (e.g. layers) can share one call by laying their streams end to end, each starting a sequence.
    method: "compare" counts newer experts by comparing last-use stamps (O(k*E) per token), "range_or"
    by a sparse-table OR of bitmasks (O(k * E/64) plus the table); "auto" picks by k*E.
    """
    N, k = lookups.shape
    E = n_experts
    kp = 0 if prefetch is None else prefetch.shape[1]
    kk = max(k, kp)  # columns per batch
    per_token = 1 if prefetch is None else 2  # batches per token
    lookups = drop_repeats(lookups, E)
    prefetch = None if prefetch is None else drop_repeats(prefetch, E)
    dtype = np.int32 if N * per_token * kk < 2**31 else np.int64
    token = np.arange(N, dtype=dtype)

    # history[e, t]: e's latest stamp before token t's lookup, stamp = batch * kk + (kk - 1 - column)
    used = _scatter_stamps(lookups, (token * per_token + per_token - 1) * kk, kk, E)  # [E + 1, N]
    fetched = None if prefetch is None else _scatter_stamps(prefetch, token * per_token * kk, kk, E)
    if fetched is not None:
        np.maximum(used, fetched, out=used)  # both batches of each token
    np.maximum.accumulate(used, axis=1, out=used)  # latest stamp up to and including token t
    history = fetched if fetched is not None else np.empty_like(used)  # reuse the prefetch buffer
    if fetched is not None:
        np.maximum(fetched[:, 1:], used[:, :-1], out=history[:, 1:])  # token t's own prefetch counts too
    else:
        history[:, 1:] = used[:, :-1]
        history[:, 0] = -1
    del used
    cols = lookups.T  # [k, N]
    prev = history[cols, token]  # [k, N] last stamp of the looked-up expert
    seen = prev >= (sequence_start * per_token * kk)[None, :]  # used earlier in this sequence

    if method == "auto":
        method = "compare" if k * E <= 2048 else "range_or"  # measured: compare wins up to 256 experts, top-8
    if method == "compare":
        rank = np.zeros((k, N), np.int16)
        newer = np.empty((k, N), bool)
        for e in range(E):  # E whole-array comparisons per slot
            np.greater(history[e][None, :], prev, out=newer)
            np.add(rank, newer, out=rank, casting="unsafe")
    elif method == "range_or":
        events = np.full((N, per_token, kk), E, np.intp)  # [N, batches, kk]
        if prefetch is not None:
            events[:, 0, :kp] = prefetch
        events[:, -1, :k] = lookups
        own_batch = np.arange(N) * per_token + (per_token - 1)
        rank = _rank_by_range_or(events.reshape(N * per_token, kk), prev.T.astype(np.int64), seen.T, own_batch, kk, E).T
    else:
        raise ValueError(f"unknown method {method!r}")
    rank = np.where(seen, rank, NO_PRIOR_USE)
    return np.where(cols < E, rank, NOT_AN_EXPERT).T.astype(np.int64)


def _scatter_stamps(ids: np.ndarray, base: np.ndarray, kk: int, E: int) -> np.ndarray:
    """[E + 1, N]: stamp base[t] + kk - 1 - c at (ids[t, c], t), -1 elsewhere (row E takes sentinels)."""
    N, k = ids.shape
    out = np.full((E + 1, N), -1, base.dtype)
    stamps = base[None, :] + (kk - 1 - np.arange(k, dtype=base.dtype))[:, None]  # [k, N]
    out.ravel()[(ids.T * N + np.arange(N)).ravel()] = stamps.ravel()
    return out


def _rank_by_range_or(events, prev, seen, own_batch, kk, E) -> np.ndarray:
    """int64 [N, k]: distinct experts with a later stamp than `prev`, from batch bitmasks."""
    prev_batch = prev // kk
    masks = _bitmasks(events, E)  # uint64 [NB, kk, W] one-hot bits per column
    batch_mask = masks.sum(axis=1, dtype=np.uint64)  # [NB, W] (columns distinct: sum == OR)
    earlier_columns = np.concatenate(
        [np.zeros_like(masks[:, :1]), np.cumsum(masks, axis=1, dtype=np.uint64)], axis=1
    )  # [NB, kk+1, W]
    pb = np.where(seen, prev_batch, 0)
    lo, hi = pb + 1, own_batch[:, None] - 1  # range of batches strictly between, may be empty
    between = _range_or(batch_mask, lo, hi)  # [N, k, W]
    column = np.where(seen, kk - 1 - prev % kk, 0)
    newer_same_batch = earlier_columns[pb, column] & ~between  # [N, k, W]
    return np.bitwise_count(between).sum(axis=-1, dtype=np.int64) + np.bitwise_count(newer_same_batch).sum(
        axis=-1, dtype=np.int64
    )


def drop_repeats(events: np.ndarray, sentinel: int) -> np.ndarray:
    """Replace an id that already occurs in an earlier column of the same batch by the sentinel."""
    out = events.copy()
    for c in range(1, events.shape[1]):  # kk x kk column comparisons (kk is small)
        repeat = (events[:, :c] == events[:, c : c + 1]).any(axis=1)
        out[repeat, c] = sentinel
    return out


def _bitmasks(events: np.ndarray, n_experts: int) -> np.ndarray:
    """uint64 [NB, kk, W]: bit (id % 64) of word (id // 64) for each real id; zero for the sentinel."""
    words = (n_experts + 63) // 64
    real = events < n_experts
    bit = np.left_shift(np.uint64(1), (events % 64).astype(np.uint64))
    out = np.zeros(events.shape + (words,), np.uint64)
    for w in range(words):  # ceil(E / 64) words
        out[..., w] = np.where(real & (events // 64 == w), bit, np.uint64(0))
    return out


def _range_or(masks: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """uint64 [..., W]: OR of masks[lo..hi] (inclusive) per query; zero where lo > hi.

    masks: uint64 [N, W]; lo, hi: integer arrays of one shape. Sparse table: level j holds ORs of 2^j rows.
    """
    n, words = masks.shape
    length = np.maximum(hi - lo + 1, 0)
    longest = int(length.max(initial=0))
    levels = [masks]
    while (1 << len(levels)) <= longest:
        half = 1 << (len(levels) - 1)
        prev = levels[-1]
        levels.append(prev[:-half] | prev[half:] if prev.shape[0] > half else prev[:0])
    table = np.zeros((len(levels), n, words), np.uint64)  # [levels, N, W], zero padded
    for j, level in enumerate(levels):
        table[j, : level.shape[0]] = level
    level_of = np.where(length > 0, np.floor(np.log2(np.maximum(length, 1))).astype(np.intp), 0)
    # guard float rounding of log2 at exact powers of two
    level_of = np.where((1 << (level_of + 1)) <= length, level_of + 1, level_of)
    start = np.where(length > 0, lo, 0)
    end = np.where(length > 0, hi - (1 << level_of) + 1, 0)
    out = table[level_of, start] | table[level_of, end]
    out[length == 0] = 0
    return out
