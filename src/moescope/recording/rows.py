"""From what the hooks recorded for one batch to token-aligned arrays, and from those to Arrow tables.

Experts modules see the batch flattened to [B*T, H] (row-major), so row b*T + t is token (b, t);
padding rows are dropped here, using the attention mask, and never reach the trace.
"""

from __future__ import annotations


import numpy as np
import torch

from moescope.recording.batches import Batch
from moescope.recording.hooks import LayerChunks
from moescope.trace.block import TokenBlock
from moescope.errors import MoescopeError




def _stack(chunks: list[torch.Tensor], rows: int, what: str, layer: int) -> torch.Tensor:
    if not chunks:
        raise MoescopeError(
            f"MoE layer {layer} did not run on this batch (e.g. a vision-only expert block on text input); "
            "capture its text layers only with --router-pattern, or give input that reaches every MoE block"
        )
    tensor = torch.cat(chunks) if len(chunks) != 1 else chunks[0]
    if tensor.shape[0] != rows:
        raise MoescopeError(
            f"MoE layer {layer} recorded {tensor.shape[0]} {what} rows for a batch of {rows} token slots; this model "
            "does not route every token exactly once per forward pass (capacity limits?) and cannot be captured"
        )
    return tensor


def _layers(recorded: list[LayerChunks], field: str, rows: int, keep: np.ndarray) -> np.ndarray:
    """[L, n, x]: one field of every layer, padding rows dropped (one NumPy gather, not one per layer)."""
    stacked = torch.stack([_stack(getattr(c, field), rows, field, i) for i, c in enumerate(recorded)])
    return stacked.numpy()[:, keep]


def block_from_forward(batch: Batch, recorded: list[LayerChunks], output_entropy: torch.Tensor | None) -> TokenBlock:
    """One forward pass over `batch` (no generation): drop padding, keep (seq, pos) order."""
    keep = batch.attention_mask.reshape(-1).bool().numpy()  # [B*T]
    rows, n = keep.shape[0], int(keep.sum())
    has = lambda field: bool(recorded) and bool(getattr(recorded[0], field))
    predicted = None
    if has("predicted_next"):  # the last layer has no next layer: -1
        ahead = _layers(recorded[:-1], "predicted_next", rows, keep)
        predicted = np.concatenate([ahead, np.full_like(ahead[:1], -1)])
    seq_ids = np.repeat(np.array([s.seq_id for s in batch.sequences], dtype=np.int32), batch.input_ids.shape[1])
    entropy = np.full(n, np.nan, np.float32) if output_entropy is None else output_entropy.reshape(-1).float().numpy()[keep]
    return TokenBlock(
        seq_id=seq_ids[keep],
        pos=batch.pos.reshape(-1).numpy()[keep].astype(np.int32),
        token_id=batch.input_ids.reshape(-1).numpy()[keep].astype(np.int32),
        generated=np.zeros(n, dtype=bool),
        output_entropy=entropy,
        topk_ids=_layers(recorded, "ids", rows, keep),
        topk_weights=_layers(recorded, "weights", rows, keep),
        router_output=_layers(recorded, "router_output", rows, keep) if has("router_output") else None,
        predicted_next=predicted,
        expert_norms=_layers(recorded, "expert_norms", rows, keep) if has("expert_norms") else None,
    )


