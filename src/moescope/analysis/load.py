"""Expert load: how many routing slots each expert receives, and how far that is from balanced.

Per layer, a token contributes k slots. Statistics of the load vector c[E] (population std, as np.std):
share = c / sum(c); expected share = 1/E; CV = std/mean; balance score = 1 - CV (1 = perfectly even,
the seed notebook's score); max/mean; normalised load entropy = H(share) / ln E (1 = even, 0 = one expert).
An expert is dead when c <= dead_max_count, under-used when c < underused_factor * mean and overloaded
when c > overloaded_factor * mean. The OVERALL row treats every (layer, expert) as one unit of L*E:
experts of different layers are different experts, so their loads are not pooled.
Only routed experts carry load: slots that went to non-compute choices (LongCat's identity experts, ZAYA's
skip) are counted apart, as `non_compute_share` = those slots / all T*k slots of the layer.

The summary leads with per-layer values (the worst layer and the mean over layers): a pooled number can
look balanced while every layer is not. The pooled values follow, suffixed `_pooled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext, Thresholds
from moescope.analysis.kernels import entropy, jsonable
from moescope.analysis.result import layer_labels, worst_and_mean
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "load"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)


@dataclass(frozen=True, eq=False)
class LoadState:
    layers: tuple[int, ...]
    counts: np.ndarray  # int64 [L, E]
    invalid_slots: np.ndarray  # int64 [L] slots whose id was neither an expert nor a non-compute choice
    n_tokens: int
    non_compute_slots: np.ndarray  # int64 [L] slots that went to a non-compute choice


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> LoadState:
    view = ShardView.of(shard, ctx)
    not_experts = view.load[:, view.E]  # [L]: the sentinel column
    return LoadState(view.layers, view.load[:, : view.E].copy(), not_experts - view.non_compute_slots, view.T,
                     view.non_compute_slots.copy())


def merge(a: LoadState, b: LoadState) -> LoadState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge load states of different layers {a.layers} and {b.layers}")
    return LoadState(a.layers, a.counts + b.counts, a.invalid_slots + b.invalid_slots, a.n_tokens + b.n_tokens,
                     a.non_compute_slots + b.non_compute_slots)


@dataclass(frozen=True, eq=False)
class LoadResult:
    layers: tuple[int, ...]
    counts: np.ndarray  # int64 [L, E]
    invalid_slots: np.ndarray  # int64 [L]
    n_tokens: int
    top_k: int
    thresholds: Thresholds
    stats: dict[str, np.ndarray]  # each float64 [L + 1]: per layer, then OVERALL
    status: np.ndarray  # str [L, E]: "dead" | "underused" | "overloaded" | "ok"
    notes: tuple[str, ...] = ()
    non_compute_slots: np.ndarray | None = None  # int64 [L]
    non_compute_kinds: tuple[str, ...] = ()

    @property
    def non_compute_share(self) -> np.ndarray:
        """float64 [L + 1]: share of each layer's T*k slots that went to non-compute choices, then all layers."""
        slots = np.zeros(len(self.layers), np.int64) if self.non_compute_slots is None else self.non_compute_slots
        total = max(self.n_tokens * self.top_k, 1)
        return np.append(slots / total, slots.sum() / (total * max(len(self.layers), 1)))

    @property
    def share(self) -> np.ndarray:
        """float64 [L, E] fraction of each layer's slots."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.counts / self.counts.sum(axis=1, keepdims=True)

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        L, E = self.counts.shape
        mean = self.counts.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = self.counts / mean
        per_expert = pd.DataFrame(
            {
                "layer": np.repeat(self.layers, E),
                "expert": np.tile(np.arange(E), L),
                "count": self.counts.ravel(),
                "share": self.share.ravel(),
                "expected_share": np.full(L * E, 1.0 / E),
                "load_over_expected": ratio.ravel(),
                "status": self.status.ravel(),
            }
        )
        per_layer = pd.DataFrame({"layer": layer_labels(self.layers), **self.stats,
                                  "non_compute_share": self.non_compute_share})
        return {"per_expert": per_expert, "per_layer": per_layer}

    def summary(self) -> dict:
        """Per-layer values first (the worst layer, the mean over layers), then the pooled ones."""
        overall = {key: values[-1] for key, values in self.stats.items()}
        flagged = {
            status: [[int(self.layers[l]), int(e)] for l, e in zip(*np.nonzero(self.status == status))]
            for status in ("dead", "overloaded")
        }
        return jsonable(
            {
                **worst_and_mean(self.stats["balance_score"][:-1], self.layers, "balance_score", worst=np.nanargmin),
                **worst_and_mean(self.stats["max_over_mean"][:-1], self.layers, "max_over_mean", worst=np.nanargmax),
                "n_tokens": self.n_tokens,
                "n_layers": len(self.layers),
                "n_experts": self.counts.shape[1],
                "top_k": self.top_k,
                "balance_score_pooled": overall["balance_score"],
                "cv_pooled": overall["cv"],
                "load_entropy_norm_pooled": overall["load_entropy_norm"],
                "max_over_mean_pooled": overall["max_over_mean"],
                "n_dead": int(overall["n_dead"]),
                "n_underused": int(overall["n_underused"]),
                "n_overloaded": int(overall["n_overloaded"]),
                "dead_experts": flagged["dead"],
                "overloaded_experts": flagged["overloaded"],
                "invalid_slots": int(self.invalid_slots.sum()),
                "non_compute_share": self.non_compute_share[-1],
                "non_compute_kinds": list(self.non_compute_kinds),
            }
        )


def finalize(state: LoadState, ctx: AnalysisContext) -> LoadResult:
    th = ctx.thresholds
    counts = state.counts.astype(np.float64)  # [L, E]
    L, E = counts.shape
    rows = [counts[l] for l in range(L)] + [counts.ravel()]  # per layer, then all L*E units
    per_row = [_load_stats(row, th) for row in rows]
    stats = {name: np.array([r[name] for r in per_row]) for name in _STAT_NAMES}
    mean = counts.mean(axis=1, keepdims=True)
    status = np.full((L, E), "ok", dtype=object)
    status[counts < th.underused_factor * mean] = "underused"
    status[counts > th.overloaded_factor * mean] = "overloaded"
    status[counts <= th.dead_max_count] = "dead"
    notes = []
    if state.invalid_slots.any():
        notes.append(f"{int(state.invalid_slots.sum())} slots held ids that name no expert and are not counted as load")
    if state.non_compute_slots.any():
        notes.append(f"{int(state.non_compute_slots.sum())} slots went to non-compute choices "
                     f"({', '.join(ctx.non_compute_kinds)}; ids {list(ctx.non_compute_ids)}) and count toward no expert's load")
    if ctx.n_experts_inferred:
        notes.append(f"expert count inferred: {E} experts is the largest expert id seen + 1, so experts never routed to "
                     "are missing and dead experts may be undercounted (import with --n-experts)")
    return LoadResult(state.layers, state.counts, state.invalid_slots, state.n_tokens, ctx.top_k, th, stats,
                      status.astype(str), tuple(notes), state.non_compute_slots, ctx.non_compute_kinds)


_STAT_NAMES = (
    "slots",
    "mean",
    "std",
    "min",
    "max",
    "max_over_mean",
    "cv",
    "balance_score",
    "load_entropy_norm",
    "n_dead",
    "n_underused",  # includes dead experts
    "n_overloaded",
)


def _load_stats(c: np.ndarray, th: Thresholds) -> dict[str, float]:
    """Statistics of one load vector c [n] (n experts, or n (layer, expert) units)."""
    mean, std = c.mean(), c.std()
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = std / mean
    return {
        "slots": c.sum(),
        "mean": mean,
        "std": std,
        "min": c.min(),
        "max": c.max(),
        "max_over_mean": c.max() / mean if mean > 0 else np.nan,
        "cv": cv,
        "balance_score": 1.0 - cv,
        "load_entropy_norm": entropy(c) / np.log(c.size) if c.size > 1 and mean > 0 else np.nan,
        "n_dead": float((c <= th.dead_max_count).sum()),
        "n_underused": float((c < th.underused_factor * mean).sum()),
        "n_overloaded": float((c > th.overloaded_factor * mean).sum()),
    }
