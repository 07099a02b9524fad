"""Stream shards once through every analysis's accumulate, merge as we go, finalize at the end.

Memory is one shard (plus its derived arrays) and the merged states, which do not grow with the trace
(token specialisation grows with the number of distinct tokens). The expert-cache transition predictor
needs a table learned over the whole trace before it can be evaluated, so when `shards` can be read twice
(a list, a tuple, or a zero-argument callable returning an iterable) and no `ctx.prefetch_table` is given,
the cache runs in a second pass; with a one-shot iterator it runs in the first pass without that predictor.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType

from moescope.analysis import (
    aux_losses,
    coactivation,
    cross_layer,
    domain_specialisation,
    expert_cache,
    load,
    router_confidence,
    temporal_locality,
    token_cost,
    token_specialisation,
)
from moescope.analysis.context import AnalysisContext
from moescope.analysis.result import AnalysisResult
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

ANALYSES: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        load,
        aux_losses,
        router_confidence,
        coactivation,
        cross_layer,
        expert_cache,
        temporal_locality,
        domain_specialisation,
        token_specialisation,
        token_cost,
    )
}

ShardSource = Iterable[ShardData] | Callable[[], Iterable[ShardData]]


def run_analyses(
    shards: ShardSource,
    ctx: AnalysisContext,
    *,
    only: Iterable[str] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, AnalysisResult]:
    """Run the named analyses (default: all of ANALYSES) over the shards; returns {name: result}.

    `timings`, when given, receives the CPU seconds (time.process_time) each analysis spent in
    accumulate/merge/finalize; CPU time stays meaningful on a machine shared with other work.
    """
    names = list(ANALYSES) if only is None else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise MoescopeError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    reiterable = callable(shards) or isinstance(shards, Sequence)
    second_pass = "expert_cache" in names and ctx.prefetch_table is None and reiterable
    first = [n for n in names if not (second_pass and n == "expert_cache")]
    if second_pass and "cross_layer" not in first:
        first.append("cross_layer")  # learns the prefetch table
    clock = timings if timings is not None else {}
    results = _run_pass(_open(shards), first, ctx, clock)
    if second_pass:
        learned = dataclasses.replace(ctx, prefetch_table=results["cross_layer"].prefetch_table())
        results.update(_run_pass(_open(shards), ["expert_cache"], learned, clock))
    return {n: results[n] for n in names}


def _open(shards: ShardSource) -> Iterable[ShardData]:
    return shards() if callable(shards) else shards


def _run_pass(
    shards: Iterable[ShardData], names: list[str], ctx: AnalysisContext, clock: dict[str, float]
) -> dict[str, AnalysisResult]:
    states: dict[str, object] = {}
    for shard in shards:
        view = ShardView(shard, ctx)  # derived arrays shared by the analyses of this shard
        for name in names:
            start = time.process_time()
            module = ANALYSES[name]
            state = module.accumulate(view, ctx)
            states[name] = module.merge(states[name], state) if name in states else state
            clock[name] = clock.get(name, 0.0) + time.process_time() - start
    if not states:
        raise MoescopeError("the trace has no shards: nothing to analyse")
    results = {}
    for name in names:
        start = time.process_time()
        results[name] = ANALYSES[name].finalize(states[name], ctx)
        clock[name] = clock.get(name, 0.0) + time.process_time() - start
    return results
