"""`moescope placement`: a trace (or a load table) -> load matrix, placements, balancedness, staleness and
fan-out, as files.

The work is analysis/placement.py's `place_trace` (two passes over the shards). Writes `placement__<table>.{parquet,csv}` (the `placement` analysis's tables plus `fanout`), the load
matrix and each placement's maps as `.npy` in EPLB's layout, the same maps and load as SGLang loads them
(trace/formats/sglang_location.py), and summary.json, which `moescope report` reads.
"""

from __future__ import annotations

import os

import numpy as np

from moescope.analysis.kernels import jsonable
from moescope.analysis.placement import NAME, WINDOWS, PlacementResult, place_load_table, place_trace
from moescope.errors import MoescopeError
from moescope.pipeline.analyze import analysis_context, result_tables, write_results
from moescope.pipeline.output import check_output_folder, prepare_output_folder
from moescope.analysis.placement_policies import PlacementOptions
from moescope.trace.formats.sglang_location import DecoderLayout, write_sglang_files
from moescope.trace.load_table import is_load_table, read_load_table
from moescope.trace.reader import open_trace


def run_placement(trace_path: str | os.PathLike, out: str | os.PathLike, *, gpus: int, nodes: int = 1,
                  redundant: int | None = None, groups: int | None = None, window: int | None = None,
                  decode_batch: int | None = None) -> dict:
    """Place the trace's load on `gpus` GPUs and write the results into `out`; returns the summary.

    `redundant` defaults to one slot per GPU (DeepSeek-V3's prefill layout hosts one redundant expert per
    GPU); `window` (tokens) to a WINDOWS-th of the trace. A load table's windows are its own. `decode_batch`
    (B requests decoded together) adds distinct experts per decode batch, random against grouped.
    """
    if is_load_table(trace_path):
        if decode_batch is not None:
            raise MoescopeError(f"{trace_path} is a load table: --decode-batch needs a trace with generated tokens")
        return _place_load_table(trace_path, out, gpus, nodes, redundant, groups, window)
    trace = open_trace(trace_path)
    if not trace.manifest["shards"]:
        raise MoescopeError(f"{trace_path} has no committed shards; nothing to place")
    ctx = analysis_context(trace)
    options = PlacementOptions(ctx.n_experts, gpus, nodes, gpus if redundant is None else redundant, groups)
    if window is not None and window < 1:
        raise MoescopeError(f"--window must be a positive number of tokens, got {window}")
    if window is not None and window > trace.n_tokens:
        raise MoescopeError(f"--window {window} is longer than the trace's {trace.n_tokens:,} tokens; "
                            "staleness compares consecutive windows, so give at most half of that")
    if decode_batch is not None:
        _check_decode_batch(trace, decode_batch)
    window = window or max(1, -(-trace.n_tokens // WINDOWS))
    check_output_folder(out, markers=("summary.json",), what="placement results", remote=True)  # refused before the work
    result = place_trace(trace.shards, ctx, options, window, decode_batch)
    source = {"path": str(trace_path), "model": trace.manifest["model"].get("id"), "tokens": trace.n_tokens,
              "moe_layers": trace.n_layers, "complete": trace.complete, "corpus": trace.manifest.get("corpus")}
    return write_placement(result, source, out, window, DecoderLayout.from_manifest(trace.manifest, trace.n_layers))


def _check_decode_batch(trace, batch: int) -> None:
    if batch < 1:
        raise MoescopeError(f"--decode-batch must be a positive number of requests, got {batch}")
    if batch > trace.n_tokens:
        raise MoescopeError(f"--decode-batch {batch} is more requests than the trace's {trace.n_tokens:,} tokens")
    generated = int(np.asarray(trace.table("tokens", columns=["generated"]).column("generated")).sum())
    if not generated:
        raise MoescopeError("--decode-batch needs generated tokens, and this trace has none; capture with --generate N")


def _place_load_table(path, out, gpus: int, nodes: int, redundant: int | None, groups: int | None,
                      window: int | None) -> dict:
    if window is not None:
        raise MoescopeError(f"{path} is a load table: its windows are its own (no --window)")
    table = read_load_table(path)
    W, L, E = table.tokens.shape
    options = PlacementOptions(E, gpus, nodes, gpus if redundant is None else redundant, groups)
    check_output_folder(out, markers=("summary.json",), what="placement results", remote=True)
    source = {"path": str(path), "model": "load table", "tokens": None, "moe_layers": L, "windows": W}
    return write_placement(place_load_table(table.tokens, options), source, out, None)


def write_placement(result: PlacementResult, source: dict, out, window: int | None,
                    layout: DecoderLayout | None = None) -> dict:
    out = prepare_output_folder(out, markers=("summary.json",), what="placement results", remote=True)
    layout = layout or DecoderLayout.from_manifest(None, result.load.shape[0])
    engine_files = write_sglang_files(out, result.load, result.placements, result.options.n_experts, layout)
    tables = {NAME: result_tables(NAME, result)}
    np.save(out / "load_matrix.npy", result.load)
    for policy, p in result.placements.items():
        np.save(out / f"physical_to_logical_{policy}.npy", p.physical_to_logical)
        np.save(out / f"logical_to_physical_{policy}.npy", p.logical_to_physical())
    o = result.options
    summary = {
        "trace": source,
        "options": {"gpus": o.n_gpus, "nodes": o.n_nodes, "redundant": o.n_redundant, "groups": o.groups, "window": window,
                    "decode_batch": None if result.decode_batches is None else int(result.decode_batches["batch_size"].iloc[0])},
        "analyses": {NAME: result.summary()},
        "tables": {NAME: list(tables[NAME])},
        "notes": {NAME: list(result.notes)},
        "engine_files": {"sglang": engine_files, "decoder_layers_known": layout.known},
    }
    write_results(out, tables, jsonable(summary))  # summary.json last: a folder with one is complete
    return summary
