"""The trace's rows before they are stored: a block of routed tokens, its sequences, and the Arrow tables of a shard.

Every writer of routing data — capture, `moescope.record`, the training monitor, the vLLM backend, foreign-format
importers, the synthetic traces — builds its tables here, so slot order and dtypes are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from moescope.trace.schema import SEQUENCES_SCHEMA, TOKENS_SCHEMA, routing_schema
from moescope.trace.slots import order_slots


@dataclass(frozen=True)
class Sequence:
    seq_id: int
    token_ids: list[int]
    source: str
    domain: str
    doc_id: str
    text_sha1: str


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
    slots_ordered: bool = False  # True: every row's slots are already in contract order (with_ordered_slots)

    @property
    def n_tokens(self) -> int:
        return len(self.seq_id)


def with_ordered_slots(block: TokenBlock) -> TokenBlock:
    """The block with every row's slots in contract order (trace/slots.py; expert norms move with their slots), marked
    so that `routing_table` does not order them again: a capture orders each batch's block as it arrives, on its
    writer thread, rather than a whole shard once the last batch is done."""
    if block.slots_ordered:
        return block
    norms = () if block.expert_norms is None else (block.expert_norms,)
    topk_ids, topk_weights, *norms = order_slots(block.topk_ids, block.topk_weights, *norms)  # [L, T, k] each
    return replace(block, topk_ids=topk_ids, topk_weights=topk_weights, expert_norms=norms[0] if norms else None,
                   slots_ordered=True)


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
        slots_ordered=all(b.slots_ordered for b in blocks),
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
    block = with_ordered_slots(block)
    topk_ids, topk_weights = block.topk_ids, block.topk_weights  # [L, T, k] each
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
        columns.append(_fixed_list(block.expert_norms.astype(np.float32, copy=False), k_norms, pa.float32()))  # moved with their slots
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


def shard_tables(blocks: list[TokenBlock], sequences: list[Sequence]) -> dict[str, pa.Table]:
    """{table name: Arrow table} of one shard: its blocks' tokens and routing, and their sequences."""
    block = concat_blocks(blocks)
    seq_ids, counts = np.unique(block.seq_id, return_counts=True)
    n_tokens = dict(zip(seq_ids.tolist(), counts.tolist()))
    return {"routing": routing_table(block), "tokens": tokens_table(block), "sequences": sequences_table(sequences, n_tokens)}
