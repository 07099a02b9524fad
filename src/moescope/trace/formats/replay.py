"""A trace -> the routing-replay layout RL frameworks consume: per request, int16 [tokens, MoE layers, k].

Routing replay ("R3") feeds a rollout's expert choices back into the training forward pass, so training
routes each token as inference did. The per-request array is what vLLM returns as `routed_experts`
([seq_len, layer_num, topk], the prompt and every generated token but the last) and what verl, slime and
NeMo-RL pass to their trainers. One `.npz` (read with `np.load(path, allow_pickle=False)`) holds, per sequence
of the trace, in seq_id order:

    routed_experts_<seq_id>   int16 [T, L, k]   slot 0 = the first choice (largest gate weight)
    token_ids_<seq_id>        int32 [T]
    generated_<seq_id>        bool  [T]         True for tokens the model generated
    moe_decoder_layers        int32 [L]         the decoder layer of each MoE layer (-1 where unknown)

Only MoE layers are written (vLLM's own array also carries zero rows for dense decoder layers; scatter with
`moe_decoder_layers`). Sequences must be whole (positions 0..T-1): that is what a trainer replays.
`moescope import --format vllm FILE.npz` reads this layout back.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError, TraceError
from moescope.trace.reader import Trace
from moescope.trace.storage import is_url, write_through_local


def export_replay(trace: Trace, path: str | os.PathLike) -> int:
    """Write `trace` to `path` (.npz, or an object-store URL) in the replay layout, atomically; returns the number of
    sequences."""
    if is_url(path):  # s3://: written to a local file, then uploaded in one piece
        return write_through_local(path, lambda local: export_replay(trace, local))
    path = Path(path)
    if path.is_dir():
        raise MoescopeError(f"--out {path} is a folder; give a file name")
    if not path.parent.exists():
        raise MoescopeError(f"folder {path.parent} does not exist; create it first")
    arrays = {"moe_decoder_layers": np.array([-1 if layer.get("decoder_layer") is None else layer["decoder_layer"]
                                              for layer in trace.layers], np.int32)}
    for shard in trace.shards(verify=True):
        starts = np.flatnonzero(np.diff(shard.seq_id, prepend=shard.seq_id[0] - 1))
        for lo, hi in zip(starts, [*starts[1:], shard.n_tokens]):  # one sequence per step, not per token
            seq = int(shard.seq_id[lo])
            if shard.pos[lo] != 0 or shard.pos[hi - 1] != hi - lo - 1:
                raise TraceError(f"{trace.folder}: sequence {seq} does not hold positions 0..{hi - lo - 1}; the "
                                 "replay layout needs whole sequences")
            arrays[f"routed_experts_{seq}"] = np.ascontiguousarray(shard.topk_ids[:, lo:hi].transpose(1, 0, 2))
            arrays[f"token_ids_{seq}"] = shard.token_id[lo:hi].astype(np.int32)
            arrays[f"generated_{seq}"] = shard.generated[lo:hi].copy()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except (OSError, zipfile.LargeZipFile) as err:
        raise MoescopeError(f"cannot write {path}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return (len(arrays) - 1) // 3
