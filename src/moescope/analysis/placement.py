"""Expert placement: the load matrix an EPLB balancer takes, and how static, greedy and EPLB placements serve it.

accumulate keeps [L, E] token counts per block of consecutive sequences (by seq_id, so the blocks are the
same however the trace is sharded; their span doubles while there are more than MAX_BLOCKS, so memory stays
bounded); finalize places the whole trace's load with `PlacementOptions.default_for(E)` (analysis/placement_policies.py)
and reports per-layer balancedness and imbalance of every policy (static is "before"), GPU loads, the
mapping tables and staleness: window t's placement served on window t + 1, over eight windows of whole
sequences of about equal tokens. `moescope placement` runs the same evaluation (`evaluate`) with the user's
cluster, windows of exactly --window tokens, and all-to-all fan-out per token from a second pass; it adds
what one static EPLB placement does not answer: replica budgets per layer under the same total
(placement_budget.py), the LP bound on splitting each window's tokens over replicas (placement_split.py), a
co-activation-aware placement (placement_coactivation.py) and distinct experts per decode batch, random
against grouped by prefill routing (placement_decode.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.kernels import expert_counts, jsonable, pair_counts
from moescope.analysis.result import layer_labels
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.analysis.placement_balance import balancedness, fanout_histogram, gpu_load, imbalance
from moescope.analysis.placement_policies import POLICIES, Placement, PlacementOptions, place
from moescope.analysis.placement_budget import budget_frame
from moescope.analysis.placement_coactivation import coactivation_placement
from moescope.analysis.placement_decode import collect_requests, decode_batch_frame
from moescope.analysis.placement_staleness import Staleness
from moescope.trace.shard import ShardData

NAME = "placement"


MAX_BLOCKS = 64  # blocks of consecutive sequences kept; their span doubles while there are more
WINDOWS = 8  # staleness windows of about equal tokens (as `moescope placement` without --window)


@dataclass(frozen=True, eq=False)
class PlacementState:
    layers: tuple[int, ...]
    span: int  # sequences per block (a power of two)
    block: np.ndarray  # int64 [B] block index = seq_id // span, ascending
    tokens: np.ndarray  # int64 [B] tokens per block
    loads: np.ndarray  # int64 [B, L, E] tokens routed to each expert per block
    room: np.ndarray | None = None  # int64 [2 * MAX_BLOCKS, L, E]: a folded run's buffer whose first B rows are loads


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> PlacementState:
    view = ShardView.of(shard, ctx)
    seq = view.shard.seq_id.astype(np.int64)
    return _coalesce(PlacementState(view.layers, 1, *_blocks(view, seq)))


def _blocks(view: ShardView, block_of_token: np.ndarray):
    block, which = np.unique(block_of_token, return_inverse=True)
    return block, np.bincount(which, minlength=len(block)), block_loads(view, which, len(block))


def block_loads(view: ShardView, block: np.ndarray, n_blocks: int) -> np.ndarray:
    """int64 [n_blocks, L, E]: tokens routed to each expert by the tokens of each block (block: intp [T])."""
    return expert_counts(view.ids, view.E, group=block, n_groups=n_blocks)


def merge(a: PlacementState, b: PlacementState) -> PlacementState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge placement states of different layers {a.layers} and {b.layers}")
    span = max(a.span, b.span)
    a, b = _rebin(a, span), _rebin(b, span)
    return _coalesce(_rebin(PlacementState(a.layers, span, np.concatenate([a.block, b.block]),
                                           np.concatenate([a.tokens, b.tokens]), np.concatenate([a.loads, b.loads])), span))


def folds(ctx: AnalysisContext) -> bool:
    """A run keeps one running state and merges each piece's into it in order (`merge_into`): the state is bounded
    (MAX_BLOCKS blocks), and a tree would copy it whole at every merge."""
    return True


def merge_into(running: PlacementState, new: PlacementState, ctx: AnalysisContext) -> PlacementState:
    """`merge(running, new)` for states in seq_id order (a run's pieces): `new`'s blocks go into spare rows of the
    running state's buffer (the block a sequence cut between pieces shares is added in place), so the running
    blocks are not copied at every piece; they are rebinned only when the span doubles. Any other order: `merge`."""
    if running.layers != new.layers:
        raise MoescopeError(f"cannot merge placement states of different layers {running.layers} and {new.layers}")
    span = max(running.span, new.span)
    running = running if running.span == span else _rebin(running, span)
    new = new if new.span == span else _rebin(new, span)
    B = running.block.size
    if not new.block.size:
        return running
    if B and new.block[0] < running.block[-1]:
        return merge(running, new)
    shared = int(B > 0 and new.block[0] == running.block[-1])  # the block both hold: at most the first of new's
    n = B + new.block.size - shared
    if n > 2 * MAX_BLOCKS:  # states not coalesced (each side holds at most MAX_BLOCKS when they are)
        return merge(running, new)
    room = running.room
    if room is None or running.loads.base is not room:  # the first merge: the running blocks move into a buffer
        room = np.empty((2 * MAX_BLOCKS,) + running.loads.shape[1:], np.int64)
        room[:B] = running.loads
    if shared:
        room[B - 1] += new.loads[0]
    room[B:n] = new.loads[shared:]
    tokens = np.concatenate([running.tokens, new.tokens[shared:]])
    tokens[B - shared : B] += new.tokens[:shared]
    state = PlacementState(running.layers, span, np.concatenate([running.block, new.block[shared:]]), tokens, room[:n], room)
    return _coalesce(state)


def _rebin(state: PlacementState, span: int) -> PlacementState:
    """Blocks of `span` sequences (a multiple of the state's), equal blocks summed."""
    block, which = np.unique(state.block // (span // state.span), return_inverse=True)
    order = np.argsort(which, kind="stable")  # equal blocks side by side, then one sum each (np.add.at is ~10x slower)
    starts = np.flatnonzero(np.diff(which[order], prepend=-1))  # [len(block)]
    loads = np.add.reduceat(state.loads[order], starts, axis=0).astype(np.int64, copy=False)
    return PlacementState(state.layers, span, block, np.bincount(which, weights=state.tokens, minlength=len(block)).astype(np.int64),
                          loads)


def _coalesce(state: PlacementState) -> PlacementState:
    """Double the block span until at most MAX_BLOCKS remain (the same span whatever the merge order)."""
    while len(state.block) > MAX_BLOCKS:
        state = _rebin(state, 2 * state.span)
    return state


def finalize(state: PlacementState, ctx: AnalysisContext) -> PlacementResult:
    options = PlacementOptions.default_for(ctx.n_experts)
    n_tokens = int(state.tokens.sum())
    start = np.cumsum(state.tokens) - state.tokens  # blocks in seq_id order
    window = start * WINDOWS // max(n_tokens, 1)  # [B] blocks grouped into about equal windows
    staleness = Staleness(options, POLICIES, state.layers)
    for w in np.unique(window):
        staleness.push(state.loads[window == w].sum(axis=0), int(state.tokens[window == w].sum()))
    notes = ("defaults: "
             f"{options.n_gpus} GPUs on {options.n_nodes} node(s), {options.n_redundant} redundant slots, "
             f"{WINDOWS} staleness windows; all-to-all fan-out per token needs `moescope placement`",)
    return evaluate(state.loads.sum(axis=0), options, state.layers, n_tokens, staleness, None, notes)


@dataclass(frozen=True, eq=False)
class PlacementResult:
    layers: tuple[int, ...]
    options: PlacementOptions
    load: np.ndarray  # int64 [L, E] tokens routed to each expert
    n_tokens: int | None  # None: a load table (slots counted, tokens unknown)
    placements: dict[str, Placement]
    gpu_loads: dict[str, np.ndarray]  # policy -> float64 [L, G]
    staleness: pd.DataFrame  # policy, window, layer, tokens, balancedness_fresh, balancedness_stale
    fanout: dict[str, np.ndarray] | None  # policy -> int64 [2, L, k + 1] tokens touching 0..k GPUs / nodes
    notes: tuple[str, ...] = ()
    budget: pd.DataFrame | None = None  # placement_budget.budget_frame (moescope placement)
    split: pd.DataFrame | None = None  # Staleness.split_frame: stale placement, even against LP split
    decode_batches: pd.DataFrame | None = None  # placement_decode.decode_batch_frame (--decode-batch)

    def per_layer(self) -> pd.DataFrame:
        frames = []
        for policy, loads in self.gpu_loads.items():
            mean = np.append(loads.mean(axis=1), loads.mean(axis=1).mean())
            frames.append(pd.DataFrame({
                "policy": policy,
                "layer": layer_labels(self.layers),
                "balancedness": balancedness(loads),
                "imbalance": imbalance(loads),
                "max_gpu_load": np.append(loads.max(axis=1), loads.max(axis=1).mean()),
                "mean_gpu_load": mean,
                "mean_gpus_per_token": self._mean_fanout(policy, 0),
                "mean_nodes_per_token": self._mean_fanout(policy, 1),
            }))
        return pd.concat(frames, ignore_index=True)

    def _mean_fanout(self, policy: str, level: int) -> np.ndarray:
        """float64 [L + 1]: mean distinct GPUs (level 0) or nodes (1) per token, per layer then pooled."""
        if self.fanout is None:
            return np.full(len(self.layers) + 1, np.nan)
        hist = self.fanout[policy][level]  # [L, k + 1]
        hist = np.vstack([hist, hist.sum(axis=0)])
        with np.errstate(invalid="ignore", divide="ignore"):
            return (hist * np.arange(hist.shape[1])).sum(axis=1) / hist.sum(axis=1)

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        L, E = self.load.shape
        tables = {
            "load_matrix": pd.DataFrame({"layer": np.repeat(self.layers, E), "expert": np.tile(np.arange(E), L),
                                         "tokens": self.load.ravel()}),
            "per_layer": self.per_layer(),
            "mapping": pd.concat([_mapping(p, self.layers) for p in self.placements.values()], ignore_index=True),
            "gpu_load": pd.concat([_gpu_frame(policy, loads, self.placements[policy], self.layers)
                                   for policy, loads in self.gpu_loads.items()], ignore_index=True),
            "staleness": self.staleness,
        }
        if self.fanout is not None:
            tables["fanout"] = pd.concat([_fanout_frame(policy, hist, self.layers) for policy, hist in self.fanout.items()],
                                         ignore_index=True)
        for name in ("budget", "split", "decode_batches"):
            if getattr(self, name) is not None:
                tables[name] = getattr(self, name)
        return tables

    def summary(self) -> dict:
        o = self.options
        out: dict = {"n_tokens": self.n_tokens, "gpus": o.n_gpus, "nodes": o.n_nodes, "redundant": o.n_redundant,
                     "groups": o.groups, "eplb_policy": "hierarchical" if o.hierarchical else "global"}
        per_layer = self.per_layer()
        stale = self.staleness[self.staleness["layer"] == OVERALL] if len(self.staleness) else self.staleness
        for policy in self.gpu_loads:
            rows = per_layer[per_layer["policy"] == policy]
            overall, layers = rows[rows["layer"] == OVERALL].iloc[0], rows[rows["layer"] != OVERALL]
            out[f"balancedness_{policy}"] = overall["balancedness"]
            out[f"imbalance_{policy}"] = overall["imbalance"]
            out[f"worst_layer_balancedness_{policy}"] = layers["balancedness"].min()
            out[f"mean_gpus_per_token_{policy}"] = overall["mean_gpus_per_token"]
            out[f"mean_nodes_per_token_{policy}"] = overall["mean_nodes_per_token"]
            mine = stale[stale["policy"] == policy] if len(stale) else stale
            out[f"stale_balancedness_{policy}"] = mine["balancedness_stale"].mean() if len(mine) else None
            out[f"fresh_balancedness_{policy}"] = mine["balancedness_fresh"].mean() if len(mine) else None
        out.update(self._extra_summary())
        out["notes"] = list(self.notes)
        return jsonable(out)

    def _extra_summary(self) -> dict:
        out: dict = {}
        if self.budget is not None:
            pooled = self.budget[self.budget["layer"] == OVERALL].iloc[0]
            out["balancedness_eplb_uniform_replicas"] = pooled["balancedness_uniform"]
            out["balancedness_eplb_replica_budget"] = pooled["balancedness_budget"]
        if self.split is not None and len(self.split):
            pooled = self.split[self.split["layer"] == OVERALL]
            for policy, rows in pooled.groupby("policy", sort=False):
                out[f"stale_balancedness_lp_split_{policy}"] = rows["balancedness_lp"].mean()
        if self.decode_batches is not None:
            pooled = self.decode_batches[self.decode_batches["layer"] == OVERALL].set_index("batching")
            out["decode_batch_size"] = int(pooled["batch_size"].iloc[0])
            for batching in ("random", "grouped"):
                out[f"decode_distinct_experts_{batching}"] = pooled.loc[batching, "mean_distinct_experts"]
        return out


def place_trace(shards: Callable[[], Iterable[ShardData]], ctx: AnalysisContext, options: PlacementOptions,
                window: int, decode_batch: int | None = None) -> PlacementResult:
    """`moescope placement`'s evaluation, in two passes over `shards()` (memory: one shard and one window):
    1. loads per window of exactly `window` tokens in trace order (windows cross shard boundaries) -> the
       staleness windows (with the LP split) and the whole trace's load and co-activation; 2. every
    policy's placement of that load, co-activation's included -> fan-out per token (a token's index in the
    trace picks the replica it reaches). With `decode_batch`, a third pass collects the decode requests."""
    layers = tuple(range(ctx.n_layers))
    staleness = Staleness(options, POLICIES, layers, split=True)
    total = np.zeros((ctx.n_layers, ctx.n_experts), np.int64)
    together = np.zeros((ctx.n_layers, ctx.n_experts, ctx.n_experts), np.int64)
    open_load, open_tokens, offset = np.zeros_like(total), 0, 0
    for shard in shards():
        view = ShardView(shard, ctx)
        local = (offset % window + np.arange(view.T)) // window  # [T]; 0 continues the open window
        loads = block_loads(view, local, int(local[-1]) + 1)  # [n, L, E]
        counts = np.bincount(local)
        total += loads.sum(axis=0)
        pair_counts(view.ids, view.ids, view.E, out=together)  # [L, E, E] added in place
        loads[0] += open_load
        counts[0] += open_tokens
        offset += view.T
        done = len(counts) if offset % window == 0 else len(counts) - 1
        for w in range(done):  # the windows this shard completed
            staleness.push(loads[w], int(counts[w]))
        open_load, open_tokens = (loads[-1], int(counts[-1])) if done < len(counts) else (np.zeros_like(total), 0)
    if open_tokens:
        staleness.push(open_load, open_tokens)
    placements = {policy: place(policy, total, options) for policy in POLICIES}
    placements["coactivation"] = coactivation_placement(total, together, options)
    fanout = dict.fromkeys(placements, 0)
    offset = 0
    for shard in shards():
        view = ShardView(shard, ctx)
        for policy, p in placements.items():
            fanout[policy] = fanout[policy] + fanout_histogram(p, view.ids, offset + np.arange(view.T))
        offset += view.T
    notes = (f"staleness windows of {window:,} tokens; a replicated expert's tokens are split evenly over its "
             "replicas for GPU loads and reach its replicas round robin (token index mod replicas) for fan-out",
             "coactivation: experts chosen together on one GPU while it stays within 10 % of the mean GPU load "
             "(no staleness windows: it needs each window's co-activation)")
    decode = None
    if decode_batch is not None:
        decode = decode_batch_frame(collect_requests(shards, ctx), decode_batch, layers, ctx.n_experts)
    result = evaluate(total, options, layers, offset, staleness, fanout, notes, placements)
    return dataclasses.replace(result, budget=budget_frame(total, options, layers), split=staleness.split_frame(),
                               decode_batches=decode)


def place_load_table(tokens: np.ndarray, options: PlacementOptions) -> PlacementResult:
    """`moescope placement` of a load table's windows, tokens int64 [W, L, E] (trace/load_table.py): its windows
    are the staleness windows; fan-out needs each token's experts, which a table of counts does not hold."""
    layers = tuple(range(tokens.shape[1]))
    staleness = Staleness(options, POLICIES, layers, split=True)
    for window in tokens:
        staleness.push(window, int(window[0].sum()))
    notes = (f"a load table of {len(tokens)} windows, its staleness windows; their 'tokens' count layer 0's routed "
             "slots (tokens x top-k: a load table does not say k); all-to-all fan-out and the co-activation "
             "placement need a trace",)
    result = evaluate(tokens.sum(axis=0), options, layers, None, staleness, None, notes)
    return dataclasses.replace(result, budget=budget_frame(tokens.sum(axis=0), options, layers),
                               split=staleness.split_frame())


def evaluate(load: np.ndarray, options: PlacementOptions, layers: tuple[int, ...], n_tokens: int | None,
             staleness: Staleness, fanout: dict[str, np.ndarray] | None, notes: tuple[str, ...] = (),
             placements: dict[str, Placement] | None = None) -> PlacementResult:
    """Place the whole trace's `load` int64 [L, E] with every policy (unless `placements` are given) and
    collect what the staleness windows and the fan-out pass measured."""
    placements = placements or {policy: place(policy, load, options) for policy in POLICIES}
    loads = {policy: gpu_load(p, load) for policy, p in placements.items()}
    if staleness.window < 2:
        notes = (*notes, f"staleness needs two windows, the trace gave {staleness.window}")
    return PlacementResult(layers, options, np.asarray(load, np.int64), n_tokens, placements, loads,
                           staleness.frame(), fanout, tuple(notes))


def _mapping(p: Placement, layers: tuple[int, ...]) -> pd.DataFrame:
    L, S = p.physical_to_logical.shape
    return pd.DataFrame({"policy": p.policy, "layer": np.repeat(layers, S), "gpu": np.tile(p.gpu_of_slot, L),
                         "slot": np.tile(np.arange(S) % p.slots_per_gpu, L), "expert": p.physical_to_logical.ravel()})


def _gpu_frame(policy: str, loads: np.ndarray, p: Placement, layers: tuple[int, ...]) -> pd.DataFrame:
    L, G = loads.shape
    return pd.DataFrame({"policy": policy, "layer": np.repeat(layers, G), "gpu": np.tile(np.arange(G), L),
                         "node": np.tile(p.node_of_gpu, L), "tokens": loads.ravel()})


def _fanout_frame(policy: str, hist: np.ndarray, layers: tuple[int, ...]) -> pd.DataFrame:
    _, L, width = hist.shape
    return pd.DataFrame({"policy": policy, "layer": np.repeat(layers, width), "touched": np.tile(np.arange(width), L),
                         "tokens_gpus": hist[0].ravel(), "tokens_nodes": hist[1].ravel()})
