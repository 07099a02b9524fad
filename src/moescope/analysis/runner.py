"""Stream shards once through every analysis's accumulate, merge as we go, finalize at the end.

States of fixed size whose merge is a plain sum (modules with MERGE_ADDS = True: load, aux_losses,
coactivation, cross_layer, expert_cache, temporal_locality, domain_specialisation) are added into one
running state as shards come, in shard order (`_Fold`): memory is that state plus the newest shard's, however
many shards there are (a DeepSeek-V3-sized cross_layer state is 261 MiB). placement and token_specialisation
with a token table fold too, by their own `merge_into` (spare rows for new blocks of sequences; one dense table
of the kept tokens' counts). The other states (which grow, or merge by more than a sum) are merged in a tree
(pairs of equal rank, like a binary counter: each state takes part in O(log n) merges), holding at most
log2(shards) partial states. Integer sums do not depend on
the order; the float sums (aux_losses' router probabilities) are added in shard order both here and on Ray
(distributed/analyze.py folds on the driver in the same order), so results are equal to the bit.

Each shard is analysed in pieces of at most PIECE_ROWS (token, layer) rows cut between sequences (`pieces`), so
the arrays derived from it (ShardView) stay bounded however large the shards were written; every analysis
is a sum over sequences, so the pieces' merge is the shard's state. Summed states whose module has
`accumulate_into` (cross_layer, coactivation) take each piece's counts straight into the running state.

The expert-cache transition and popularity predictors need a table learned over the whole trace before they
can be evaluated, so when `shards` can be read twice
(a list, a tuple, or a zero-argument callable returning an iterable) and no `ctx.prefetch_table` is given,
the cache runs in a second pass; with a one-shot iterator it runs in the first pass without those predictors.
token_specialisation likewise counts occurrences in the first pass and keeps exact expert counts for the most
frequent tokens (ctx.token_table) in the second, folded into one table, so its memory does not grow with the trace.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import inspect
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType

import numpy as np

from moescope.analysis import (
    aux_losses,
    coactivation,
    cross_layer,
    domain_specialisation,
    expert_cache,
    load,
    placement,
    router_confidence,
    temporal_locality,
    token_cost,
    token_specialisation,
)
from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import add_into, copy_state
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
        placement,
    )
}

# a callable that takes `ids_only` (Trace.shards) is asked for shards without gate weights and router outputs in a
# pass whose analyses all say IDS_ONLY (the second pass: expert_cache, token_specialisation): half the decoding
ShardSource = Iterable[ShardData] | Callable[[], Iterable[ShardData]]

PIECE_ROWS = 1 << 17  # (token, layer) rows per piece of a shard: ~2.3k tokens at 58 layers, 4k at 32


def pieces(shard: ShardData, max_rows: int | None = None) -> Iterator[ShardData]:
    """The shard cut between sequences into pieces of at most `max_rows` (token, layer) rows each (a longer
    sequence is a piece of its own); the shard itself when it fits. Pieces are views, not copies."""
    T, L = shard.n_tokens, max(1, shard.n_layers)
    per_piece = max(1, (PIECE_ROWS if max_rows is None else max_rows) // L)
    if T <= per_piece:
        yield shard
        return
    starts = np.append(np.flatnonzero(~shard.same_sequence_as_previous()), T)  # sequence starts, then the end
    lo = 0
    while lo < T:
        fits = starts[(starts > lo) & (starts <= lo + per_piece)]
        hi = int(fits[-1]) if fits.size else int(starts[starts > lo][0])  # one long sequence: a piece alone
        yield _tokens(shard, lo, hi)
        lo = hi


def _tokens(shard: ShardData, lo: int, hi: int) -> ShardData:
    """Tokens lo..hi-1 of a shard (views of its arrays)."""
    cut = {}
    for field in dataclasses.fields(shard):
        value = getattr(shard, field.name)
        if field.name in PER_TOKEN and value is not None:
            cut[field.name] = value[lo:hi]
        elif field.name in PER_LAYER_TOKEN and value is not None:
            cut[field.name] = value[:, lo:hi]
    return dataclasses.replace(shard, **cut)


PER_TOKEN = ("seq_id", "pos", "token_id", "generated", "domain", "output_entropy", "document")  # [T] fields
PER_LAYER_TOKEN = ("topk_ids", "topk_weights", "router_output", "predicted_next_ids", "expert_norms")  # [L, T, ...]


def run_analyses(
    shards: ShardSource,
    ctx: AnalysisContext,
    *,
    only: Iterable[str] | None = None,
    timings: dict[str, float] | None = None,
    run_pass: Callable | None = None,
) -> dict[str, AnalysisResult]:
    """Run the named analyses (default: all of ANALYSES) over the shards; returns {name: result}.

    `timings`, when given, receives the CPU seconds (time.process_time) each analysis spent in
    accumulate/merge/finalize; CPU time stays meaningful on a machine shared with other work.
    `run_pass` replaces the in-process pass (``moescope.distributed.analyze.ray_pass``: on a Ray cluster).
    """
    run_pass = run_pass or _run_pass
    names = list(ANALYSES) if only is None else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise MoescopeError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    reiterable = callable(shards) or isinstance(shards, Sequence)
    second_pass = "expert_cache" in names and ctx.prefetch_table is None and reiterable
    # token_specialisation keeps exact expert counts for the most frequent tokens: found in the first pass
    token_pass = "token_specialisation" in names and ctx.token_table is None and reiterable
    later = [n for n in names if (second_pass and n == "expert_cache") or (token_pass and n == "token_specialisation")]
    first = [n for n in names if n not in later]
    if second_pass and "cross_layer" not in first:
        first.append("cross_layer")  # learns the prefetch table
    if token_pass:
        first.append("token_specialisation")  # occurrences only (an empty token table): picks the table
    clock = timings if timings is not None else {}
    first_ctx = dataclasses.replace(ctx, token_table=np.zeros(0, np.int64)) if token_pass else ctx
    with freed_memory_kept():  # pieces allocate and free the same array sizes over and over
        results = run_pass(_open(shards, first), first, first_ctx, clock)
        if later:
            learned = ctx
            if second_pass:
                learned = dataclasses.replace(learned, prefetch_table=results["cross_layer"].prefetch_table())
            if token_pass:
                tokens = results.pop("token_specialisation")
                learned = dataclasses.replace(learned, token_table=token_specialisation.kept_tokens(
                    tokens.token_ids, tokens.occurrences, ctx))
            results.update(run_pass(_open(shards, later), later, learned, clock))
    return {n: results[n] for n in names}


def ids_only(names: Iterable[str]) -> bool:
    """Whether every named analysis reads only expert ids (IDS_ONLY): its pass can read shards without the rest."""
    return all(getattr(ANALYSES[name], "IDS_ONLY", False) for name in names)


def _open(shards: ShardSource, names: list[str]) -> Iterable[ShardData]:
    if not callable(shards):
        return shards
    if ids_only(names) and "ids_only" in inspect.signature(shards).parameters:
        return shards(ids_only=True)
    return shards()


TOP_PAD_BYTES = 128 << 20  # freed memory glibc keeps at the top of its heap while the passes run
DEFAULT_TOP_PAD_BYTES = 128 << 10  # glibc's own M_TOP_PAD (malloc.h DEFAULT_TOP_PAD)
M_TOP_PAD = -2  # malloc.h
_passes_running = 0


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """While the analysis passes run, on glibc: keep TOP_PAD_BYTES of freed memory at the top of the heap (mallopt
    M_TOP_PAD) instead of returning it to the kernel, so the arrays every piece allocates and frees come back
    without fresh page faults (1.2 -> 0.3 CPU-s of system time on 12.8 M Mixtral rows, a quarter of the run). On
    exit glibc's default is restored and the kept memory handed back (malloc_trim), so what runs after (writing the
    tables) peaks as before. Nothing is changed when the user set MALLOC_TOP_PAD_, on other C libraries, or inside
    another such block. Yields whether it changed the setting."""
    global _passes_running
    libc = _glibc() if _passes_running == 0 and "MALLOC_TOP_PAD_" not in os.environ else None
    changed = libc is not None and libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1
    _passes_running += 1
    try:
        yield changed
    finally:
        _passes_running -= 1
        if changed:
            libc.mallopt(M_TOP_PAD, DEFAULT_TOP_PAD_BYTES)
            libc.malloc_trim(0)


@functools.cache
def _glibc():
    """The C library of this process when it is glibc (which has mallopt's M_TOP_PAD and malloc_trim), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _run_pass(
    shards: Iterable[ShardData], names: list[str], ctx: AnalysisContext, clock: dict[str, float]
) -> dict[str, AnalysisResult]:
    reducers = {name: reducer_for(ANALYSES[name], ctx) for name in names}
    for shard in shards:
        for piece in pieces(shard):
            view = ShardView(piece, ctx)  # derived arrays shared by the analyses of this piece
            for name in names:
                start = time.process_time()
                reducers[name].add(ANALYSES[name], view, ctx)
                clock[name] = clock.get(name, 0.0) + time.process_time() - start
            del piece, view  # free its derived arrays before the next piece
        del shard  # free this shard before the next one is read
    results = {}
    for name in names:
        start = time.process_time()
        state = reducers[name].result()
        if state is None:
            raise MoescopeError("the trace has no shards: nothing to analyse")
        results[name] = ANALYSES[name].finalize(state, ctx)
        clock[name] = clock.get(name, 0.0) + time.process_time() - start
    return results


