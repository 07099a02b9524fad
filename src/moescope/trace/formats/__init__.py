"""Foreign routing layouts: one reader per engine's own format, the one place foreign data enters moescope.

    vllm    vllm.py     routed experts: HTTP responses (.jsonl), RequestOutput objects, the replay .npz
    sglang  sglang.py   per-token expert-distribution dumps (.pt, loaded with weights_only)
    trtllm  trtllm.py   expert statistics (per-rank safetensors + meta_info.json): counts -> load table,
                        per-token files -> trace
    olmoe   olmoe.py    OLMoE's routing-analysis JSONL (exp_ids)
and out: replay.py (a trace -> per-request [tokens, MoE layers, k] int16, what RL routing replay consumes).
Every reader parses and checks the whole input before anything is written (dense.py writes the trace).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.trace.storage import exists, fetch, is_url, write_through_local

READERS = {"vllm": "vllm:read_vllm", "sglang": "sglang:read_sglang", "trtllm": "trtllm:read_trtllm_tokens",
           "olmoe": "olmoe:read_olmoe"}


def reader(fmt: str):
    module, name = READERS[fmt].split(":")
    return getattr(importlib.import_module(f"moescope.trace.formats.{module}"), name)


def import_foreign(fmt: str, path: str | os.PathLike, out: str | os.PathLike, *, n_experts: int | None = None,
                   overwrite: bool = False, slot_map: str | os.PathLike | None = None,
                   moe_layers: list[int] | None = None) -> str:
    """Import `path` in format `fmt` into `out` (a trace folder; a .parquet load table for trtllm counts);
    returns what was written, in one line. `slot_map`: TensorRT-LLM's load-balancer slot assignment;
    `moe_layers`: vLLM's MoE decoder layers (needed only for top-1 layers that routed everything to expert 0)."""
    if slot_map is not None and fmt != "trtllm":
        raise MoescopeError("--slot-map is TensorRT-LLM's load-balancer slot assignment: only with --format trtllm")
    if moe_layers is not None and fmt != "vllm":
        raise MoescopeError("--moe-layers names the MoE decoder layers of vLLM's routed_experts: only with --format vllm")
    if fmt not in READERS:
        raise MoescopeError(f"unknown import format {fmt!r}; choose one of {', '.join(READERS)}")
    path = fetch(path)  # s3://: a local copy of the object or prefix (the manifest names the URL)
    slot_map = None if slot_map is None else fetch(slot_map)
    if fmt == "trtllm" and str(out).endswith(".parquet"):
        from moescope.trace.formats.trtllm import read_trtllm_counts
        from moescope.trace.load_table import write_load_table

        if exists(out) and not overwrite:
            raise MoescopeError(f"{out} exists; pass --overwrite or choose another --out")
        if not is_url(out) and not Path(out).parent.is_dir():
            raise MoescopeError(f"folder {Path(out).parent} does not exist; create it first")
        iterations, tokens, layers = read_trtllm_counts(path, n_experts=n_experts, slot_map=slot_map)
        write_through_local(out, lambda local: write_load_table(local, iterations, tokens))  # s3://: uploaded whole
        return f"wrote load table {out}: {len(iterations)} iterations x {len(layers)} MoE layers x {tokens.shape[2]} experts"
    from moescope.trace.formats.dense import write_imported

    read = reader(fmt)
    imported = read(path, n_experts=n_experts, slot_map=slot_map) if fmt == "trtllm" else \
        read(path, moe_layers=moe_layers) if fmt == "vllm" else read(path)
    trace = write_imported(imported, out, n_experts=n_experts, overwrite=overwrite)
    return f"wrote {trace.folder}: {trace.n_tokens} tokens x {trace.n_layers} layers"
