"""Expert placement: the load matrix an EPLB balancer takes, and how static, greedy and EPLB placements serve it.

accumulate keeps [L, E] token counts per block of tokens (neighbouring blocks summed as they accumulate,
so memory stays bounded); finalize
places the whole trace's load with `PlacementOptions.default_for(E)` (moescope/simulate/placement.py) and
reports per-layer balancedness and imbalance of every policy (static is "before"), GPU loads, the mapping
tables and staleness (window t's placement on window t + 1, eight windows of about equal tokens). `moescope placement` runs the same
evaluation with the user's cluster, windows of exactly --window tokens, and all-to-all fan-out per token
(`evaluate`, with a second pass over the trace).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.kernels import jsonable
from moescope.analysis.result import layer_labels
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.simulate.balance import balancedness, gpu_load, imbalance
from moescope.simulate.placement import POLICIES, Placement, PlacementOptions, place
from moescope.simulate.staleness import Staleness
from moescope.trace.shard import ShardData

NAME = "placement"


BLOCK_TOKENS = 256  # a shard's load is kept in blocks of this many tokens ...
MAX_BLOCKS = 64  # ... and neighbouring blocks are summed pairwise while there are more than this many
WINDOWS = 8  # staleness windows of about equal tokens (as `moescope placement` without --window)


@dataclass(frozen=True, eq=False)
class PlacementState:
    layers: tuple[int, ...]
    tokens: np.ndarray  # int64 [B] tokens per block, in trace order
    blocks: np.ndarray  # int64 [B, L, E] load per block


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> PlacementState:
    view = ShardView.of(shard, ctx)
    block = np.arange(view.T) // BLOCK_TOKENS  # [T]
    n = int(block[-1]) + 1 if view.T else 0
    return _coalesce(PlacementState(view.layers, np.bincount(block, minlength=n), block_loads(view, block, n)))


def block_loads(view: ShardView, block: np.ndarray, n_blocks: int) -> np.ndarray:
    """int64 [n_blocks, L, E]: tokens routed to each expert by the tokens of each block (block: intp [T])."""
    L, E = view.L, view.E
    key = ((block[None, :, None] * L + np.arange(L)[:, None, None]) * (E + 1) + view.ids).ravel()  # [L*T*k]
    return np.bincount(key, minlength=n_blocks * L * (E + 1)).reshape(n_blocks, L, E + 1)[:, :, :E]


def merge(a: PlacementState, b: PlacementState) -> PlacementState:
    if a.layers != b.layers:
        raise MoescopeError(f"cannot merge placement states of different layers {a.layers} and {b.layers}")
    return _coalesce(PlacementState(a.layers, np.concatenate([a.tokens, b.tokens]), np.concatenate([a.blocks, b.blocks])))


def _coalesce(state: PlacementState) -> PlacementState:
    """Sum neighbouring blocks pairwise until at most MAX_BLOCKS remain (memory stays bounded)."""
    tokens, blocks = state.tokens, state.blocks
    while len(tokens) > MAX_BLOCKS:
        pair = np.arange(len(tokens)) // 2
        tokens = np.bincount(pair, weights=tokens).astype(np.int64)
        blocks = np.add.reduceat(blocks, np.arange(0, len(pair), 2), axis=0)
    return PlacementState(state.layers, tokens, blocks)


def finalize(state: PlacementState, ctx: AnalysisContext) -> PlacementResult:
    options = PlacementOptions.default_for(ctx.n_experts)
    n_tokens = int(state.tokens.sum())
    start = np.cumsum(state.tokens) - state.tokens
    window = start * WINDOWS // max(n_tokens, 1)  # [B] blocks grouped into about equal windows
    staleness = Staleness(options, POLICIES, state.layers)
    for w in np.unique(window):
        staleness.push(state.blocks[window == w].sum(axis=0), int(state.tokens[window == w].sum()))
    notes = ("defaults: "
             f"{options.n_gpus} GPUs on {options.n_nodes} node(s), {options.n_redundant} redundant slots, "
             f"{WINDOWS} staleness windows; all-to-all fan-out per token needs `moescope placement`",)
    return evaluate(state.blocks.sum(axis=0), options, state.layers, n_tokens, staleness, None, notes)


@dataclass(frozen=True, eq=False)
class PlacementResult:
    layers: tuple[int, ...]
    options: PlacementOptions
    load: np.ndarray  # int64 [L, E] tokens routed to each expert
    n_tokens: int
    placements: dict[str, Placement]
    gpu_loads: dict[str, np.ndarray]  # policy -> float64 [L, G]
    staleness: pd.DataFrame  # policy, window, layer, tokens, balancedness_fresh, balancedness_stale
    fanout: dict[str, np.ndarray] | None  # policy -> int64 [2, L, k + 1] tokens touching 0..k GPUs / nodes
    notes: tuple[str, ...] = ()

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
        out["notes"] = list(self.notes)
        return jsonable(out)


def evaluate(load: np.ndarray, options: PlacementOptions, layers: tuple[int, ...], n_tokens: int,
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
