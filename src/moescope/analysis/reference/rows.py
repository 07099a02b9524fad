"""Turn shards into plain Python rows, as a notebook reading a JSONL trace would see them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from moescope.trace.shard import ShardData


@dataclass
class TokenRow:
    seq_id: int
    pos: int
    token_id: int
    domain: str
    entropy: float  # NaN when not recorded
    experts: list[list[int]]  # per layer, the k ids as captured (ids outside [0, E) included)
    weights: list[list[float]]  # per layer
    router: list[list[float]] | None  # per layer, E router outputs
    predicted: list[list[int]] | None  # per layer, next-layer router prediction
    document: int | None  # the document key (ShardData.document), None when the shard has none
    generated: bool = False  # produced by --generate (a decode token)


def token_rows(shards: Iterable[ShardData]) -> Iterator[TokenRow]:
    """Every token of every shard in trace order, with its routing at every layer."""
    for shard in shards:
        ids = shard.topk_ids.transpose(1, 0, 2).tolist()  # [T][L][k]
        weights = shard.topk_weights.transpose(1, 0, 2).tolist()
        router = None if shard.router_output is None else shard.router_output.transpose(1, 0, 2).tolist()
        predicted = getattr(shard, "predicted_next_ids", None)
        predicted = None if predicted is None else predicted.transpose(1, 0, 2).tolist()
        entropy = [math.nan] * shard.n_tokens if shard.output_entropy is None else shard.output_entropy.tolist()
        document = None if shard.document is None else shard.document.tolist()
        for t in range(shard.n_tokens):
            yield TokenRow(
                int(shard.seq_id[t]),
                int(shard.pos[t]),
                int(shard.token_id[t]),
                shard.domain_names[int(shard.domain[t])],
                float(entropy[t]),
                ids[t],
                weights[t],
                None if router is None else router[t],
                None if predicted is None else predicted[t],
                None if document is None else document[t],
                bool(shard.generated[t]),
            )


def real(ids: list[int], n_experts: int) -> list[int]:
    """The ids that name an expert."""
    return [e for e in ids if 0 <= e < n_experts]


def first_choice(ids: list[int], weights: list[float], n_experts: int) -> int | None:
    """The id with the largest weight (first on ties), or None when it is not an expert."""
    best = 0
    for c in range(1, len(weights)):
        if weights[c] > weights[best]:
            best = c
    return ids[best] if 0 <= ids[best] < n_experts else None


def softmax(values: list[float]) -> list[float]:
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def is_next_position(prev: TokenRow | None, row: TokenRow) -> bool:
    return prev is not None and prev.seq_id == row.seq_id and prev.pos + 1 == row.pos
