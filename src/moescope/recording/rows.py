"""From what the hooks recorded for one batch to token-aligned arrays, and from those to Arrow tables.

Experts modules see the batch flattened to [B*T, H] (row-major), so row b*T + t is token (b, t);
padding rows are dropped here, using the attention mask, and never reach the trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from moescope.recording.batches import Batch
from moescope.recording.hooks import LayerChunks
from moescope.errors import MoescopeError
from moescope.trace.schema import SEQUENCES_SCHEMA, TOKENS_SCHEMA, routing_schema
from moescope.trace.slots import order_slots


@dataclass
class TokenBlock:
    """Routing of a group of tokens, ordered by (seq_id, pos)."""

    seq_id: np.ndarray  # int32 [T]
    pos: np.ndarray  # int32 [T]
    token_id: np.ndarray  # int32 [T]
    generated: np.ndarray  # bool  [T]
    output_entropy: np.ndarray  # float32 [T] (NaN when not recorded)
    topk_ids: np.ndarray  # int16 [L, T, k]
    topk_weights: np.ndarray  # float16|float32 [L, T, k]
    router_output: np.ndarray | None  # float16|float32 [L, T, R] (R: routed experts + non-compute choices)
    predicted_next: np.ndarray | None = None  # int16 [L, T, k]: layer l+1's router on layer l's input; -1 on the last layer
    expert_norms: np.ndarray | None = None  # float32 [L, T, k]: ||output|| of each chosen expert alone

    @property
    def n_tokens(self) -> int:
        return len(self.seq_id)


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


def concat_blocks(blocks: list[TokenBlock]) -> TokenBlock:
    router = None if blocks[0].router_output is None else np.concatenate([b.router_output for b in blocks], axis=1)
    return TokenBlock(
        seq_id=np.concatenate([b.seq_id for b in blocks]),
        pos=np.concatenate([b.pos for b in blocks]),
        token_id=np.concatenate([b.token_id for b in blocks]),
        generated=np.concatenate([b.generated for b in blocks]),
        output_entropy=np.concatenate([b.output_entropy for b in blocks]),
        topk_ids=np.concatenate([b.topk_ids for b in blocks], axis=1),
        topk_weights=np.concatenate([b.topk_weights for b in blocks], axis=1),
        router_output=router,
        predicted_next=None if blocks[0].predicted_next is None else np.concatenate([b.predicted_next for b in blocks], axis=1),
        expert_norms=None if blocks[0].expert_norms is None else np.concatenate([b.expert_norms for b in blocks], axis=1),
    )


def _fixed_list(values: np.ndarray, width: int, arrow_type: pa.DataType) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def routing_table(block: TokenBlock) -> pa.Table:
    """Rows ordered by (layer, seq_id, pos): layer-major, so each column compresses well.

    Every capture path and the importer build their routing parts here, so this is where each row's slots
    are put in gate-weight order (trace/slots.py), judged on the weights at their stored precision.
    """
    n_layers, n_tokens, k = block.topk_ids.shape
    norms = () if block.expert_norms is None else (block.expert_norms,)
    topk_ids, topk_weights, *norms = order_slots(block.topk_ids, block.topk_weights, *norms)  # [L, T, k] each
    n_out = 0 if block.router_output is None else block.router_output.shape[2]
    k_next = 0 if block.predicted_next is None else block.predicted_next.shape[2]
    k_norms = 0 if block.expert_norms is None else block.expert_norms.shape[2]
    schema = routing_schema(k, n_out, k_next, k_norms)
    columns = [
        pa.array(np.tile(block.seq_id, n_layers), pa.int32()),
        pa.array(np.tile(block.pos, n_layers), pa.int32()),
        pa.array(np.repeat(np.arange(n_layers, dtype=np.int16), n_tokens), pa.int16()),
        _fixed_list(topk_ids.astype(np.int16, copy=False), k, pa.int16()),
        _fixed_list(topk_weights.astype(np.float32, copy=False), k, pa.float32()),
    ]
    if n_out:
        columns.append(_fixed_list(block.router_output.astype(np.float32), n_out, pa.float32()))  # float16 values stay so
    if k_next:
        columns.append(_fixed_list(block.predicted_next.astype(np.int16, copy=False), k_next, pa.int16()))
    if k_norms:
        columns.append(_fixed_list(norms[0].astype(np.float32, copy=False), k_norms, pa.float32()))  # moved with their slots
    return pa.Table.from_arrays(columns, schema=schema)


def tokens_table(block: TokenBlock) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(block.seq_id, pa.int32()),
            pa.array(block.pos, pa.int32()),
            pa.array(block.token_id, pa.int32()),
            pa.array(block.generated, pa.bool_()),
            pa.array(block.output_entropy, pa.float32(), from_pandas=True),  # NaN -> null
        ],
        schema=TOKENS_SCHEMA,
    )


def sequences_table(sequences: list, n_tokens: dict[int, int]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            dict(seq_id=s.seq_id, source=s.source, domain=s.domain, doc_id=s.doc_id, n_tokens=n_tokens[s.seq_id], text_sha1=s.text_sha1)
            for s in sequences
        ],
        schema=SEQUENCES_SCHEMA,
    )