def folds_in_place(module: ModuleType, ctx: AnalysisContext) -> bool:
    """Whether the run keeps one running state of the analysis, each new state merged into it in arrival order: its
    states are fixed-shape arrays whose merge is their sum (MERGE_ADDS), or the module says so for this context
    (`folds(ctx)`, with a `merge_into(running, new, ctx)`: placement, and token_specialisation with a token table)."""
    return getattr(module, "MERGE_ADDS", False) or getattr(module, "folds", lambda ctx: False)(ctx)


def reducer_for(module: ModuleType, ctx: AnalysisContext, merge: Callable | None = None):
    """A running state when the analysis folds (`folds_in_place`), else a merge tree using `merge` (default: the
    module's merge)."""
    if not folds_in_place(module, ctx):
        return _TreeReduce(merge or module.merge)
    into = getattr(module, "merge_into", None)
    return _Fold(add_into if into is None else lambda running, new: into(running, new, ctx))


class _Fold:
    """One running state: each new state is merged into it in arrival order, by `merge_into(running, new)` (default
    kernels.add_into: summed in place).

    The first state is copied so the running state owns its arrays (a state may share arrays with the
    shard's view, or be a read-only array fetched from Ray's object store).
    """

    def __init__(self, merge_into: Callable = add_into):
        self.merge_into = merge_into
        self.state = None

    def push(self, state) -> None:
        self.state = copy_state(state) if self.state is None else self.merge_into(self.state, state)

    def add(self, module: ModuleType, view: ShardView, ctx: AnalysisContext) -> None:
        """Add one shard's state: straight into the running state when the module can (`accumulate_into`)."""
        into = getattr(module, "accumulate_into", None)
        if into is None:
            self.push(module.accumulate(view, ctx))
        elif self.state is None:
            self.state = module.accumulate(view, ctx)  # owns its arrays: accumulate_into an empty state
        else:
            self.state = into(self.state, view, ctx)

    def result(self):
        return self.state


class _TreeReduce:
    """Merge states pairwise like a binary counter: each state takes part in O(log n) merges.

    Folding left to right would merge every shard into an ever larger state (quadratic work for states
    that grow, such as per-token tables); merges are associative, so the order does not change results.
    Holds at most log2(n) partial states. `merge` may also return a future (Ray merges refs this way).
    """

    def __init__(self, merge):
        self.merge = merge
        self.stack: list[tuple[int, object]] = []  # (level, state), levels strictly decreasing

    def add(self, module: ModuleType, view: ShardView, ctx: AnalysisContext) -> None:
        self.push(module.accumulate(view, ctx))

    def push(self, state) -> None:
        level = 0
        while self.stack and self.stack[-1][0] == level:
            state = self.merge(self.stack.pop()[1], state)
            level += 1
        self.stack.append((level, state))

    def result(self):
        state = None
        while self.stack:
            older = self.stack.pop()[1]
            state = older if state is None else self.merge(older, state)
        return state
