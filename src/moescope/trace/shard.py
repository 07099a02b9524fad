"""ShardData: one committed shard of a trace as dense NumPy arrays, the unit every analysis consumes.

A shard holds whole sequences and every MoE layer covers the same T tokens, so routing is a dense
[L, T, k] block. Tokens are ordered by (seq_id, pos); within one sequence positions are consecutive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardData:
    layers: np.ndarray  # int16 [L]      MoE-layer indices present in this shard (normally 0..L-1)
    seq_id: np.ndarray  # int32 [T]
    pos: np.ndarray  # int32 [T]      position within the sequence
    token_id: np.ndarray  # int32 [T]
    generated: np.ndarray  # bool  [T]      True for tokens produced by --generate
    domain: np.ndarray  # int16 [T]      index into `domain_names`
    domain_names: tuple[str, ...]  # trace-wide, sorted
    topk_ids: np.ndarray  # int16 [L, T, k] expert ids the experts actually received
    topk_weights: np.ndarray | None  # float32 [L, T, k] gate weights as the experts applied them (None: read ids only)
    router_output: np.ndarray | None = None  # float32 [L, T, E] logits or probs (manifest says which)
    output_entropy: np.ndarray | None = None  # float32 [T] entropy of next-token distribution, NaN if absent
    predicted_next_ids: np.ndarray | None = None  # int16 [L, T, k] layer l+1's router on layer l's input (-1: last layer)
    document: np.ndarray | None = None  # int64 [T] the token's source document: document_key(source, doc_id); None: each sequence its own
    expert_norms: np.ndarray | None = None  # float32 [L, T, k] ||output|| of each chosen expert alone (--save-expert-norms)

    @property
    def n_tokens(self) -> int:
        return int(self.seq_id.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.layers.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    def same_sequence_as_previous(self) -> np.ndarray:
        """bool [T]: token t and t-1 belong to the same sequence and are adjacent positions."""
        same = np.zeros(self.n_tokens, dtype=bool)
        same[1:] = (self.seq_id[1:] == self.seq_id[:-1]) & (self.pos[1:] == self.pos[:-1] + 1)
        return same


def document_key(source: str, doc_id: str) -> int:
    """A stable non-negative 63-bit id of one document (BLAKE2b of its source and doc_id), the same in every process."""
    digest = hashlib.blake2b(f"{source}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
