"""Expert lookups laid out for cache simulation: one stream per cache, step by step, ragged.

A cache starts empty at each sequence start (as in analysis/expert_cache.py), so every (sequence, layer)
pair is an independent stream when each layer has its own cache ("layer" scope), and every sequence is
one stream over keys (layer, expert) when all layers share one budget ("global" scope; steps go layer by
layer, token by token). Streams are ordered longest first, so the streams still running at step p are
a prefix 0..n_active[p]-1, and step p's events are rows offsets[p]..offsets[p+1]-1 of the flat arrays:

    lookups  [M, k]  keys a token looks up at that step (n_keys = not a lookup)
    prefetch [M, kp] keys a predictor inserts just before (or None)
    phase    [M]     0 prefill (a prompt token), 1 decode (a generated token)
    layer    [M]     MoE layer of the step
Row m of step p belongs to stream m - offsets[p]. Repeated ids within a batch count once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moescope.analysis.stack_distance import drop_repeats
from moescope.analysis.shard_view import ShardView

SCOPES = ("layer", "global")


@dataclass(frozen=True, eq=False)
class Streams:
    lookups: np.ndarray  # int32 [M, k]
    prefetch: np.ndarray | None  # int32 [M, kp]
    phase: np.ndarray  # int8 [M]
    layer: np.ndarray  # int16 [M]
    offsets: np.ndarray  # int64 [P + 1]
    n_streams: int
    n_keys: int

    @property
    def n_steps(self) -> int:
        return len(self.offsets) - 1

    def step(self, p: int) -> slice:
        return slice(int(self.offsets[p]), int(self.offsets[p + 1]))

    def step_of_row(self) -> np.ndarray:
        """int64 [M]: the step each row belongs to."""
        return np.repeat(np.arange(self.n_steps), np.diff(self.offsets))

    def stream_of_row(self) -> np.ndarray:
        """int64 [M]: the stream each row belongs to."""
        return np.arange(len(self.phase)) - np.repeat(self.offsets[:-1], np.diff(self.offsets))


def build_streams(view: ShardView, scope: str, prefetch: np.ndarray | None = None) -> Streams:
    """Streams of one shard. prefetch: intp [L, T, kp] experts inserted into layer l's cache before token t
    looks up its experts there (sentinel E: nothing), or None."""
    L, T, E = view.L, view.T, view.E
    starts = np.flatnonzero(~view.has_previous)  # [R] runs of consecutive positions (cold cache at each)
    lengths = np.diff(np.append(starts, T))
    by_length = np.argsort(-lengths, kind="stable")  # longest first
    rank = np.empty_like(by_length)
    rank[by_length] = np.arange(len(by_length))
    run = np.repeat(np.arange(len(starts)), lengths)  # [T]
    position = np.arange(T) - starts[run]  # [T] step of the token within its run
    running = np.bincount(lengths, minlength=int(lengths.max(initial=0)) + 1)[::-1].cumsum()[::-1][1:]  # [Tmax]
    layer = np.arange(L)[:, None]  # [L, 1]
    if scope == "layer":  # stream = (run, layer), step = position
        width = L * running  # [P] streams per step
        step = np.broadcast_to(position, (L, T))
        stream = rank[run][None, :] * L + layer  # [L, T]
        offset_keys, n_streams, n_keys = 0, len(starts) * L, E
    elif scope == "global":  # stream = run, step = position * L + layer
        width = np.repeat(running, L)
        step = position[None, :] * L + layer
        stream = np.broadcast_to(rank[run], (L, T))
        offset_keys, n_streams, n_keys = (np.arange(L, dtype=np.int32) * E)[:, None, None], len(starts), L * E
    else:
        raise ValueError(f"unknown scope {scope!r}")
    offsets = np.concatenate([[0], np.cumsum(width)])
    row = (offsets[step] + stream).ravel()  # [L*T] flat row of each (layer, token)
    M = int(offsets[-1])

    def lay_out(ids: np.ndarray) -> np.ndarray:  # [L, T, w] expert ids (E: none) -> [M, w] keys
        small = np.where(ids < E, ids, E).astype(np.int16 if E < 2**15 else np.int32)
        small = drop_repeats(small.reshape(L * T, -1), E).reshape(ids.shape)  # dedupe in the narrow type
        out = np.empty((M, ids.shape[2]), np.int32)
        out[row] = np.where(small < E, small + offset_keys, n_keys).reshape(L * T, -1)
        return out

    phase = np.zeros(M, np.int8)
    phase[row] = np.broadcast_to(view.shard.generated, (L, T)).ravel()
    layers = np.zeros(M, np.int16)
    layers[row] = np.broadcast_to(layer, (L, T)).ravel()
    raw = view.shard.topk_ids
    ids = np.where(raw >= 0, raw, E)  # [L, T, k]; ids >= E are no expert either
    return Streams(lay_out(ids), None if prefetch is None else lay_out(prefetch), phase, layers, offsets,
                   n_streams, n_keys)
