"""`replay-check`: recompute a trace's routing in transformers on its own tokens and compare (analysis/replay_compare.py).

    trace shard (whole sequences, token ids) -> capture (pipeline/capture.py) of its input_ids into a temporary trace
      -> the same shard recomputed -> compare_routes -> merged counts -> per-layer table (+ flagged rows)

The recomputation batches a shard's sequences as the trace's capture did (its batch size), so a Hugging Face
trace checked against the model that wrote it is compared bit for bit; generated tokens are recomputed
teacher-forced, as a trainer sees them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from moescope.analysis.replay_compare import KINDS, RouteCheck, compare_routes, merge
from moescope.errors import MoescopeError, TraceError
from moescope.pipeline.output import check_output_folder, prepare_output_folder, publish
from moescope.trace.manifest import atomic_write_bytes
from moescope.trace.reader import open_trace
from moescope.trace.shard import ShardData

MARKER = "replay_check.json"


def check_trace(trace) -> None:
    """Refuse, before any model is loaded, a trace that cannot be recomputed: sequences that do not start at
    position 0, or no token ids."""
    for shard in trace.shards(verify=True):
        starts = np.flatnonzero(np.diff(shard.seq_id, prepend=shard.seq_id[0] - 1))
        late = np.flatnonzero(shard.pos[starts] != 0)
        if len(late):
            raise TraceError(f"{trace.folder}: sequence {int(shard.seq_id[starts[late[0]]])} does not start at "
                             "position 0; replay-check recomputes whole sequences")
        if (shard.token_id < 0).any():
            raise TraceError(f"{trace.folder}: the trace has no token ids (an import without them); replay-check "
                             "needs them")


def _input_ids(shard: ShardData) -> tuple:
    """[sequences, longest] token ids and attention mask of a shard's whole sequences."""
    import torch

    starts = np.flatnonzero(np.diff(shard.seq_id, prepend=shard.seq_id[0] - 1))
    lengths = np.diff(np.append(starts, shard.n_tokens))
    ids = torch.zeros(len(starts), int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    row = torch.from_numpy(np.repeat(np.arange(len(starts)), lengths))
    pos = torch.from_numpy(shard.pos.astype(np.int64))
    ids[row, pos] = torch.from_numpy(shard.token_id.astype(np.int64))
    mask[row, pos] = 1
    return ids, mask


def check_model(trace, model, router) -> None:
    """Refuse a model that cannot be the trace's: another vocabulary, other MoE layers (experts, top-k), or
    other MoE modules than the trace's manifest names."""
    from moescope.adapters.discover import find_moe_layers

    vocab = model.get_input_embeddings().num_embeddings
    top = max(int(shard.token_id.max()) for shard in trace.shards())
    layers = find_moe_layers(model, router)
    mine = [(layer.n_experts, layer.top_k) for layer in layers]
    theirs = [(entry["n_experts"], entry["top_k"]) for entry in trace.layers]
    named = [(layer.block_path, entry["module"]) for layer, entry in zip(layers, trace.layers) if entry.get("module")]
    if top >= vocab:
        why = f"token id {top} is beyond its vocabulary of {vocab}"
    elif mine != theirs:
        why = f"its MoE layers (experts, top-k) are {mine}, the trace's {theirs}"
    elif any(a != b for a, b in named):
        why = f"its MoE blocks are {[a for a, _ in named]}, the trace's {[b for _, b in named]}"
    else:
        return
    raise MoescopeError(f"{why}: not the trace's model")


def _recompute(model, router, shard: ShardData, trace, tmp: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The routing the model computes for the shard's tokens: ids, weights [L, T, k] in the shard's order."""
    from moescope.pipeline.capture import capture_trace
    from moescope.recording.options import CaptureOptions

    ids, mask = _input_ids(shard)
    opts = trace.manifest.get("capture", {})
    redo = capture_trace(model, None, input_ids=ids, attention_mask=mask, out=tmp / f"shard-{index}", progress=False,
                         options=CaptureOptions(router=router, batch_size=int(opts.get("batch_size") or 8),
                                                weights_dtype=trace.manifest.get("weights_dtype", "float16")))
    parts = list(redo.shards())
    new_ids = np.concatenate([p.topk_ids for p in parts], axis=1)
    new_weights = np.concatenate([p.topk_weights for p in parts], axis=1)
    token = np.concatenate([p.token_id for p in parts])
    if new_ids.shape[0] != shard.topk_ids.shape[0] or new_ids.shape[2] != shard.topk_ids.shape[2]:
        raise MoescopeError(f"the model routes {new_ids.shape[0]} MoE layers x top-{new_ids.shape[2]}, the trace has "
                            f"{shard.topk_ids.shape[0]} x top-{shard.topk_ids.shape[2]}: not the trace's model")
    if not np.array_equal(token, shard.token_id):
        raise MoescopeError("the recomputed tokens are not the trace's (internal error: rows out of order)")
    return new_ids, new_weights


def replay_check(trace_path: str | os.PathLike, model_name: str, *, dtype: str = "auto", device: str = "auto",
                 out: str | os.PathLike | None = None, trust_remote_code: bool = False) -> dict:
    """Compare the trace's routes with `model_name`'s on the same tokens; returns {"table": DataFrame, "text": the
    table as the CLI prints it, "flagged": rows, "summary": ...}."""
    from moescope.recording.loading import default_router, load_model

    trace = open_trace(trace_path)
    if not trace.manifest["shards"]:
        raise MoescopeError(f"{trace_path} has no committed shards; nothing to check")
    if out is not None:
        check_output_folder(out, markers=(MARKER,), what="replay-check results", remote=True)  # refused before the work
    check_trace(trace)
    model, _ = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    router = default_router(model_name)
    check_model(trace, model, router)
    total: RouteCheck | None = None
    flagged = []
    with tempfile.TemporaryDirectory(prefix="moescope-replay-") as tmp:
        for index, shard in enumerate(trace.shards(verify=True)):
            new_ids, new_weights = _recompute(model, router, shard, trace, Path(tmp), index)
            check, flags = compare_routes(shard.topk_ids, shard.topk_weights, new_ids, new_weights, shard.seq_id, shard.pos)
            total = check if total is None else merge(total, check)
            for kind in KINDS:
                layer, token = np.nonzero(flags[kind])
                flagged.append(pd.DataFrame({"seq_id": shard.seq_id[token], "pos": shard.pos[token],
                                             "layer": shard.layers[layer], "kind": kind}))
    table = total.table()
    rows = pd.concat(flagged, ignore_index=True).sort_values(["seq_id", "pos", "layer"], ignore_index=True)
    summary = {"trace": str(trace_path), "model": model_name, "dtype": dtype,
               "overall": {k: (None if pd.isna(v) else v) for k, v in table.iloc[-1].to_dict().items()}}
    if out is not None:
        out = prepare_output_folder(out, markers=(MARKER,), what="replay-check results", remote=True)
        table.to_csv(out / "replay_check.csv", index=False)
        table.to_parquet(out / "replay_check.parquet", index=False)
        rows.to_parquet(out / "flagged_rows.parquet", index=False)
        atomic_write_bytes(out / MARKER, (json.dumps(summary, indent=1, default=float) + "\n").encode())
        publish(out, last=MARKER)  # uploaded to an s3:// --out, the marker last
    return {"table": table, "text": format_table(table), "flagged": rows, "summary": summary}


def format_table(table: pd.DataFrame) -> str:
    """The per-layer table as text: shares in percent, weight differences, flag counts."""
    lines = [f"{'layer':>7} {'rows':>9} {'set differs':>12} {'first differs':>14} {'mean |dw|':>10} {'max |dw|':>10} "
             + " ".join(f"{k:>10}" for k in KINDS)]
    for r in table.itertuples(index=False):
        lines.append(f"{r.layer:>7} {r.rows:>9} {r.set_differs:>11.3%} {r.first_differs:>13.3%} "
                     f"{r.weight_abs_diff_mean:>10.2e} {r.weight_abs_diff_max:>10.2e} "
                     + " ".join(f"{getattr(r, k):>10}" for k in KINDS))
    return "\n".join(lines)
