"""How many experts a cache has to hold: lookup counts per fold, phase, layer and expert, and the working set.

A lookup is one distinct real expert of one token at one layer (a repeated id counts once, as the caches
see it). From the counts:
  effective_experts   exp of the entropy of the layer's lookup shares (E when uniform, 1 when one expert);
  experts_for_Q       fewest experts whose lookups make at least Q % of the layer's (the most used first);
  working_set         mean distinct experts a layer touches in a window of `window` consecutive tokens of
                      one sequence and phase (windows cut from the phase's first token; only full windows).
Folds are cross_layer's document folds (`fold_of`), which the pinned `static` policy learns across.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.cross_layer import fold_of
from moescope.analysis.stack_distance import drop_repeats
from moescope.analysis.shard_view import ShardView

PHASES = ("prefill", "decode")
SHARES = (50, 90, 99)  # experts_for_<Q>, percent of lookups


@dataclass(frozen=True, eq=False)
class LookupCounts:
    by_fold: np.ndarray  # int64 [2 folds, 2 phases, L, E] lookups
    window_distinct: np.ndarray  # int64 [2, L] distinct experts summed over full windows
    windows: np.ndarray  # int64 [2] full windows per phase

    def __add__(self, other: LookupCounts) -> LookupCounts:
        return LookupCounts(self.by_fold + other.by_fold, self.window_distinct + other.window_distinct,
                            self.windows + other.windows)

    @property
    def by_phase(self) -> np.ndarray:
        """int64 [2, L, E]."""
        return self.by_fold.sum(axis=0)


def distinct_ids(view: ShardView) -> np.ndarray:
    """intp [L, T, k]: the token's expert ids with repeats and non-experts replaced by the sentinel E."""
    L, T, k = view.ids.shape
    return drop_repeats(view.ids.reshape(L * T, k), view.E).reshape(L, T, k)


def count_lookups(view: ShardView, window: int) -> LookupCounts:
    L, T, E = view.L, view.T, view.E
    ids = distinct_ids(view)  # [L, T, k]
    phase = view.shard.generated.astype(np.intp)  # [T]
    cell = ((fold_of(view.shard) * 2 + phase)[None, :] * L + np.arange(L)[:, None]) * (E + 1)  # [L, T]
    by_fold = np.bincount((cell[:, :, None] + ids).ravel(), minlength=4 * L * (E + 1)).reshape(2, 2, L, E + 1)[..., :E]
    # windows: segments of consecutive positions of one sequence and phase
    new_segment = ~view.has_previous.copy()
    new_segment[1:] |= phase[1:] != phase[:-1]
    starts = np.flatnonzero(new_segment)  # [S]
    segment = np.cumsum(new_segment) - 1  # [T]
    length = np.diff(np.append(starts, T))  # [S]
    offset = np.arange(T) - starts[segment]  # [T] position within the segment
    full = (offset // window + 1) * window <= length[segment]  # [T] the token's window is complete
    first_window = np.cumsum(length // window) - length // window  # [S] index of each segment's first window
    window_of = first_window[segment] + offset // window  # [T]
    n_windows = int((length // window).sum())
    key = ((window_of[None, :, None] * L + np.arange(L)[:, None, None]) * (E + 1) + ids)  # [L, T, k]
    keep = full[None, :, None] & (ids < E)
    distinct = np.unique(key[keep])  # one per (window, layer, expert)
    w_of, l_of = distinct // (E + 1) // L, distinct // (E + 1) % L
    window_phase = np.zeros(max(n_windows, 1), np.intp)
    window_phase[window_of[full]] = phase[full]
    window_distinct = np.bincount(window_phase[w_of] * L + l_of, minlength=2 * L).reshape(2, L)
    windows = np.bincount(np.repeat(phase[starts], length // window), minlength=2)
    return LookupCounts(by_fold.astype(np.int64), window_distinct.astype(np.int64), windows.astype(np.int64))


def experts_for(counts: np.ndarray, percent: int) -> np.ndarray:
    """int64 [...]: fewest experts (most used first) whose counts [..., E] reach `percent` % of the total."""
    ordered = -np.sort(-counts, axis=-1)
    covered = 100 * np.cumsum(ordered, axis=-1) >= percent * counts.sum(axis=-1, keepdims=True)
    return np.where(counts.sum(axis=-1) > 0, np.argmax(covered, axis=-1) + 1, 0)


def effective_experts(counts: np.ndarray) -> np.ndarray:
    """float64 [...]: exp of the entropy of the shares counts [..., E] / their total (NaN without lookups)."""
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / total
        entropy = -np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0).sum(axis=-1)
    return np.where(total[..., 0] > 0, np.exp(entropy), np.nan)


def coverage_frame(counts: LookupCounts, layers: tuple[int, ...], phases: tuple[str, ...], window: int) -> pd.DataFrame:
    """One row per phase and layer: lookups, effective_experts, experts_for_50/90/99, working_set."""
    frames = []
    for q, phase in enumerate(PHASES):
        if phase not in phases:
            continue
        c = counts.by_phase[q]  # [L, E]
        with np.errstate(invalid="ignore", divide="ignore"):
            working = counts.window_distinct[q] / counts.windows[q] if counts.windows[q] else np.full(len(layers), np.nan)
        frames.append(pd.DataFrame({
            "phase": phase, "layer": list(layers), "lookups": c.sum(axis=1), "effective_experts": effective_experts(c),
            **{f"experts_for_{s}": experts_for(c, s) for s in SHARES},
            "window": window, "windows": counts.windows[q], "working_set": working,
        }))
    return pd.concat(frames, ignore_index=True)


def coverage_curve(counts: LookupCounts, layers: tuple[int, ...], phases: tuple[str, ...]) -> pd.DataFrame:
    """Share of a layer's lookups its n most used experts serve, n = 1..E (the coverage curve)."""
    frames = []
    for q, phase in enumerate(PHASES):
        if phase not in phases:
            continue
        c = counts.by_phase[q]  # [L, E]
        L, E = c.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.cumsum(-np.sort(-c, axis=1), axis=1) / c.sum(axis=1, keepdims=True)
        frames.append(pd.DataFrame({"phase": phase, "layer": np.repeat(layers, E), "experts": np.tile(np.arange(1, E + 1), L),
                                    "share": share.ravel()}))
    return pd.concat(frames, ignore_index=True)
