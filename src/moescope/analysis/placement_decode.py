"""Decode batches: how many distinct experts a batch of B concurrent decode tokens touches per layer, for
batches drawn at random and batches grouped by the requests' prefill routing (ELDR, arXiv 2607.00466: decode
cost follows the distinct experts a batch reads).

A request is a sequence of the trace with generated tokens; its decode step j is its j-th generated token.
Requests are kept in an order and, at every step, the requests still generating are cut in that order into
batches of B (the last one may be smaller; continuous batching keeps batches full as requests finish).
  grouped  a request's signature is, per layer, the `k` experts its prompt tokens chose most (ties: the lower
           id); similarity = (layer, expert) pairs two signatures share. Greedily: the first request not yet
           grouped, then the B - 1 ungrouped ones most similar to it (ties: the earlier request), and again.
  random   the expectation over uniformly random orders, exactly: a batch of b of the N requests alive at a
           step holds expert e unless all b avoid it: 1 - C(N - n_e, b) / C(N, b), n_e the alive requests
           choosing e at that step (a batch of a random order is a uniformly random subset).
Per layer: mean distinct experts per batch = distinct experts summed over batches and steps / batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import gammaln

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.kernels import expert_counts
from moescope.analysis.shard_view import ShardView
from moescope.trace.shard import ShardData


@dataclass(frozen=True, eq=False)
class DecodeRequests:
    signature: np.ndarray  # bool [R, L, E]: the k experts each request's prompt chose most, per layer
    ids: np.ndarray  # intp [L, D, k]: decode tokens' experts (sentinel E: none), requests in order, steps in order
    request: np.ndarray  # intp [D] the request of each decode token
    step: np.ndarray  # intp [D] its decode step


def collect_requests(shards: Callable[[], Iterable[ShardData]], ctx: AnalysisContext) -> DecodeRequests:
    """Every request with generated tokens, in trace order (one pass; shards hold whole sequences)."""
    L, E, k = ctx.n_layers, ctx.n_experts, ctx.top_k
    signatures, ids, requests, steps, base = [], [], [], [], 0
    for shard in shards():
        view = ShardView(shard, ctx)
        generated = shard.generated.astype(bool)
        seq = np.cumsum(~view.has_previous) - 1  # [T] sequence index within the shard
        has_decode = np.bincount(seq, weights=generated, minlength=int(seq[-1]) + 1) > 0 if view.T else np.zeros(0, bool)
        number = np.cumsum(has_decode) - 1  # request index of each sequence (valid where has_decode)
        n = int(has_decode.sum())
        if not n:
            continue
        prompt = ~generated & has_decode[seq]
        counts = expert_counts(view.ids[:, prompt], E, group=number[seq][prompt], n_groups=n)  # [n, L, E] per request
        top = np.argsort(-counts, axis=2, kind="stable")[:, :, :k]
        sig = np.zeros((n, L, E), bool)
        np.put_along_axis(sig, top, np.take_along_axis(counts, top, axis=2) > 0, axis=2)
        signatures.append(sig)
        decode_seq = seq[generated]  # [D] generated tokens in order: sequence by sequence, position by position
        order = np.arange(len(decode_seq))
        new = np.append(True, decode_seq[1:] != decode_seq[:-1])
        steps.append(order - np.maximum.accumulate(np.where(new, order, 0)))
        requests.append(base + number[decode_seq])
        ids.append(view.ids[:, generated])
        base += n
    if not signatures:
        return DecodeRequests(np.zeros((0, L, E), bool), np.zeros((L, 0, k), np.intp), np.zeros(0, np.intp), np.zeros(0, np.intp))
    return DecodeRequests(np.concatenate(signatures), np.concatenate(ids, axis=1), np.concatenate(requests),
                          np.concatenate(steps))


def grouped_order(signature: np.ndarray, batch: int) -> np.ndarray:
    """intp [R]: requests in groups of `batch`: the first ungrouped request, then the batch - 1 ungrouped ones
    sharing the most (layer, expert) signature pairs with it (ties: the earlier request)."""
    R = len(signature)
    flat = signature.reshape(R, -1).astype(np.float32)
    shared = (flat @ flat.T).astype(np.int64)  # [R, R] exact: at most L x k per pair
    left = np.ones(R, bool)
    order = []
    while left.any():
        seed = int(np.argmax(left))
        left[seed] = False
        candidates = np.flatnonzero(left)
        chosen = candidates[np.argsort(-shared[seed, candidates], kind="stable")[: batch - 1]]
        left[chosen] = False
        order += [seed, *chosen.tolist()]
    return np.asarray(order, np.intp)


def distinct_per_batch(requests: DecodeRequests, order: np.ndarray, batch: int, n_experts: int) -> tuple[np.ndarray, int]:
    """(distinct int64 [L] summed over batches and steps, batches): requests alive at each step, in `order`,
    cut into batches of `batch`."""
    L, D, k = requests.ids.shape
    E = n_experts
    if not D:
        return np.zeros(L, np.int64), 0
    rank_of = np.empty(len(order), np.intp)
    rank_of[order] = np.arange(len(order))
    steps = int(requests.step.max()) + 1
    by_step = np.lexsort((rank_of[requests.request], requests.step))  # decode tokens by step, then in order
    step = requests.step[by_step]
    alive = np.bincount(step, minlength=steps)  # [P] requests generating at each step
    index = np.arange(D) - (np.cumsum(alive) - alive)[step]  # position among the step's alive requests
    per_step = -(-alive // batch)  # [P] batches per step
    chunk = (np.cumsum(per_step) - per_step)[step] + index // batch  # [D] global batch index
    key = ((chunk[None, :, None] * L + np.arange(L)[:, None, None]) * (E + 1)) + requests.ids[:, by_step]  # [L, D, k]
    distinct = np.unique(key[requests.ids[:, by_step] < E])
    return np.bincount(distinct // (E + 1) % L, minlength=L).astype(np.int64), int(per_step.sum())


def expected_random_distinct(requests: DecodeRequests, batch: int, n_experts: int) -> tuple[np.ndarray, int]:
    """(expected distinct float64 [L] summed over batches and steps, batches) over uniformly random orders."""
    L, D, k = requests.ids.shape
    E = n_experts
    if not D:
        return np.zeros(L), 0
    steps = int(requests.step.max()) + 1
    alive = np.bincount(requests.step, minlength=steps)  # [P]
    # n[p, l, e]: requests choosing e at layer l at step p (a token's ids are distinct here)
    key = ((requests.step[None, :, None] * L + np.arange(L)[:, None, None]) * (E + 1)) + requests.ids  # [L, D, k]
    n = np.bincount(key.ravel(), minlength=steps * L * (E + 1)).reshape(steps, L, E + 1)[:, :, :E].astype(np.float64)
    N = alive[:, None, None].astype(np.float64)

    def touched(b: np.ndarray) -> np.ndarray:  # [P] batch sizes -> [P, L] expected distinct experts of one batch
        b = b[:, None, None].astype(np.float64)
        free = N - n  # alive requests not choosing e
        ok = (free >= b) & (N >= b)
        miss = np.where(ok, np.exp(gammaln(free + 1) - gammaln(np.where(ok, free - b, 0) + 1) - gammaln(N + 1)
                                   + gammaln(np.where(ok, N - b, 0) + 1)), 0.0)  # C(N - n, b) / C(N, b)
        return np.where(b > 0, 1.0 - miss, 0.0).sum(axis=2)

    full, rest = alive // batch, alive % batch
    total = full[:, None] * touched(np.full(steps, batch)) + touched(rest)  # [P, L]
    return total.sum(axis=0), int((-(-alive // batch)).sum())


def decode_batch_frame(requests: DecodeRequests, batch: int, layers: tuple[int, ...], n_experts: int) -> pd.DataFrame:
    """batching (random / grouped), batch_size, layer, batches, mean_distinct_experts (per layer, then pooled)."""
    frames = []
    if requests.ids.shape[1] and requests.ids.shape[2] > 1:
        requests = _distinct_ids(requests, n_experts)
    for batching in ("random", "grouped"):
        if batching == "random":
            total, batches = expected_random_distinct(requests, batch, n_experts)
        else:
            total, batches = distinct_per_batch(requests, grouped_order(requests.signature, batch), batch, n_experts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.append(total, total.mean()) / batches
        frames.append(pd.DataFrame({"batching": batching, "batch_size": batch, "layer": [*layers, OVERALL],
                                    "requests": len(requests.signature), "batches": batches,
                                    "mean_distinct_experts": mean}))
    return pd.concat(frames, ignore_index=True)


def _distinct_ids(requests: DecodeRequests, n_experts: int) -> DecodeRequests:
    from moescope.analysis.stack_distance import drop_repeats

    L, D, k = requests.ids.shape
    ids = drop_repeats(requests.ids.reshape(L * D, k), n_experts).reshape(L, D, k)
    return DecodeRequests(requests.signature, ids, requests.request, requests.step)

