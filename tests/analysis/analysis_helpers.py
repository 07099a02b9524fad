"""Builders and comparisons shared by the analysis tests (hand-made shards, splitting, running one analysis)."""

from __future__ import annotations

import dataclasses

import numpy as np

from moescope.analysis.runner import ANALYSES
from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard
from moescope.trace.shard import ShardData

# Awkward trace layouts: one token, seven tokens, uneven shards (sizes in tokens, one shard each).
SHARD_LAYOUTS = {"one_token": [1], "seven_tokens": [7], "uneven": [1, 7, 30, 2, 45], "256_tokens": [256]}

# Routing shapes that exercise the different code paths (k = 1, invalid ids, probabilities, no router
# outputs, E > 16 for top-m by partition, E > 64 for multi-word bitmasks).
SPECS = {
    "base": SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(1, 12), predicted_next_ids=True, vocab_size=40),
    "top1_probs": SyntheticSpec(n_layers=2, n_experts=5, top_k=1, seq_len=(1, 9), router_output="probs", vocab_size=30),
    "k3_invalid_no_router": SyntheticSpec(
        n_layers=4,
        n_experts=7,
        top_k=3,
        seq_len=(2, 10),
        router_output=None,
        output_entropy=False,
        invalid_fraction=0.1,
        vocab_size=25,
    ),
    "wide": SyntheticSpec(
        n_layers=2,
        n_experts=70,
        top_k=4,
        seq_len=(1, 16),
        predicted_next_ids=True,
        vocab_size=50,
        expert_sizes=tuple(range(10, 710, 10)),
    ),
    "fine_grained": SyntheticSpec(  # DeepSeek-V3's experts and top-k (256, top-8), few layers
        n_layers=3,
        n_experts=256,
        top_k=8,
        seq_len=(1, 40),
        predicted_next_ids=True,
        vocab_size=60,
    ),
}


def synthetic_shards(spec: SyntheticSpec, layout: list[int], seed: int = 0) -> list[ShardData]:
    return [synthetic_shard(spec, n, seed=seed, shard_index=i) for i, n in enumerate(layout)]


DOCUMENT_LAYOUTS = ("three_sequences_each", "none_in_the_shard")  # documents of several sequences; no document keys


def shards_with_documents(layout: str, seed: int) -> list[ShardData]:
    """SPECS["base"] shards (uneven sizes) whose documents hold three sequences each, or no document keys at all."""
    shards = synthetic_shards(dataclasses.replace(SPECS["base"], sequences_per_document=3), SHARD_LAYOUTS["uneven"], seed=seed)
    return [dataclasses.replace(s, document=None) for s in shards] if layout == "none_in_the_shard" else shards


def document_in_fold(f: int, start: int = 0) -> int:
    """The smallest document key >= start in fold f (by the reference's own definition of the fold)."""
    from types import SimpleNamespace

    from moescope.analysis.reference.cross_layer import fold

    return next(d for d in range(start, start + 1000) if fold(SimpleNamespace(seq_id=0, document=d)) == f)


def make_shard(
    ids,
    weights=None,
    *,
    seq_id=None,
    pos=None,
    token_id=None,
    domain=None,
    domain_names=("code",),
    router_output=None,
    output_entropy=None,
    predicted_next_ids=None,
    document=None,
) -> ShardData:
    """A shard from nested lists: ids [L][T][k]; by default one sequence, weights descending by column."""
    ids = np.asarray(ids, np.int16)
    L, T, k = ids.shape
    if weights is None:
        weights = np.broadcast_to(np.linspace(1.0, 0.5, k, dtype=np.float32), (L, T, k))
    seq_id = np.zeros(T, np.int32) if seq_id is None else np.asarray(seq_id, np.int32)
    if pos is None:
        pos = np.zeros(T, np.int32)
        for t in range(1, T):
            pos[t] = pos[t - 1] + 1 if seq_id[t] == seq_id[t - 1] else 0
    return ShardData(
        layers=np.arange(L, dtype=np.int16),
        seq_id=seq_id,
        pos=np.asarray(pos, np.int32),
        token_id=np.arange(T, dtype=np.int32) if token_id is None else np.asarray(token_id, np.int32),
        generated=np.zeros(T, bool),
        domain=np.zeros(T, np.int16) if domain is None else np.asarray(domain, np.int16),
        domain_names=tuple(domain_names),
        topk_ids=ids,
        topk_weights=np.ascontiguousarray(weights, dtype=np.float32),
        router_output=None if router_output is None else np.asarray(router_output, np.float32),
        output_entropy=None if output_entropy is None else np.asarray(output_entropy, np.float32),
        predicted_next_ids=None if predicted_next_ids is None else np.asarray(predicted_next_ids, np.int16),
        document=None if document is None else np.asarray(document, np.int64),
    )


def _take(shard: ShardData, lo: int, hi: int) -> ShardData:
    def cut(x, axis):
        if x is None:
            return None
        return x[lo:hi] if axis == 0 else x[:, lo:hi]

    return ShardData(
        layers=shard.layers,
        seq_id=cut(shard.seq_id, 0),
        pos=cut(shard.pos, 0),
        token_id=cut(shard.token_id, 0),
        generated=cut(shard.generated, 0),
        domain=cut(shard.domain, 0),
        domain_names=shard.domain_names,
        topk_ids=cut(shard.topk_ids, 1),
        topk_weights=cut(shard.topk_weights, 1),
        router_output=cut(shard.router_output, 1),
        output_entropy=cut(shard.output_entropy, 0),
        predicted_next_ids=cut(shard.predicted_next_ids, 1),
        document=cut(shard.document, 0),
    )


def split_at_sequences(shard: ShardData, n_parts: int) -> list[ShardData]:
    """Split a shard into up to n_parts shards of whole sequences (uneven sizes)."""
    starts = np.flatnonzero(np.concatenate([[True], shard.seq_id[1:] != shard.seq_id[:-1]]))
    chosen = sorted(set(starts[np.linspace(0, starts.size - 1, n_parts).astype(int)]) | {0})
    bounds = [*chosen, shard.n_tokens]
    return [_take(shard, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def concat(shards: list[ShardData]) -> ShardData:
    first = shards[0]

    def cat(name, axis):
        parts = [getattr(s, name) for s in shards]
        return None if parts[0] is None else np.concatenate(parts, axis=axis)

    return ShardData(
        layers=first.layers,
        seq_id=cat("seq_id", 0),
        pos=cat("pos", 0),
        token_id=cat("token_id", 0),
        generated=cat("generated", 0),
        domain=cat("domain", 0),
        domain_names=first.domain_names,
        topk_ids=cat("topk_ids", 1),
        topk_weights=cat("topk_weights", 1),
        router_output=cat("router_output", 1),
        output_entropy=cat("output_entropy", 0),
        predicted_next_ids=cat("predicted_next_ids", 1),
        document=cat("document", 0),
    )


def run_one(name: str, shards, ctx):
    """accumulate every shard, merge left to right, finalize: one analysis without the runner."""
    module = ANALYSES[name]
    state = None
    for shard in shards:
        part = module.accumulate(shard, ctx)
        state = part if state is None else module.merge(state, part)
    return module.finalize(state, ctx)
