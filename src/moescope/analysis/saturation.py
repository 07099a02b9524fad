"""Router saturation: how much of a checkpoint's routing already equals the final checkpoint's, on the same tokens.

Per MoE layer, over the tokens both traces hold:
    top-1 agreement   the first choice (the largest gate weight, ShardView.first_choice) is the same expert
    top-k overlap     |final's k experts ∩ this checkpoint's k experts| / k  (non-compute choices count as none)
OLMoE measured this across pre-training checkpoints: routing saturates (stops changing) early. Shards are
compared pairwise (`accumulate(final, other)`), counts add up (`merge`), `finalize` gives the fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData


@dataclass(frozen=True, eq=False)
class SaturationState:
    tokens: int
    top1_same: np.ndarray  # int64 [L] tokens whose first choice agrees
    overlap: np.ndarray  # int64 [L] shared experts summed over tokens


def accumulate(final: ShardData | ShardView, other: ShardData | ShardView, ctx: AnalysisContext) -> SaturationState:
    a, b = ShardView.of(final, ctx), ShardView.of(other, ctx)
    if not (np.array_equal(a.shard.seq_id, b.shard.seq_id) and np.array_equal(a.shard.pos, b.shard.pos)
            and np.array_equal(a.shard.token_id, b.shard.token_id)):
        raise MoescopeError("the two traces do not hold the same tokens in the same order; capture both on the same data")
    top1 = (a.first_choice == b.first_choice) & (a.first_choice < a.E)  # [L, T]
    real = a.ids < a.E  # [L, T, k]
    shared = ((a.ids[..., :, None] == b.ids[..., None, :]) & real[..., :, None]).any(-1)  # [L, T, k]: a's expert in b's set
    return SaturationState(a.T, top1.sum(axis=1, dtype=np.int64), shared.sum(axis=(1, 2), dtype=np.int64))


def merge(x: SaturationState, y: SaturationState) -> SaturationState:
    return SaturationState(x.tokens + y.tokens, x.top1_same + y.top1_same, x.overlap + y.overlap)


def finalize(state: SaturationState, ctx: AnalysisContext) -> pd.DataFrame:
    """[layer, tokens, top1_agreement, topk_overlap]: one row per MoE layer, then layer -1 (all layers pooled)."""
    n = max(state.tokens, 1)
    layers = np.arange(len(state.top1_same))
    top1 = state.top1_same / n
    overlap = state.overlap / (n * ctx.top_k)
    return pd.DataFrame({"layer": [*layers, -1], "tokens": state.tokens,
                         "top1_agreement": [*top1, top1.mean()], "topk_overlap": [*overlap, overlap.mean()]})
