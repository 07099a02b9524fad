"""Routing slots in gate-weight order: the schema-2 contract that slot 0 is the first choice.

Within every (token, MoE layer) row of a trace, the k slots are ordered by gate weight, descending;
slots of equal weight by expert id, ascending. So `topk_ids[..., 0]` (SQL `topk_ids[1]`) is the first
choice everywhere: in `Trace.shards()`, in DuckDB, in JSONL/CSV exports and in imports.

Ties are judged on the weights *as stored* (float16-rounded unless the capture kept float32): a reader
holding only the trace can check the order exactly (`slot_order_problem`), and a second capture of the same
weights orders them the same way. A NaN weight counts as -inf (last), except in a row whose weights are all
NaN: engines that record expert ids only (vLLM's, SGLang's routed experts; trace/formats/) list them by rank,
first choice first, and that given order is the only one there is, so such rows are kept as they are.

Many routers select with `topk(sorted=False)` (DeepSeek-V3, GLM-4.5, LongCat, ...) or scale the chosen
weights per expert after a sorted top-k (Gemma-4), so the order the experts received means nothing; the
capture path orders each batch's rows once, on the shard writer thread as the batch arrives, never in a hook.
Traces of schema version 1 were stored in the experts' order and are put in this order when read.
"""

from __future__ import annotations

import functools

import numpy as np


def _key(weights: np.ndarray) -> np.ndarray:
    """The sort key of each weight: the stored value, NaN as -inf."""
    return np.where(np.isnan(weights), -np.inf, weights)


def out_of_order(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """bool [...]: rows of ids/weights [..., k] whose slots break the order (weight desc, then id asc)."""
    w = _key(weights)
    after, before = w[..., 1:], w[..., :-1]
    ok = (after < before) | ((after == before) & (ids[..., 1:] > ids[..., :-1]))
    ranked_only = np.isnan(weights).all(axis=-1)  # ids without weights: kept in the order given (by rank)
    return ~ok.all(axis=-1) & ~ranked_only


# A slot's place in the contract order as one int64, so a row's order is one integer sort (SIMD in NumPy): the
# weight's float32 bits made order-preserving and inverted (descending), then the id (ascending), then the slot's
# index (ties keep the given order, as a stable sort would). 32 + 16 + 8 bits: ids of int16 range, k <= 256.
_ID_BITS, _SLOT_BITS = 16, 8
_WEIGHT_SHIFT = _ID_BITS + _SLOT_BITS


def _weight_keys32(weights: np.ndarray) -> np.ndarray:
    """uint32 [...]: each float16/32 weight's place in descending order (NaN as -inf, -0.0 as +0.0)."""
    w = weights.astype(np.float32)  # a copy (float16 -> float32 is exact, so ties stay ties)
    w[np.isnan(w)] = -np.inf
    w += np.float32(0.0)  # -0.0 + 0.0 = +0.0: the two zeros are one weight
    bits = w.view(np.uint32)
    ascending = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))  # unsigned order = float order
    return np.uint32(0xFFFFFFFF) - ascending


@functools.cache
def _float16_weight_keys() -> np.ndarray:
    """int64 [65536]: the weight part of the key of every float16 bit pattern (a 512 KiB table: a float16 weight's
    key is one lookup instead of a dozen passes)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return _weight_keys32(every).astype(np.int64) << _WEIGHT_SHIFT


def _packed_keys(ids: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """int64 [..., k]: each slot's sort key with its slot index in the low bits (rows of ids only, all weights NaN,
    keyed by slot alone); None where the ids, the weights' dtype or k do not fit the packing."""
    if ids.shape[-1] > 1 << _SLOT_BITS or weights.dtype not in (np.float16, np.float32) or ids.dtype.kind not in "iu":
        return None  # float64 weights would lose the ties float32 cannot tell apart
    if ids.dtype not in (np.int8, np.uint8, np.int16) and ids.size and (ids.min() < -(1 << 15) or ids.max() >= 1 << 15):
        return None
    if weights.dtype == np.float16:
        keys = np.take(_float16_weight_keys(), weights.view(np.uint16))
    else:
        keys = _weight_keys32(weights).astype(np.int64) << _WEIGHT_SHIFT
    keys |= (ids.astype(np.int64) + (1 << 15)) << _SLOT_BITS
    nan = np.isnan(weights)
    if nan.any():
        ranked_only = nan.all(axis=-1)  # ids by rank: the given order is the order
        keys[ranked_only] = 0
    keys |= np.arange(ids.shape[-1], dtype=np.int64)
    return keys


