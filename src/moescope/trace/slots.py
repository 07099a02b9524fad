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
capture path orders rows once, when a shard's tables are built (the writer thread), never in a hook.
Traces of schema version 1 were stored in the experts' order and are put in this order when read.
"""

from __future__ import annotations

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


def order_slots(ids: np.ndarray, weights: np.ndarray, *per_slot: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, weights, *per_slot) [..., k] with each row's slots in contract order; rows already in order are
    untouched. `per_slot` arrays (e.g. expert output norms) move with their slots.

    Only rows out of order are sorted (one lexsort over them): families that already select with a sorted
    top-k cost one comparison pass.
    """
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
