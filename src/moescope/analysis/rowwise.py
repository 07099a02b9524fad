"""Sorting and top-m selection across a short leading axis, as whole-array elementwise operations.

Routing arrays have a short axis (k slots, E experts) and a long one (tokens). NumPy reductions and sorts
along a short *last* axis pay a per-row overhead; holding the short axis first ([k, N] "slot-major",
[E, N] "expert-major") turns each step into one elementwise operation over all N tokens.
"""

from __future__ import annotations

import numpy as np

SELECTION_MAX_EXPERTS = 16  # above this, top-m by argpartition along the expert axis is cheaper


def sort_descending(rows: np.ndarray) -> np.ndarray:
    """rows [r, ...] sorted descending along axis 0 (odd-even transposition network, r passes)."""
    return _sort_network(rows, descending=True)


def sort_ascending(rows: np.ndarray) -> np.ndarray:
    """rows [r, ...] sorted ascending along axis 0."""
    return _sort_network(rows, descending=False)


def _sort_network(rows: np.ndarray, descending: bool) -> np.ndarray:
    out = rows.copy()
    first, second = (np.maximum, np.minimum) if descending else (np.minimum, np.maximum)
    for p in range(out.shape[0]):
        for i in range(p % 2, out.shape[0] - 1, 2):  # compare-exchange rows i and i+1 of the whole array
            kept = first(out[i], out[i + 1])
            second(out[i], out[i + 1], out=out[i + 1])
            out[i] = kept
    return out


def top_m(values: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(intp [m, ...] indices, [m, ...] values) of the m largest along axis 0, descending; ties -> lower index.

    values: expert-major [E, ...] with no NaN.
    """
    E = values.shape[0]
    if E > SELECTION_MAX_EXPERTS:
        return top_m_by_partition(values, m)
    # rank[e] = number of experts before e in (value descending, index ascending) order
    rank = np.zeros(values.shape, np.int16)
    hit = np.empty(values.shape[1:], bool)
    for e in range(E):  # E x E whole-array comparisons (E is small here)
        for f in range(E):
            if f != e:
                (np.greater if f > e else np.greater_equal)(values[f], values[e], out=hit)
                np.add(rank[e], hit, out=rank[e], casting="unsafe")
    idx = np.zeros((m,) + values.shape[1:], np.int16)
    val = np.zeros((m,) + values.shape[1:], values.dtype)
    for e in range(E):  # exactly one expert has each rank: idx[r] = sum_e e * [rank_e == r]
        for r in range(m):
            np.equal(rank[e], np.int16(r), out=hit)
            if e:
                idx[r] += hit * np.int16(e)  # arithmetic, not masked assignment: far faster in NumPy
            val[r] += hit * values[e]
    return idx.astype(np.intp), val


def top_m_by_partition(values: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """top_m by argpartition (any E): the m largest of values [E, ...] along axis 0, ties to the lower index."""
    E = values.shape[0]
    rows = np.moveaxis(values, 0, -1)  # [..., E]
    if m < E:
        cand = np.argpartition(-rows, m - 1, axis=-1)[..., :m]
        # argpartition does not favour low indices on ties at the boundary: widen to all tied values
        kth = np.take_along_axis(rows, cand, axis=-1).min(axis=-1, keepdims=True)
        ties = (rows == kth).sum(axis=-1) > (np.take_along_axis(rows, cand, axis=-1) == kth).sum(axis=-1)
        if ties.any():
            order_all = np.argsort(-rows[ties], axis=-1, kind="stable")[..., :m]
            cand[ties] = order_all
    else:
        cand = np.broadcast_to(np.arange(E), rows.shape).copy()
    vals = np.take_along_axis(rows, cand, axis=-1)
    # sort the m candidates: descending value, then ascending index
    order = _lexsort_rows(-vals, cand)
    cand = np.take_along_axis(cand, order, axis=-1)
    vals = np.take_along_axis(vals, order, axis=-1)
    return np.moveaxis(cand, -1, 0).astype(np.intp), np.moveaxis(vals, -1, 0)


def _lexsort_rows(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per-row order by (primary, secondary) along the last axis."""
    by_secondary = np.argsort(secondary, axis=-1, kind="stable")
    by_primary = np.argsort(np.take_along_axis(primary, by_secondary, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(by_secondary, by_primary, axis=-1)