def order_slots(ids: np.ndarray, weights: np.ndarray, *per_slot: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, weights, *per_slot) [..., k] with each row's slots in contract order; rows already in order keep
    theirs (the inputs are returned as they are when every row is). `per_slot` arrays (e.g. expert output norms)
    move with their slots.

    Each slot's key (weight, id, slot index) is packed into one int64 and the rows sorted by it: a key order is
    exactly the contract's (a row in order sorts to itself), so every row is sorted in one NumPy call and the
    ids read back from the keys, about 3x faster than a lexsort of the rows out of order. Ids beyond int16's
    range, float64 weights and k > 256 fall back to that lexsort.
    """
    keys = _packed_keys(ids, weights)
    if keys is None:
        return _order_slots_lexsort(ids, weights, *per_slot)
    ordered = np.sort(keys, axis=-1)
    if np.array_equal(ordered, keys):
        return (ids, weights, *per_slot)
    k = ids.shape[-1]
    sorted_ids = ((ordered >> _SLOT_BITS & 0xFFFF) - (1 << 15)).astype(ids.dtype)  # read back from the keys
    ranked_only = ordered[..., -1] < 1 << _SLOT_BITS  # keyed by slot alone: the given ids, in the given order
    if ranked_only.any():
        sorted_ids[ranked_only] = ids[ranked_only]
    # each slot's flat index into the [..., k] arrays: np.take with int32 indices is ~3x take_along_axis
    index_type = np.int32 if keys.size < 1 << 31 else np.intp
    flat = (ordered & ((1 << _SLOT_BITS) - 1)).astype(index_type)
    flat += np.arange(0, flat.size, k, dtype=index_type).reshape(*flat.shape[:-1], 1)
    return (sorted_ids, *(np.take(values.reshape(-1), flat) for values in (weights, *per_slot)))


def _order_slots_lexsort(ids: np.ndarray, weights: np.ndarray, *per_slot: np.ndarray) -> tuple[np.ndarray, ...]:
    """order_slots for any ids: one lexsort over the rows out of order."""
    bad = out_of_order(ids, weights)
    if not bad.any():
        return (ids, weights, *per_slot)
    order = np.lexsort((ids[bad], -_key(weights[bad])), axis=-1)  # [n, k]
    moved = []
    for values in (ids, weights, *per_slot):
        values = values.copy()
        values[bad] = np.take_along_axis(values[bad], order, axis=-1)
        moved.append(values)
    return tuple(moved)


def slot_order_problem(ids: np.ndarray, weights: np.ndarray) -> str | None:
    """Why ids/weights [..., k] break the slot-order contract (the first such row), or None."""
    bad = out_of_order(ids, weights)
    if not bad.any():
        return None
    row = np.unravel_index(int(np.argmax(bad)), bad.shape)
    return (f"{int(bad.sum())} routing rows are not in gate-weight order (first: row {tuple(int(i) for i in row)}, "
            f"ids {ids[row].tolist()}, weights {weights[row].tolist()})")


def v1_ordered_routing_sql(source: str, columns: list[str], k: int) -> str:
    """A SELECT over `source` (a schema-1 routing relation) giving its rows in contract order, same columns."""
    pairs = "list_sort(list_transform(list_zip(topk_weights, topk_ids), lambda p: {'key': -coalesce(nullif(p[1], 'NaN'::FLOAT), '-inf'::FLOAT), 'id': p[2], 'w': p[1]}))"
    ordered = {
        "topk_ids": f"list_transform(s.slots, lambda x: x.id)::SMALLINT[{k}] AS topk_ids",
        "topk_weights": f"list_transform(s.slots, lambda x: x.w)::FLOAT[{k}] AS topk_weights",
    }
    select = ", ".join(ordered.get(c, c) for c in columns)
    return f"SELECT {select} FROM (SELECT *, {pairs} AS slots FROM {source}) s"
