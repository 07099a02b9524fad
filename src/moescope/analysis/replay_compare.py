"""Recorded routes against the routes a model recomputes for the same tokens: how often they differ, and why.

Per (token, MoE layer) row, with the recorded row r (ids, weights) and the recomputed row c:
  set differs      the k experts differ as a set (the train-inference routing mismatch RL papers report)
  first differs    slot 0 differs (slot 0 is the first choice, the largest gate weight)
  |dw|             over rows whose sets agree: |r's weight - c's weight| of each expert (NaN: none recorded)
and rows whose set differs are flagged, in this order of precedence:
  zeros            every id is 0 (and, for k = 1, every weight 0 or absent): a kernel that never wrote the row
  duplicated       the token's rows in every layer (ids and weights) equal the previous token's: a stale buffer
  misaligned       the token's sets in every layer equal the recomputed sets of the previous token, or of the
                   next one: routes shifted against their tokens
Duplication and misalignment are judged on the whole token: its rows must match the neighbour's in every layer
and differ from its own recomputed routes in most layers. A near tie flips one layer's set, often to one the
neighbour routes to, and neighbours route alike; a stale or shifted route changes most layers at once.
Counts add up over shards (`merge`), like the analyses'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

KINDS = ("zeros", "duplicated", "misaligned")


@dataclass(frozen=True, eq=False)
class RouteCheck:
    rows: np.ndarray  # int64 [L] rows compared
    set_differs: np.ndarray  # int64 [L]
    first_differs: np.ndarray  # int64 [L]
    weight_slots: np.ndarray  # int64 [L] expert weights compared (rows whose sets agree, weights recorded)
    weight_abs_sum: np.ndarray  # float64 [L]
    weight_abs_max: np.ndarray  # float64 [L] (0 where none compared)
    flags: dict[str, np.ndarray]  # kind -> int64 [L]

    def table(self) -> pd.DataFrame:
        """One row per MoE layer and an "overall" row: shares of rows, and the weight differences."""
        def row(label, i):
            pick = (lambda a: a[i]) if i is not None else (lambda a: a.sum())
            rows, slots = pick(self.rows), pick(self.weight_slots)
            share = lambda a: pick(a) / rows if rows else np.nan
            return {"layer": label, "rows": int(rows), "set_differs": share(self.set_differs),
                    "first_differs": share(self.first_differs),
                    "weight_abs_diff_mean": pick(self.weight_abs_sum) / slots if slots else np.nan,
                    "weight_abs_diff_max": (self.weight_abs_max[i] if i is not None else self.weight_abs_max.max())
                    if slots else np.nan,
                    **{kind: int(pick(self.flags[kind])) for kind in KINDS}}
        return pd.DataFrame([row(str(l), l) for l in range(len(self.rows))] + [row("overall", None)])


def merge(a: RouteCheck, b: RouteCheck) -> RouteCheck:
    return RouteCheck(a.rows + b.rows, a.set_differs + b.set_differs, a.first_differs + b.first_differs,
                      a.weight_slots + b.weight_slots, a.weight_abs_sum + b.weight_abs_sum,
                      np.maximum(a.weight_abs_max, b.weight_abs_max), {k: a.flags[k] + b.flags[k] for k in KINDS})


def compare_routes(ids: np.ndarray, weights: np.ndarray, new_ids: np.ndarray, new_weights: np.ndarray,
                   seq_id: np.ndarray, pos: np.ndarray) -> tuple[RouteCheck, dict[str, np.ndarray]]:
    """Recorded ids/weights [L, T, k] against recomputed ones [L, T, k] for tokens seq_id, pos [T] (ordered by
    sequence, then position). Returns the counts and, per kind, bool [L, T] of the flagged rows."""
    L, T, k = ids.shape
    order, new_order = np.argsort(ids, -1), np.argsort(new_ids, -1)
    by_id, new_by_id = np.take_along_axis(ids, order, -1), np.take_along_axis(new_ids, new_order, -1)  # [L, T, k]
    set_differs = (by_id != new_by_id).any(-1)  # [L, T]
    first_differs = ids[..., 0] != new_ids[..., 0]
    dw = np.abs(np.take_along_axis(weights.astype(np.float64), order, -1)
                - np.take_along_axis(new_weights.astype(np.float64), new_order, -1))  # [L, T, k]
    compared = ~set_differs[..., None] & np.isfinite(dw)

    prev = np.zeros(T, bool)  # token t-1 is the previous position of the same sequence
    prev[1:] = (seq_id[1:] == seq_id[:-1]) & (pos[1:] == pos[:-1] + 1)
    nxt = np.append(prev[1:], False)  # token t+1 is the next one
    zero_weights = ~((weights != 0) & ~np.isnan(weights)).any(-1)
    zeros = set_differs & (ids == 0).all(-1) & (zero_weights | (k > 1))
    same_w = (weights == np.roll(weights, 1, axis=1)) | (np.isnan(weights) & np.isnan(np.roll(weights, 1, axis=1)))
    repeats = (ids == np.roll(ids, 1, axis=1)).all((0, 2)) & same_w.all((0, 2)) & prev  # [T]: every layer
    most = set_differs.sum(0) * 2 > L  # [T]: the token's routes differ in most layers
    duplicated = set_differs & ~zeros & (repeats & most)
    as_prev = (by_id == np.roll(new_by_id, 1, axis=1)).all((0, 2)) & prev  # [T]
    as_next = (by_id == np.roll(new_by_id, -1, axis=1)).all((0, 2)) & nxt
    misaligned = set_differs & ~zeros & ~duplicated & ((as_prev | as_next) & most)
    flagged = {"zeros": zeros, "duplicated": duplicated, "misaligned": misaligned}
    check = RouteCheck(
        rows=np.full(L, T, np.int64), set_differs=set_differs.sum(1), first_differs=first_differs.sum(1),
        weight_slots=compared.sum((1, 2)), weight_abs_sum=np.where(compared, dw, 0.0).sum((1, 2)),
        weight_abs_max=np.where(compared, dw, 0.0).max((1, 2)) if T else np.zeros(L),
        flags={kind: mask.sum(1) for kind, mask in flagged.items()},
    )
    return check, flagged
