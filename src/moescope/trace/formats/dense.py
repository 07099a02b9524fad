"""Routing read from foreign files -> a regular trace: the one import writer (every reader in formats/, and the
JSONL import of trace/exchange.py, ends in `write_imported`).

A reader turns its layout into `Imported`: one TokenBlock of every token (ordered by sequence, then position)
and what is known about the engine's run. Engines that record expert ids only (vLLM, SGLang, TensorRT-LLM,
OLMoE's analysis) give no gate weights: those are NaN, and the manifest says `capture.gate_weights: false`.
Slots keep the engine's order, which for all of them is the top-k order (largest score first).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moescope.errors import ImportFormatError
from moescope.trace.block import Sequence, TokenBlock, shard_tables
from moescope.trace.manifest import library_versions, sha256_file
from moescope.trace.storage import source_of
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter


@dataclass
class Imported:
    block: TokenBlock  # every token of every sequence, ordered by (seq_id, pos); weights NaN when unknown
    source: str  # the file or folder read
    format: str  # "jsonl" | "vllm" | "sglang" | "trtllm" | "olmoe"
    doc_ids: dict[int, str] = field(default_factory=dict)  # seq_id -> the engine's request id, where known
    n_experts: int | None = None  # routed experts per layer, where the engine says; else max id + 1
    gate_weights: bool = False
    notes: dict = field(default_factory=dict)  # format-specific facts for the manifest's capture section
    said: tuple[str, ...] = ()  # lines for stderr once the import goes ahead (what was left out, and why)


def empty_weights(ids: np.ndarray) -> np.ndarray:
    return np.full(ids.shape, np.nan, np.float16)


def token_block(seq_id, pos, token_id, generated, topk_ids, topk_weights=None) -> TokenBlock:
    """A TokenBlock from per-token arrays [T] and routing [L, T, k] (weights NaN when None)."""
    topk_ids = np.asarray(topk_ids, np.int16)
    return TokenBlock(
        seq_id=np.asarray(seq_id, np.int32), pos=np.asarray(pos, np.int32), token_id=np.asarray(token_id, np.int32),
        generated=np.asarray(generated, bool), output_entropy=np.full(topk_ids.shape[1], np.nan, np.float32),
        topk_ids=topk_ids, topk_weights=empty_weights(topk_ids) if topk_weights is None else topk_weights,
        router_output=None,
    )


def check_ids(ids: np.ndarray, where: str) -> None:
    """Expert ids must fit the trace's int16 and be ids (>= 0); one expert once per token."""
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int16).max):
        raise ImportFormatError(f"{where}: expert ids must be in [0, 32767], found {int(ids.min())}..{int(ids.max())}")
    if ids.shape[-1] > 1:
        ordered = np.sort(ids, axis=-1)
        if (ordered[..., 1:] == ordered[..., :-1]).any():
            raise ImportFormatError(f"{where}: a token selects the same expert twice")


def _expert_count(imported: Imported, given: int | None) -> tuple[int, bool]:
    """(routed experts per layer, whether the count was inferred from the largest id seen)."""
    seen = int(imported.block.topk_ids.max()) + 1
    if given is not None and imported.n_experts is not None and given != imported.n_experts:
        raise ImportFormatError(f"{imported.source}: --n-experts {given} but the engine's files declare "
                                f"{imported.n_experts} experts")
    if given is not None and seen > given:
        raise ImportFormatError(f"{imported.source}: expert id {seen - 1} is out of range for --n-experts {given}")
    if imported.n_experts is not None and seen > imported.n_experts:
        raise ImportFormatError(f"{imported.source}: expert id {seen - 1} but the engine declares {imported.n_experts} experts")
    n_experts = given if given is not None else imported.n_experts
    return (seen, True) if n_experts is None else (n_experts, False)


def write_imported(imported: Imported, out: str | os.PathLike, *, n_experts: int | None = None,
                   overwrite: bool = False, shard_tokens: int = 65536) -> Trace:
    """Write `imported` as a trace in `out`: shards of whole sequences, the manifest an import has.

    `n_experts`: routed experts per layer when the engine's files do not say; without either, the count is
    inferred from the largest id seen (said on stderr and recorded per layer as `n_experts_inferred`).
    """
    block = imported.block
    L, T, k = block.topk_ids.shape
    if T == 0 or L == 0:
        raise ImportFormatError(f"{imported.source}: no routed tokens; nothing to import")
    key = block.seq_id.astype(np.int64) * 2**32 + block.pos
    if (np.diff(key) <= 0).any():
        raise ImportFormatError(f"{imported.source}: a (sequence, position) appears twice or out of order")
    n_experts, inferred = _expert_count(imported, n_experts)
    name = Path(imported.source).name
    source = Path(imported.source)
    manifest = {
        "model": {"id": f"imported:{name}", "model_type": None, "class": None, "hidden_size": None},
        "layers": [{"moe_layer": i, "decoder_layer": None, "module": None, "n_experts": n_experts,
                    "n_experts_inferred": inferred, "top_k": k, "n_shared_experts": 0, "expert_sizes": None,
                    "scoring": "unknown", "spec": None} for i in range(L)],
        "capture": {"imported_from": source_of(imported.source), "format": imported.format,
                    "sha256": sha256_file(source) if source.is_file() else None,
                    "n_experts": None if inferred else n_experts,  # a rerun with another count is not this import
                    "gate_weights": imported.gate_weights, **imported.notes},
        "corpus": {"spec": f"{imported.format}:{name}"},
        "weights_dtype": "float16",
        "router_output_kind": None,
        "versions": library_versions(),
    }
    starts = np.flatnonzero(np.diff(block.seq_id, prepend=block.seq_id[0] - 1))  # first token of each sequence
    bounds = np.append(starts, T)
    with TraceWriter(out, manifest, overwrite=overwrite) as writer:
        if writer.already_complete:  # these files, imported before with the same options
            return Trace(out)
        for line in imported.said:  # said once the import is going ahead, so that an error stays the only line
            print(line, file=sys.stderr)
        if inferred:  # said once the import is going ahead, so that an error stays the only line
            print(f"{imported.source}: {n_experts} experts inferred from the largest expert id seen; experts never "
                  "routed to are missing from the count (give --n-experts)", file=sys.stderr)
        lo = 0
        while lo < T:
            last = bounds[np.searchsorted(bounds, lo + shard_tokens, side="right") - 1]  # whole sequences only
            hi = int(last if last > lo else bounds[np.searchsorted(bounds, lo, side="right")])  # at least one
            part = _slice(block, lo, hi)
            seqs = [Sequence(seq_id=int(s), token_ids=[], source=name, domain="unknown",
                             doc_id=imported.doc_ids.get(int(s), str(int(s))), text_sha1="")
                    for s in np.unique(part.seq_id)]
            tables = shard_tables([part], seqs)
            writer.write_shard(tables, seq_id_min=seqs[0].seq_id, seq_id_max=seqs[-1].seq_id)
            lo = hi
        writer.finish()
    return Trace(out)


def _slice(block: TokenBlock, lo: int, hi: int) -> TokenBlock:
    return TokenBlock(seq_id=block.seq_id[lo:hi], pos=block.pos[lo:hi], token_id=block.token_id[lo:hi],
                      generated=block.generated[lo:hi], output_entropy=block.output_entropy[lo:hi],
                      topk_ids=block.topk_ids[:, lo:hi], topk_weights=block.topk_weights[:, lo:hi], router_output=None)
