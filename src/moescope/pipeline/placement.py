"""`moescope placement`: a trace -> load matrix, placements, balancedness, staleness and fan-out, as files.

Two passes over the shards (memory: one shard plus one window's load):
  1. load per window of exactly `window` tokens in trace order -> the staleness windows and the whole
     trace's load matrix;
  2. every policy's placement of the whole trace's load -> distinct GPUs / nodes per token (fan-out).
Writes `placement__<table>.{parquet,csv}` (the `placement` analysis's tables plus `fanout`), the load
matrix and each placement's maps as `.npy` in EPLB's layout, and summary.json, which `moescope report` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moescope.analysis.kernels import jsonable
from moescope.analysis.placement import NAME, PlacementResult, block_loads, evaluate
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.pipeline.analyze import _write_tables, analysis_context
from moescope.pipeline.output import check_output_folder, prepare_output_folder
from moescope.simulate.balance import fanout_histogram
from moescope.simulate.placement import POLICIES, PlacementOptions, place
from moescope.simulate.staleness import Staleness
from moescope.trace.manifest import atomic_write_bytes
from moescope.trace.reader import open_trace

WINDOWS = 8  # without --window: the trace in this many windows


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
    layers = tuple(range(ctx.n_layers))

    staleness = Staleness(options, POLICIES, layers)
    total = np.zeros((ctx.n_layers, ctx.n_experts), np.int64)
    open_load, open_tokens, offset = np.zeros_like(total), 0, 0
    for shard in trace.shards():  # pass 1: windows of exactly `window` tokens, across shard boundaries
        view = ShardView(shard, ctx)
        local = (offset % window + np.arange(view.T)) // window  # [T]; 0 continues the open window
        loads = block_loads(view, local, int(local[-1]) + 1)  # [n, L, E]
        counts = np.bincount(local)
        loads[0] += open_load
        counts[0] += open_tokens
        total += view.load[:, : view.E]
        offset += view.T
        done = len(counts) if offset % window == 0 else len(counts) - 1
        for w in range(done):  # the windows this shard completed
            staleness.push(loads[w], int(counts[w]))
        open_load, open_tokens = (loads[-1], int(counts[-1])) if done < len(counts) else (np.zeros_like(total), 0)
    if open_tokens:
        staleness.push(open_load, open_tokens)

    placements = {policy: place(policy, total, options) for policy in POLICIES}
    fanout = {policy: 0 for policy in POLICIES}
    offset = 0
    for shard in trace.shards():  # pass 2: fan-out of every token under every placement
        view = ShardView(shard, ctx)
        index = offset + np.arange(view.T)
        for policy, p in placements.items():
            fanout[policy] = fanout[policy] + fanout_histogram(p, view.ids, index)
        offset += view.T
    notes = (f"staleness windows of {window:,} tokens; a replicated expert's tokens are split evenly over its "
             "replicas for GPU loads and reach its replicas round robin (token index mod replicas) for fan-out",)
    result = evaluate(total, options, layers, trace.n_tokens, staleness, fanout, notes, placements)
    return write_placement(result, trace_path, trace, out, window)


def write_placement(result: PlacementResult, trace_path, trace, out, window: int) -> dict:
    out = prepare_output_folder(out, markers=("summary.json",), what="placement results")
    tables = _write_tables(NAME, result.to_pandas(), out)
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
        "tables": {NAME: tables},
        "notes": {NAME: list(result.notes)},
    }
    atomic_write_bytes(Path(out) / "summary.json", (json.dumps(jsonable(summary), indent=1) + "\n").encode())
    return summary
