"""Router saturation across checkpoints: each checkpoint's routing against the final one's, on the same tokens.

    data ──final's tokenizer──▶ token ids ──capture each checkpoint──▶ out/traces/<name> ──analysis/saturation──▶
        out/saturation__per_layer.{parquet,csv} + summary.json (+ the report's section)

The token ids are made once (the final checkpoint's tokenizer) and fed to every checkpoint, so all traces hold
the same tokens. A trace already captured for the same checkpoint and tokens is reused on a rerun.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moescope.analysis import saturation
from moescope.errors import MoescopeError
from moescope.pipeline.analyze import analysis_context
from moescope.pipeline.output import check_output_folder, prepare_output_folder, publish
from moescope.trace.manifest import MANIFEST, atomic_write_bytes
from moescope.trace.reader import Trace, open_trace
from moescope.trace.storage import exists, is_url, location

TABLE = "saturation__per_layer"


def checkpoint_labels(checkpoints: list[str]) -> list[str]:
    """Folder names, made unique by their parents where two are alike (checkpoint-100 of two runs)."""
    names = [Path(c.rstrip("/")).name or c for c in checkpoints]
    return [f"{Path(c.rstrip('/')).parent.name}/{n}" if names.count(n) > 1 else n for c, n in zip(checkpoints, names)]


def training_step(label: str) -> int | None:
    """The last number in a checkpoint's name (checkpoint-200 -> 200), or None."""
    found = re.findall(r"\d+", label)
    return int(found[-1]) if found else None


def _token_ids(final: str, data, *, max_tokens: int, seq_len: int, split: str, device: str):
    from moescope.pipeline.capture import documents_of
    from moescope.recording.batches import sequences_from_documents
    from moescope.recording.loading import load_model

    model, tokenizer = load_model(final, device=device, dtype="float32")
    docs, _ = documents_of(data, split)
    sequences = list(sequences_from_documents(docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens))
    if not sequences:
        raise MoescopeError(f"--data {data} gave no tokens; give a corpus with text")
    rows = [torch.tensor(s.token_ids) for s in sequences]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id or 0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return model, ids, mask


def _moe_shape(checkpoint: str) -> list[tuple[int, int]]:
    """(experts, top-k) of each MoE layer, from the checkpoint's config alone (the model built on the meta device)."""
    from moescope.adapters.discover import find_moe_layers
    from moescope.recording.loading import default_router, model_skeleton, resolve_model_path

    layers = find_moe_layers(model_skeleton(resolve_model_path(checkpoint), False), default_router(checkpoint))
    return [(layer.n_experts, layer.top_k) for layer in layers]


def check_checkpoints(checkpoints: list[str], final: str) -> list[str]:
    """The checkpoints' labels, once every checkpoint is known to be the final one's model (same MoE layers, experts
    and top-k); raised before anything is written."""
    if not checkpoints:
        raise MoescopeError("give at least one checkpoint to compare with --final")
    labels = checkpoint_labels(checkpoints)
    if "final" in labels:
        raise MoescopeError("a checkpoint folder named 'final' would collide with the final checkpoint's trace; rename it")
    reference = _moe_shape(final)
    for checkpoint in checkpoints:
        shape = _moe_shape(checkpoint)
        if shape != reference:
            raise MoescopeError(f"{checkpoint} has other MoE layers than the final checkpoint {final} "
                                f"({len(shape)} layers of {sorted(set(shape))} (experts, top-k) against {len(reference)} of "
                                f"{sorted(set(reference))}); compare checkpoints of one model")
    return labels


