"""Cache-aware lossy routing: the knobs engines ship to trade quality for cache hits, replayed with an LRU cache
per layer (cold at each sequence start) whose contents decide the routing.

Knobs (`--lossy drop-cold:F,topk:K,rerank:B`; "lru" below is the lossless baseline):
  drop-cold:F  a non-resident expert whose renormalised weight (its share of the token's top-k weight) is
               below F / k is skipped; the kept ones are renormalised to the original total. When every expert
               of a token would be skipped, the heaviest is kept (a token is never sent nowhere).
  topk:K       only the K heaviest experts are used (ties: the earlier slot), renormalised likewise.
  rerank:B     B is added to the router's selection score of every resident expert before top-k (the scores
               the model selects on: logits, or probabilities, plus any correction bias); needs router output.
Per token and layer, in order of positions: the routing is decided from the cache as it is, the used experts
are looked up (hits decided before any insertion), misses fetched and inserted, evicting the least recently
used experts not used by this token (an earlier slot counts as more recent, as simulate/lru.py).
Discarded router weight: the share of the token's original top-k weight on experts it no longer uses.

`route_along_positions` is the one implementation: the offline replay over a trace (`simulate_lossy`) and the
model run (`moescope offload --lossy --model M`, through `moescope.intervene(route=...)`) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.stack_distance import drop_repeats
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError

KNOBS = ("lru", "drop-cold", "topk", "rerank")


@dataclass(frozen=True)
class Knob:
    kind: str
    value: float = 0.0

    @property
    def label(self) -> str:
        return "lru" if self.kind == "lru" else f"{self.kind}:{self.value:g}"

    def check(self, top_k: int, has_router: bool) -> None:
        if self.kind == "drop-cold" and not self.value > 0:
            raise MoescopeError(f"--lossy {self.label}: F must be positive (a threshold F / k on renormalised weights)")
        if self.kind == "topk" and not (self.value == int(self.value) and 1 <= self.value < top_k):
            raise MoescopeError(f"--lossy {self.label}: K must be a whole number of experts from 1 to {top_k - 1} "
                                f"(the model routes to {top_k})")
        if self.kind == "rerank" and not has_router:
            raise MoescopeError(f"--lossy {self.label} needs the router's scores: capture with --save-logits")


def parse_knobs(text: str) -> tuple[Knob, ...]:
    """'drop-cold:0.5,topk:1,rerank:2' -> knobs, the lossless LRU baseline first."""
    knobs = [Knob("lru")]
    for part in (p.strip() for p in text.split(",") if p.strip()):
        kind, _, value = part.partition(":")
        if kind not in KNOBS[1:] or not value:
            raise MoescopeError(f"--lossy: unknown knob {part!r}; give drop-cold:F, topk:K or rerank:B, comma-separated")
        try:
            number = float(value)
        except ValueError:
            raise MoescopeError(f"--lossy: {part!r} needs a number after the colon") from None
        if not np.isfinite(number):
            raise MoescopeError(f"--lossy: {part!r} needs a finite number")
        knobs.append(Knob(kind, number))
    if len(knobs) == 1:
        raise MoescopeError("--lossy names no knob; give drop-cold:F, topk:K or rerank:B, comma-separated")
    return tuple(dict.fromkeys(knobs))


@dataclass(frozen=True, eq=False)
class CacheRouting:
    ids: np.ndarray  # intp [R, P, k] experts of each slot (rerank: the re-ranked ones; sentinel E: none)
    used: np.ndarray  # bool [R, P, k] slots computed
    hit: np.ndarray  # bool [R, P, k] used slots whose expert was resident
    discarded: np.ndarray  # float64 [R, P] share of the original top-k weight no longer used


def route_along_positions(ids: np.ndarray, weights: np.ndarray, valid: np.ndarray, knob: Knob, capacity: int,
                          n_experts: int, selection: np.ndarray | None = None) -> CacheRouting:
    """Stream r (a sequence at one layer) step p: ids intp [R, P, k] (distinct per token; E: none), weights
    [R, P, k], valid bool [R, P] (the position exists), selection float [R, P, E] (rerank only)."""
    R, P, k = ids.shape
    E = n_experts
    stamp = np.full((R, E + 1), -1, np.int64)  # last touch of each cached expert; column E (no expert) stays -1
    rows = np.arange(R)[:, None]
    out_ids, used_all = ids.copy(), np.zeros((R, P, k), bool)
    hit_all, discarded = np.zeros((R, P, k), bool), np.zeros((R, P))
    recency = (k - 1 - np.arange(k))[None, :]  # an earlier slot is more recent
    for p in range(P):  # one position of every stream at once
        cur, use, discarded[:, p] = _decide(knob, ids[:, p], weights[:, p], valid[:, p], stamp,
                                            None if selection is None else selection[:, p], E)
        resident = (stamp[rows, np.where(use, cur, E)] >= 0) & use
        _evict(stamp, cur, resident, (use & ~resident).sum(axis=1), capacity, E)
        stamp[rows, np.where(use, cur, E)] = np.where(use, p * k + recency, -1)
        stamp[:, E] = -1
        out_ids[:, p], used_all[:, p], hit_all[:, p] = cur, use, resident
    return CacheRouting(out_ids, used_all, hit_all, discarded)


def _decide(knob: Knob, cur: np.ndarray, weights: np.ndarray, valid: np.ndarray, stamp: np.ndarray,
            selection: np.ndarray | None, E: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [R, k], used bool [R, k], discarded weight share [R]) of one position, from the cache as it is."""
    R, k = cur.shape
    real = (cur < E) & valid[:, None]
    w = np.where(real, weights, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(real, w / w.sum(axis=1, keepdims=True), 0.0)  # [R, k] renormalised weights
    if knob.kind == "rerank":
        scores = selection + knob.value * (stamp[:, :E] >= 0)  # [R, E]
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        chosen = np.where(np.arange(k)[None, :] < real.sum(axis=1, keepdims=True), ranked, E)
        kept = (cur[:, :, None] == chosen[:, None, :]).any(axis=2)  # [R, k] original slots still used
        return chosen, chosen < E, np.where(real & ~kept, share, 0.0).sum(axis=1)
    if knob.kind == "drop-cold":
        resident = stamp[np.arange(R)[:, None], cur] >= 0
        cold = real & ~resident & (share < knob.value / k)
        everything = (cold == real).all(axis=1) & real.any(axis=1)
        heaviest = np.argmax(np.where(real, share, -1.0), axis=1)
        cold[everything, heaviest[everything]] = False  # never send a token nowhere
        use = real & ~cold
    elif knob.kind == "topk":
        best = np.argsort(-np.where(real, share, -1.0), axis=1, kind="stable")[:, : int(knob.value)]
        use = np.zeros_like(real)
        np.put_along_axis(use, best, True, axis=1)
        use &= real
    else:
        use = real
    return cur, use, np.where(real & ~use, share, 0.0).sum(axis=1)


def _evict(stamp: np.ndarray, cur: np.ndarray, resident: np.ndarray, misses: np.ndarray, capacity: int, E: int) -> None:
    """Make room for `misses` [R] new experts: drop the least recently used ones not used by this token."""
    over = (stamp[:, :E] >= 0).sum(axis=1) + misses - capacity  # [R] entries to evict
    need = np.flatnonzero(over > 0)
    if not need.size:
        return
    latest = np.iinfo(np.int64).max
    candidates = np.where(stamp[need] >= 0, stamp[need], latest)  # [n, E + 1]; not cached: never chosen
    candidates[np.arange(len(need))[:, None], np.where(resident[need], cur[need], E)] = latest  # used by this token
    most = int(over[need].max())
    oldest = np.argsort(candidates[:, :E], axis=1, kind="stable")[:, :most]
    evict = np.arange(most)[None, :] < over[need, None]
    stamp[np.repeat(need[:, None], most, axis=1)[evict], oldest[evict]] = -1


QUANTITIES = ("lookups", "used", "hits", "token_layers", "discarded")


def _shard_streams(view: ShardView, layer: int):
    """One layer's (ids [R, P, k], weights, valid [R, P], phase [R, P], token index [R, P] (-1: none)) of a
    shard, a stream per run of consecutive positions."""
    E, T = view.E, view.T
    starts = np.flatnonzero(~view.has_previous)
    lengths = np.diff(np.append(starts, T))
    P = int(lengths.max(initial=0))
    token = starts[:, None] + np.arange(P)[None, :]
    valid = np.arange(P)[None, :] < lengths[:, None]
    token = np.where(valid, token, -1)
    ids = drop_repeats(view.ids[layer], E)  # [T, k]
    at = np.maximum(token, 0)
    out_ids = np.where(valid[:, :, None], ids[at], E)
    weights = np.where(valid[:, :, None], view.shard.topk_weights[layer].astype(np.float64)[at], 0.0)
    phase = np.where(valid, view.shard.generated.astype(np.intp)[at], 0)
    return out_ids, weights, valid, phase, token


def selection_scores(view: ShardView, layer: int) -> np.ndarray:
    """float64 [T, E]: the trace's router output at `layer` as selection scores (log-probabilities: top-k of
    them is top-k of the logits)."""
    out = view.shard.router_output
    if out is None:
        raise MoescopeError("rerank needs router output in the trace (capture with --save-logits)")
    x = out[layer, :, : view.E].astype(np.float64)  # [T, E]
    if view.ctx.router_output_kind == "probs":
        with np.errstate(divide="ignore"):
            return np.log(x)
    return x - x.max(axis=1, keepdims=True)


def lossy_counts(view: ShardView, knobs: tuple[Knob, ...], capacities: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(counts float64 [K, C, 2, L, 5] QUANTITIES per phase and layer, fetched int64 [K, C, 2, L, E])."""
    L, E = view.L, view.E
    counts = np.zeros((len(knobs), len(capacities), 2, L, len(QUANTITIES)))
    fetched = np.zeros((len(knobs), len(capacities), 2, L, E), np.int64)
    for layer in range(L):
        ids, weights, valid, phase, token = _shard_streams(view, layer)
        selection = None
        if any(k.kind == "rerank" for k in knobs):
            scores = selection_scores(view, layer)
            selection = np.where(valid[:, :, None], scores[np.maximum(token, 0)], 0.0)
        cell = phase[valid]  # [n] phase of each valid position
        for a, knob in enumerate(knobs):
            for c, capacity in enumerate(capacities):
                r = route_along_positions(ids, weights, valid, knob, capacity, E, selection)
                values = np.stack([(ids < E).sum(axis=2)[valid], r.used.sum(axis=2)[valid], r.hit.sum(axis=2)[valid],
                                   np.ones(int(valid.sum())), r.discarded[valid]], axis=1)  # [n, 5]
                for q in (0, 1):
                    counts[a, c, q, layer] = values[cell == q].sum(axis=0)
                miss = r.used & ~r.hit
                expert_phase = np.broadcast_to(phase[:, :, None], miss.shape)[miss] * E + r.ids[miss]
                fetched[a, c, :, layer] = np.bincount(expert_phase, minlength=2 * E).reshape(2, E)
    return counts, fetched


def simulate_lossy(shards, ctx: AnalysisContext, knobs: tuple[Knob, ...], capacities: tuple[int, ...]):
    counts = fetched = None
    for shard in shards():
        c, f = lossy_counts(ShardView(shard, ctx), knobs, capacities)
        counts, fetched = (c, f) if counts is None else (counts + c, fetched + f)
    return counts, fetched


def lossy_frame(counts: np.ndarray, fetched: np.ndarray, expert_bytes: np.ndarray, knobs: tuple[Knob, ...],
                capacities: tuple[int, ...], layers: tuple[int, ...], phases: tuple[str, ...], source: str) -> pd.DataFrame:
    """One row per knob, capacity, phase and layer (then all layers): lookups (the original routing's), used,
    hits, hit_rate (hits / used), experts_fetched, bytes_moved, weight_discarded (mean per token and layer)."""
    frames = []
    moved_bytes = (fetched * expert_bytes).sum(axis=-1)  # [K, C, 2, L]
    for a, knob in enumerate(knobs):
        for c, capacity in enumerate(capacities):
            for q, phase in enumerate(("prefill", "decode")):
                if phase not in phases:
                    continue
                x = counts[a, c, q]  # [L, 5]
                x = np.vstack([x, x.sum(axis=0)])
                moved = np.append(fetched[a, c, q].sum(axis=1), fetched[a, c, q].sum())
                nbytes = np.append(moved_bytes[a, c, q], moved_bytes[a, c, q].sum())
                with np.errstate(invalid="ignore", divide="ignore"):
                    frames.append(pd.DataFrame({
                        "source": source, "knob": knob.label, "capacity": capacity, "phase": phase,
                        "layer": [*layers, OVERALL], "lookups": x[:, 0].astype(np.int64), "used": x[:, 1].astype(np.int64),
                        "hits": x[:, 2].astype(np.int64), "hit_rate": x[:, 2] / x[:, 1], "experts_fetched": moved,
                        "bytes_moved": nbytes, "weight_discarded": x[:, 4] / x[:, 3],
                    }))
    return pd.concat(frames, ignore_index=True)
