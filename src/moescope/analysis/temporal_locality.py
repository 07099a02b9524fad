"""Temporal locality: do consecutive tokens of a sequence go to the same experts, more than chance?

Over pairs (t-1, t) of adjacent positions of one sequence, per layer:
  same_first      P(first choice of t == first choice of t-1)  [first choice = largest gate weight]
  overlap         E|S_t ∩ S_t-1| / k, the share of t's experts the previous token also used
  any_shared      P(S_t ∩ S_t-1 non-empty)
Chance assumes the two tokens route independently with the observed marginals of the paired tokens:
  same_first chance = sum_i q_prev(i) q_cur(i)  (q = first-choice distribution),
  overlap chance    = sum_j P(j in S_prev) P(j in S_cur) / k.
any_shared has no closed-form chance rate (it depends on the joint set distribution), so none is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import expert_counts, jsonable
from moescope.analysis.result import layer_labels
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "temporal_locality"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)


@dataclass(frozen=True, eq=False)
class LocalityState:
    layers: tuple[int, ...]
    n_pairs: int
    same_first: np.ndarray  # int64 [L]
    overlap: np.ndarray  # int64 [L] sum of |S_t ∩ S_t-1|
    any_shared: np.ndarray  # int64 [L]
    first_prev: np.ndarray  # int64 [L, E] first-choice counts of the earlier token of each pair
    first_cur: np.ndarray  # int64 [L, E]
    load_prev: np.ndarray  # int64 [L, E] slots of the earlier token of each pair
    load_cur: np.ndarray  # int64 [L, E]


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> LocalityState:
    view = ShardView.of(shard, ctx)
    E = view.E
    starts = np.flatnonzero(~view.has_previous)  # first token of each sequence: never the later of a pair
    ends = np.append(starts[1:] - 1, view.T - 1) if view.T else starts  # last token: never the earlier one
    fc = view.first_choice  # [L, T]
    same = ((fc[:, 1:] == fc[:, :-1]) & (fc[:, 1:] < E) & view.has_previous[None, 1:]).sum(axis=1)
    overlap = view.previous_overlap  # [L, T], 0 where there is no previous token
    first_all = expert_counts(fc[..., None], E)
    # every token is the later token of a pair except sequence starts, the earlier one except sequence ends
    return LocalityState(
        view.layers,
        view.T - starts.size,
        same,
        overlap.sum(axis=1),
        (overlap > 0).sum(axis=1),
        first_all - expert_counts(fc[:, ends, None], E),
        first_all - expert_counts(fc[:, starts, None], E),
        view.load[:, :E] - expert_counts(view.ids[:, ends], E),
        view.load[:, :E] - expert_counts(view.ids[:, starts], E),
    )


def merge(a: LocalityState, b: LocalityState) -> LocalityState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge temporal-locality states of different layers {a.layers} and {b.layers}")
    return LocalityState(a.layers, a.n_pairs + b.n_pairs, *(getattr(a, f) + getattr(b, f) for f in _SUMMED))


_SUMMED = ("same_first", "overlap", "any_shared", "first_prev", "first_cur", "load_prev", "load_cur")


@dataclass(frozen=True, eq=False)
class LocalityResult:
    layers: tuple[int, ...]
    n_pairs: int
    rates: dict[str, np.ndarray]  # each float64 [L + 1]: per layer, then OVERALL
    notes: tuple[str, ...] = ()

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": layer_labels(self.layers), "pairs": self.n_pairs, **self.rates})

    def summary(self) -> dict:
        r = {key: v[-1] for key, v in self.rates.items()}
        r["same_first_over_chance"] = r["same_first"] / r["same_first_chance"] if r["same_first_chance"] else None
        r["overlap_over_chance"] = r["overlap"] / r["overlap_chance"] if r["overlap_chance"] else None
        return jsonable({"pairs": self.n_pairs, **r})


def finalize(state: LocalityState, ctx: AnalysisContext) -> LocalityResult:
    n, k = state.n_pairs, ctx.top_k
    L = len(state.layers)

    def with_overall(numerator: np.ndarray, denominator: float) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.append(numerator, numerator.sum() / L) / denominator if denominator else np.full(L + 1, np.nan)

    chance_first = (state.first_prev * state.first_cur).sum(axis=1) / n if n else np.zeros(L)
    chance_overlap = (state.load_prev * state.load_cur).sum(axis=1) / n if n else np.zeros(L)
    rates = {
        "same_first": with_overall(state.same_first, n),
        "same_first_chance": with_overall(chance_first, n),
        "overlap": with_overall(state.overlap, n * k),
        "overlap_chance": with_overall(chance_overlap, n * k),
        "any_shared": with_overall(state.any_shared, n),
    }
    notes = () if n else ("no sequence has two tokens: nothing to compare",)
    return LocalityResult(state.layers, n, rates, notes)
