"""`moescope placement`: a trace -> load matrix, placements, balancedness, staleness and fan-out, as files.

The work is analysis/placement.py's `place_trace` (two passes over the shards). Writes `placement__<table>.{parquet,csv}` (the `placement` analysis's tables plus `fanout`), the load
matrix and each placement's maps as `.npy` in EPLB's layout, and summary.json, which `moescope report` reads.
"""

from __future__ import annotations

import os

import numpy as np

from moescope.analysis.kernels import jsonable
from moescope.analysis.placement import NAME, WINDOWS, PlacementResult, place_trace
from moescope.errors import MoescopeError
from moescope.pipeline.analyze import analysis_context, result_tables, write_results
from moescope.pipeline.output import check_output_folder, prepare_output_folder
from moescope.simulate.placement import PlacementOptions
from moescope.trace.reader import open_trace


def run_placement(trace_path: str | os.PathLike, out: str | os.PathLike, *, gpus: int, nodes: int = 1,
                  redundant: int | None = None, groups: int | None = None, window: int | None = None) -> dict:
    """Place the trace's load on `gpus` GPUs and write the results into `out`; returns the summary.

    `redundant` defaults to one slot per GPU (DeepSeek-V3's prefill layout hosts one redundant expert per
    GPU); `window` (tokens) to a WINDOWS-th of the trace.
    """
    trace = open_trace(trace_path)
    if not trace.manifest["shards"]:
        raise MoescopeError(f"{trace_path} has no committed shards; nothing to place")
    ctx = analysis_context(trace)
    options = PlacementOptions(ctx.n_experts, gpus, nodes, gpus if redundant is None else redundant, groups)
    if window is not None and window < 1:
        raise MoescopeError(f"--window must be a positive number of tokens, got {window}")
    window = window or max(1, -(-trace.n_tokens // WINDOWS))
    check_output_folder(out, markers=("summary.json",), what="placement results")  # refused before the work
    result = place_trace(trace.shards, ctx, options, window)
    return write_placement(result, trace_path, trace, out, window)


def write_placement(result: PlacementResult, trace_path, trace, out, window: int) -> dict:
    out = prepare_output_folder(out, markers=("summary.json",), what="placement results")
    tables = {NAME: result_tables(NAME, result)}
    np.save(out / "load_matrix.npy", result.load)
    for policy, p in result.placements.items():
        np.save(out / f"physical_to_logical_{policy}.npy", p.physical_to_logical)
        np.save(out / f"logical_to_physical_{policy}.npy", p.logical_to_physical())
    o = result.options
    summary = {
        "trace": {"path": str(trace_path), "model": trace.manifest["model"].get("id"), "tokens": trace.n_tokens,
                  "moe_layers": trace.n_layers, "complete": trace.complete, "corpus": trace.manifest.get("corpus")},
        "options": {"gpus": o.n_gpus, "nodes": o.n_nodes, "redundant": o.n_redundant, "groups": o.groups, "window": window},
        "analyses": {NAME: result.summary()},
        "tables": {NAME: list(tables[NAME])},
        "notes": {NAME: list(result.notes)},
    }
    write_results(out, tables, jsonable(summary))  # summary.json last: a folder with one is complete
    return summary