def _trace_of(checkpoint: str, model, ids: torch.Tensor, mask: torch.Tensor, folder, batch_size: int) -> Trace:
    """The checkpoint's trace of these tokens (`folder`: a Path or an object-store Location): reused when a complete
    one of it is there, else captured afresh."""
    from moescope.pipeline.capture import capture_trace
    from moescope.recording.loading import default_router, load_model, resolve_model_path
    from moescope.recording.options import CaptureOptions

    if exists(folder, MANIFEST):
        old = open_trace(folder)
        tokens = old.table("tokens", columns=["token_id"]).column("token_id").to_numpy() if old.manifest["shards"] else None
        if old.complete and old.manifest["model"]["id"] == resolve_model_path(checkpoint) and tokens is not None \
                and np.array_equal(tokens, ids[mask.bool()].numpy()):
            return old
    if model is None:
        model, _ = load_model(checkpoint, device="cpu", dtype="float32")
    return capture_trace(model, None, input_ids=ids, attention_mask=mask, out=folder, progress=False, overwrite=True,
                         options=CaptureOptions(batch_size=batch_size, weights_dtype="float32",
                                                router=default_router(checkpoint)))


def compare_to_final(final: Trace, other: Trace) -> pd.DataFrame:
    """Per-layer top-1 agreement and top-k overlap of `other` with `final` (same tokens, same shards)."""
    for key in ("n_experts", "top_k"):
        if [l[key] for l in final.layers] != [l[key] for l in other.layers]:
            raise MoescopeError(f"{other.manifest['model']['id']} has other MoE layers ({key}) than the final checkpoint; "
                                "compare checkpoints of one model")
    ctx = analysis_context(final)
    state = None
    for a, b in zip(final.shards(), other.shards(), strict=True):
        part = saturation.accumulate(a, b, ctx)
        state = part if state is None else saturation.merge(state, part)
    return saturation.finalize(state, ctx)


def saturation_run(checkpoints: list[str], final: str, data, out: str | os.PathLike, *, max_tokens: int = 8192,
                   seq_len: int = 256, batch_size: int = 8, split: str = "all", device: str = "cpu") -> dict:
    """Capture every checkpoint and the final one on the same tokens; write the per-layer table and summary.json."""
    check_output_folder(out, markers=("summary.json",), what="saturation results", remote=True)
    labels = check_checkpoints(checkpoints, final)
    final_model, ids, mask = _token_ids(final, data, max_tokens=max_tokens, seq_len=seq_len, split=split, device=device)
    traces = location(out) / "traces" if is_url(out) else Path(out) / "traces"  # s3://: written to the store directly
    out = prepare_output_folder(out, markers=("summary.json",), what="saturation results", remote=True)  # s3://: staging
    reference = _trace_of(final, final_model, ids, mask, traces / "final", batch_size)
    steps = [training_step(label) for label in labels]
    use_steps = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    frames = []
    for order, (label, checkpoint) in enumerate(zip(labels, checkpoints)):
        trace = _trace_of(checkpoint, final_model if checkpoint == final else None, ids, mask, traces / label, batch_size)
        table = compare_to_final(reference, trace)
        table.insert(0, "checkpoint", label)
        table.insert(1, "order", order)
        table.insert(2, "step", steps[order] if use_steps else order)
        frames.append(table)
    per_layer = pd.concat(frames, ignore_index=True)
    per_layer.to_parquet(out / f"{TABLE}.parquet", index=False)
    per_layer.to_csv(out / f"{TABLE}.csv", index=False)
    pooled = per_layer[per_layer["layer"] == -1]
    summary = {
        "saturation": {
            "final": final, "checkpoints": dict(zip(labels, checkpoints)), "tokens": int(mask.sum()),
            "x": "training step (from the checkpoint names)" if use_steps else "checkpoint order",
            "top_k": int(reference.layers[0]["top_k"]), "moe_layers": reference.n_layers,
            "top1_agreement": dict(zip(pooled["checkpoint"], pooled["top1_agreement"].astype(float))),
            "topk_overlap": dict(zip(pooled["checkpoint"], pooled["topk_overlap"].astype(float))),
        },
        "data": data if isinstance(data, str) else "python",
        "tables": [TABLE],
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    publish(out)  # the tables and summary.json of an s3:// --out, summary.json last
    return summary
