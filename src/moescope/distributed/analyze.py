"""Analyses on a Ray cluster: one accumulate task per shard, a tree of merge tasks, finalize on the driver.

The merge tree pairs neighbours level by level, which is the tree `analysis.runner._TreeReduce` builds in
process (a binary counter), so results are the same to the bit. Workers read shards from the trace folder,
which must be reachable at the same path from every worker.
"""

from __future__ import annotations

import dataclasses
import os

from moescope.analysis.context import AnalysisContext
from moescope.analysis.result import AnalysisResult
from moescope.analysis.runner import ANALYSES
from moescope.errors import MoescopeError


def accumulate_shard(folder: str, position: int, names: list[str], ctx: AnalysisContext) -> dict:
    from moescope.analysis.shard_view import ShardView
    from moescope.trace.reader import Trace

    trace = Trace(folder)
    view = ShardView(trace.read_shard(trace.manifest["shards"][position]), ctx)
    return {name: ANALYSES[name].accumulate(view, ctx) for name in names}


def merge_states(names: list[str], older: dict, newer: dict) -> dict:
    return {name: ANALYSES[name].merge(older[name], newer[name]) for name in names}


def ray_pass(folder: str | os.PathLike, address: str | None):
    """A pass runner for `run_analyses(..., run_pass=...)` that reads and accumulates shards on Ray."""
    from moescope.distributed.cluster import connect
    from moescope.trace.reader import Trace

    ray = connect(address)
    folder = str(folder)
    accumulate, merge = ray.remote(accumulate_shard), ray.remote(merge_states)

    def run_pass(shards, names: list[str], ctx: AnalysisContext, clock: dict) -> dict[str, AnalysisResult]:
        del shards, clock  # the workers read the shards themselves; CPU time is spent on the workers
        n_shards = len(Trace(folder).manifest["shards"])
        if not n_shards:
            raise MoescopeError("the trace has no shards: nothing to analyse")
        light = ray.put(dataclasses.replace(ctx, token_text=None))  # once per pass; accumulate never needs token text
        refs = [accumulate.remote(folder, i, names, light) for i in range(n_shards)]
        while len(refs) > 1:
            pairs = [merge.remote(names, refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
            refs = pairs + refs[len(pairs) * 2:]
        try:
            states = ray.get(refs[0])
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, MoescopeError):
                raise cause from None
            raise MoescopeError(f"a Ray analysis task failed: {str(err).strip().splitlines()[0]}") from None
        return {name: ANALYSES[name].finalize(states[name], ctx) for name in names}

    return run_pass
