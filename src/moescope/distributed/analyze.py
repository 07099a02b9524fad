"""Analyses on a Ray cluster: one accumulate task per shard, reduced exactly as in process, finalized on the driver.

Each shard's accumulate task returns, per analysis, the states of the shard's pieces (runner.pieces; one
object each). States that are sums of
fixed-size arrays (MERGE_ADDS) are fetched by the driver in shard order and added into one running state,
`analysis.runner._Fold`; the others are merged by tasks in `analysis.runner._TreeReduce`'s binary-counter
tree, built on the driver from object refs. Both are the in-process reducers, in the same order, so results
are the same to the bit. At most `window` accumulate tasks run ahead of the driver, so finished states do
not pile up in the object store. Workers read shards from the trace: a folder reachable at the same path from
every worker, or an object-store prefix (a storage.Location, carrying the driver's storage options), which
needs no shared filesystem.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque

from moescope.analysis.context import AnalysisContext
from moescope.analysis.result import AnalysisResult
from moescope.analysis.runner import ANALYSES, folds_in_place, ids_only, pieces, reducer_for
from moescope.errors import MoescopeError


def accumulate_shard(folder, position: int, names: list[str], ctx: AnalysisContext) -> tuple:
    """Per name, in order, the states of the shard's pieces (runner.pieces, as in process), as a list (a Ray task
    with num_returns=len(names) stores each list as its own object)."""
    from moescope.analysis.shard_view import ShardView
    from moescope.trace.reader import Trace

    trace = Trace(folder)
    states: tuple[list, ...] = tuple([] for _ in names)
    shard = trace.read_shard(trace.manifest["shards"][position], ids_only=ids_only(names))
    for piece in pieces(shard):
        view = ShardView(piece, ctx)
        for name, kept in zip(names, states):
            kept.append(ANALYSES[name].accumulate(view, ctx))
    return states if len(states) > 1 else states[0]


def merge_states(name: str, older, newer):
    return ANALYSES[name].merge(older, newer)


def ray_pass(folder: str | os.PathLike, address: str | None):
    """A pass runner for `run_analyses(..., run_pass=...)` that reads and accumulates shards on Ray."""
    from moescope.distributed.cluster import connect
    from moescope.trace.reader import Trace

    from moescope.trace.storage import is_url, location

    ray = connect(address)
    folder = location(folder) if is_url(folder) else str(folder)  # a Location pickles with its storage options
    accumulate, merge = ray.remote(accumulate_shard), ray.remote(merge_states)

    def run_pass(shards, names: list[str], ctx: AnalysisContext, clock: dict) -> dict[str, AnalysisResult]:
        del shards, clock  # the workers read the shards themselves; CPU time is spent on the workers
        n_shards = len(Trace(folder).manifest["shards"])
        if not n_shards:
            raise MoescopeError("the trace has no shards: nothing to analyse")
        light = ray.put(dataclasses.replace(ctx, token_text=None))  # once per pass; accumulate never needs token text
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        reducers = {name: reducer_for(ANALYSES[name], ctx, lambda a, b, name=name: merge.remote(name, a, b))
                    for name in names}
        task = accumulate.options(num_returns=len(names))
        pending: deque[list] = deque()  # per submitted shard, in shard order: one ref per analysis

        def reduce_oldest() -> None:
            for name, ref in zip(names, pending.popleft()):
                for state in ray.get(ref):  # the shard's pieces, in order: the in-process reduction, step by step
                    reducers[name].push(state if folds_in_place(ANALYSES[name], ctx) else ray.put(state))

        try:
            for position in range(n_shards):
                refs = task.remote(folder, position, names, light)
                pending.append(refs if len(names) > 1 else [refs])
                if len(pending) == window:
                    reduce_oldest()
            while pending:
                reduce_oldest()
            states = {name: reducers[name].result() for name in names}
            states = {name: s if folds_in_place(ANALYSES[name], ctx) else ray.get(s) for name, s in states.items()}
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, MoescopeError):
                raise cause from None
            raise MoescopeError(f"a Ray analysis task failed: {str(err).strip().splitlines()[0]}") from None
        return {name: ANALYSES[name].finalize(states[name], ctx) for name in names}

    return run_pass
