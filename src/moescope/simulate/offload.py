"""Expert offloading: a cache of expert slots in fast memory, fed by a prefetch predictor, replayed on a trace.

For every (prefetch, policy, capacity) the trace's lookups run through the cache (streams.py: cold at each
sequence start, per layer or one budget over all layers) and are counted per phase (prefill: prompt tokens,
decode: generated tokens) and layer: lookups, hits, prefetched experts and those that had to be fetched,
and per expert how many times it crossed the link (demand misses and prefetch loads apart), from which
cost.py makes bytes, stall time and a decode throughput bound. Counts add up over shards (merge).

Policies (one file each): lru, lfu, arc, belady (offline optimal: the upper bound); static and static-oracle,
pinned sets that never change (static.py: learned on the other fold of documents, and the best fixed set in
hindsight), simulated under prefetch "none" only. coverage.py counts what a cache has to hold (effective
experts, experts for 50/90/99 % of lookups, working set per window of tokens). Prefetch, for layer l
of a token, as analysis/expert_cache.py's predictors (`prefetch_sources`, one definition of each):
  none              demand fetching only;
  same-index        the experts the token used at layer l-1 (layer 0: none);
  transition        the k experts most often seen at l after its first choice at l-1 (cross_layer.py's
                    table, learned on the other fold of documents; layer 0: none);
  popularity        the k most loaded experts of layer l in the other fold, at every layer;
  router-lookahead  layer l's router applied to layer l-1's input (`capture --predict-next-layer`; layer 0: none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.expert_cache import prefetch_sources
from moescope.analysis.kernels import jsonable
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.simulate import arc, belady, lfu, lru
from moescope.simulate.cost import SWEEP_GBPS, LINKS, Link
from moescope.simulate.coverage import LookupCounts, count_lookups, coverage_curve, coverage_frame
from moescope.simulate.static import STATIC, pinned_counts, random_set_hit_rate
from moescope.simulate.streams import SCOPES, build_streams
from moescope.trace.shard import ShardData

POLICIES = {"lru": lru.simulate, "lfu": lfu.simulate, "arc": arc.simulate, "belady": belady.simulate}
ALL_POLICIES = (*POLICIES, *STATIC)
REALISABLE = ("lru", "lfu", "arc", "static")  # what an engine can run (belady and static-oracle see the future)
PREFETCH = ("none", "same-index", "transition", "popularity", "router-lookahead")
LEARNED = ("transition", "popularity")  # need a first pass over the trace
PHASES = ("prefill", "decode")
QUANTITIES = ("lookups", "hits", "prefetched", "prefetch_loads")


@dataclass(frozen=True)
class OffloadOptions:
    capacities: tuple[int, ...]
    policies: tuple[str, ...] = ALL_POLICIES
    prefetch: tuple[str, ...] = ("none",)
    scope: str = "layer"
    window: int = 8  # tokens per working-set window

    def check(self, ctx: AnalysisContext, *, lookahead_width: int | None) -> None:
        """Refuse what cannot be simulated, in one line (before anything is written)."""
        unknown = [p for p in self.policies if p not in ALL_POLICIES] + [p for p in self.prefetch if p not in PREFETCH]
        if unknown:
            raise MoescopeError(f"unknown {', '.join(unknown)}; policies: {', '.join(ALL_POLICIES)}; "
                                f"prefetch: {', '.join(PREFETCH)}")
        if self.window < 1:
            raise MoescopeError(f"--window must be a positive number of tokens, got {self.window}")
        if self.scope not in SCOPES:
            raise MoescopeError(f"unknown --scope {self.scope!r}; choose {' or '.join(SCOPES)}")
        if not self.capacities or not self.policies or not self.prefetch:
            raise MoescopeError("give at least one capacity, policy and prefetch")
        if "router-lookahead" in self.prefetch and lookahead_width is None:
            raise MoescopeError("--prefetch router-lookahead needs a trace captured with --predict-next-layer")
        widest = max(ctx.top_k, lookahead_width or 0) if "router-lookahead" in self.prefetch else ctx.top_k
        small = [c for c in self.capacities if c < widest]
        if small:
            raise MoescopeError(f"--capacity {small[0]} is below the {widest} experts one token needs at once "
                                f"(top-k = {ctx.top_k}); give capacities of at least {widest}")
        keys = ctx.n_experts * (ctx.n_layers if self.scope == "global" else 1)
        large = [c for c in self.capacities if c > keys]
        if large:
            raise MoescopeError(f"--capacity {large[0]} exceeds the {keys} experts a {self.scope} cache can hold "
                                f"(a cache of {keys} already keeps every expert it has fetched)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.prefetch), len(self.policies), len(self.capacities)


@dataclass(frozen=True, eq=False)
class OffloadState:
    counts: np.ndarray  # int64 [F, P, C, 2, L, 4]: QUANTITIES per (prefetch, policy, capacity, phase, layer)
    moved: np.ndarray  # int64 [F, P, C, 2, 2, L, E]: expert crossings per phase, (demand, prefetch), layer, expert
    tokens: np.ndarray  # int64 [2] tokens per phase
    lookups: LookupCounts  # per fold, phase, layer and expert, and the working-set windows


def prefetch_source(view: ShardView, ctx: AnalysisContext, name: str) -> np.ndarray | None:
    """intp [L, T, kp] experts to prefetch into layer l's cache for each token (sentinel E: none), or None.
    The learned predictors need `ctx.prefetch_table` (simulate_trace learns it)."""
    if name == "none":
        return None
    return prefetch_sources(view, ctx)[name.replace("-", "_")]


def accumulate(view: ShardView, ctx: AnalysisContext, options: OffloadOptions) -> OffloadState:
    F, P, C = options.shape
    L, E = view.L, view.E
    counts = np.zeros((F, P, C, 2, L, len(QUANTITIES)), np.int64)
    moved = np.zeros((F, P, C, 2, 2, L, E), np.int64)
    for f, name in enumerate(options.prefetch):
        streams = build_streams(view, options.scope, prefetch_source(view, ctx, name))
        cell = streams.phase.astype(np.intp) * L + streams.layer  # [M] (phase, layer)
        real = streams.lookups < streams.n_keys  # [M, k]
        looked_up = _expert_cells(cell, streams.lookups, options.scope, L, E)  # [M, k] (phase, layer, expert)
        counts[f, :, :, :, :, 0] = _per_cell(cell, real.sum(axis=1), L)
        if streams.prefetch is not None:
            counts[f, :, :, :, :, 2] = _per_cell(cell, (streams.prefetch < streams.n_keys).sum(axis=1), L)
            prefetched = _expert_cells(cell, streams.prefetch, options.scope, L, E)
        for p, policy in enumerate(options.policies):
            if policy in STATIC:  # filled from the lookup counts once the whole trace is counted (pin_static)
                continue
            for c, capacity in enumerate(options.capacities):
                hit, loaded = POLICIES[policy](streams, capacity)
                counts[f, p, c, :, :, 1] = _per_cell(cell, hit.sum(axis=1), L)
                moved[f, p, c, :, 0] = _per_expert(looked_up, real & ~hit, L, E)
                if loaded is not None:
                    counts[f, p, c, :, :, 3] = _per_cell(cell, loaded.sum(axis=1), L)
                    moved[f, p, c, :, 1] = _per_expert(prefetched, loaded, L, E)
    tokens = np.bincount(view.shard.generated.astype(np.intp), minlength=2)
    return OffloadState(counts, moved, tokens, count_lookups(view, options.window))


def _per_cell(cell: np.ndarray, values: np.ndarray, L: int) -> np.ndarray:
    """int64 [2, L]: values [M] summed per (phase, layer)."""
    return np.bincount(cell, weights=values, minlength=2 * L).astype(np.int64).reshape(2, L)


def _expert_cells(cell: np.ndarray, keys: np.ndarray, scope: str, L: int, E: int) -> np.ndarray:
    """int32 [M, w]: the (phase, layer, expert) cell of every key of a stream layout (no key: any cell)."""
    expert = keys % E if scope == "global" else np.minimum(keys, E - 1)
    return (cell[:, None] * E + expert).astype(np.int32)


def _per_expert(cells: np.ndarray, mask: np.ndarray, L: int, E: int) -> np.ndarray:
    """int64 [2, L, E]: masked events of `cells` [M, w] counted per (phase, layer, expert)."""
    return np.bincount(cells[mask], minlength=2 * L * E).reshape(2, L, E)


def merge(a: OffloadState, b: OffloadState) -> OffloadState:
    return OffloadState(a.counts + b.counts, a.moved + b.moved, a.tokens + b.tokens, a.lookups + b.lookups)


def pin_static(state: OffloadState, options: OffloadOptions) -> OffloadState:
    """The static policies' hits and demand fetches (prefetch "none" rows), from the whole trace's lookups."""
    if "none" not in options.prefetch:
        return state
    f = options.prefetch.index("none")
    counts, moved = state.counts.copy(), state.moved.copy()
    looked_up = state.lookups.by_phase  # [2, L, E]
    for p, policy in enumerate(options.policies):
        if policy in STATIC:
            for c, capacity in enumerate(options.capacities):
                hits = pinned_counts(state.lookups.by_fold, capacity, options.scope, policy)  # [2, L, E]
                counts[f, p, c, :, :, 1] = hits.sum(axis=2)
                moved[f, p, c, :, 0] = looked_up - hits
    return OffloadState(counts, moved, state.tokens, state.lookups)


def simulate_trace(shards: Callable[[], Iterable[ShardData]], ctx: AnalysisContext, options: OffloadOptions) -> OffloadState:
    """Every configuration over `shards()`, shard by shard (a first pass learns cross_layer's prefetch table
    when transition or popularity is asked for and `ctx` has none)."""
    from moescope.analysis.runner import run_analyses

    if set(options.prefetch) & set(LEARNED) and ctx.prefetch_table is None:
        table = run_analyses(shards, ctx, only=["cross_layer"])["cross_layer"].prefetch_table()
        if table.empty_fold_warning() is not None:
            raise MoescopeError(f"--prefetch {', '.join(p for p in options.prefetch if p in LEARNED)}: "
                                f"{table.empty_fold_warning()}")
        ctx = dataclasses.replace(ctx, prefetch_table=table)
    state = None
    for shard in shards():
        part = accumulate(ShardView(shard, ctx), ctx, options)
        state = part if state is None else merge(state, part)
    if state is None:
        raise MoescopeError("the trace has no shards: nothing to simulate")
    return pin_static(state, options)


@dataclass(frozen=True, eq=False)
class OffloadResult:
    options: OffloadOptions
    layers: tuple[int, ...]
    top_k: int
    n_experts: int
    state: OffloadState
    expert_bytes: np.ndarray  # float64 [L, E]
    link: Link
    phases: tuple[str, ...]  # the phases reported (decode only when the trace generated tokens)
    notes: tuple[str, ...] = ()
    lossy: pd.DataFrame | None = None  # simulate/lossy.py's lossy_frame (--lossy), with ΔNLL when a model ran

    @property
    def static_learnable(self) -> bool:
        """Both document folds hold lookups, so `static` can learn on one and be served the other."""
        return bool((self.state.lookups.by_fold.sum(axis=(1, 2, 3)) > 0).all())

    @property
    def n_keys(self) -> int:
        """Keys one cache chooses from: E per layer, or every (layer, expert) for one global budget."""
        return self.n_experts * (len(self.layers) if self.options.scope == "global" else 1)

    def _simulated(self, policy: str, prefetch: str) -> bool:
        if policy not in STATIC:
            return True
        return prefetch == "none" and (policy != "static" or self.static_learnable)

    def _rows(self):
        """(prefetch, policy, capacity, phase index, phase) of every simulated configuration."""
        for f, prefetch in enumerate(self.options.prefetch):
            for p, policy in enumerate(self.options.policies):
                if not self._simulated(policy, prefetch):
                    continue
                for c, capacity in enumerate(self.options.capacities):
                    for q, phase in enumerate(PHASES):
                        if phase in self.phases:
                            yield f, p, c, q, prefetch, policy, capacity, phase

    def hit_rate(self) -> pd.DataFrame:
        frames = []
        per_expert_bytes = self.state.moved * self.expert_bytes  # [F, P, C, 2, 2, L, E]
        for f, p, c, q, prefetch, policy, capacity, phase in self._rows():
            counts = self.state.counts[f, p, c, q]  # [L, 4]
            counts = np.vstack([counts, counts.sum(axis=0)])
            moved = self.state.moved[f, p, c, q].sum(axis=(0, 2))  # [L]
            moved_bytes = per_expert_bytes[f, p, c, q].sum(axis=(0, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                rate = counts[:, 1] / counts[:, 0]
            frames.append(pd.DataFrame({
                "scope": self.options.scope, "policy": policy, "prefetch": prefetch, "capacity": capacity,
                "phase": phase, "layer": [*self.layers, OVERALL],
                "lookups": counts[:, 0], "hits": counts[:, 1], "hit_rate": rate,
                "prefetched": counts[:, 2], "prefetch_loads": counts[:, 3],
                "experts_moved": np.append(moved, moved.sum()), "bytes_moved": np.append(moved_bytes, moved_bytes.sum()),
            }))
        return pd.concat(frames, ignore_index=True)

    def cost(self, links: list[Link] | None = None) -> pd.DataFrame:
        """Per configuration and link: stall and link seconds per token, and the tokens/s the link allows."""
        links = links or [self.link, *(Link.preset(n) for n in LINKS if n != self.link.name)]
        bytes_ = (self.state.moved * self.expert_bytes).sum(axis=(-2, -1))  # [F, P, C, 2, 2]
        transfers = self.state.moved.sum(axis=(-2, -1))
        rows = []
        for f, p, c, q, prefetch, policy, capacity, phase in self._rows():
            tokens = max(int(self.state.tokens[q]), 1)
            for link in links:
                stall = link.seconds(transfers[f, p, c, q, 0], bytes_[f, p, c, q, 0]) / tokens
                busy = link.seconds(transfers[f, p, c, q].sum(), bytes_[f, p, c, q].sum()) / tokens
                rows.append((policy, prefetch, capacity, phase, link.name, link.bandwidth / 1e9, link.latency * 1e6,
                             stall, busy, 1.0 / busy if busy > 0 else np.inf, bytes_[f, p, c, q].sum() / tokens))
        return pd.DataFrame(rows, columns=["policy", "prefetch", "capacity", "phase", "link", "bandwidth_gbps", "latency_us",
                                           "stall_s_per_token", "link_s_per_token", "tokens_per_s_bound", "bytes_per_token"])

    def bandwidth_sweep(self) -> pd.DataFrame:
        return self.cost([Link.custom(g, self.link.latency * 1e6) for g in SWEEP_GBPS])

    def oracle_gap(self, rates: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per prefetch, capacity and phase (all layers): Belady against the best policy an engine can run,
        the pinned set against LRU, and the expected hit rate of a random fixed set. Belady is optimal among
        caches that keep every expert they fetch; a pinned set fetches a miss without keeping it, so
        static-oracle can beat Belady: best_oracle is the better of the two."""
        rates = self.hit_rate() if rates is None else rates
        overall = rates[rates["layer"] == OVERALL]
        rows = []
        for (prefetch, capacity, phase), group in overall.groupby(["prefetch", "capacity", "phase"], sort=False):
            rate = dict(zip(group["policy"], group["hit_rate"]))
            realisable = {p: r for p, r in rate.items() if p in REALISABLE and not np.isnan(r)}
            best = max(realisable, key=realisable.get, default=None)
            best_rate = realisable[best] if best else np.nan
            oracle = np.fmax(rate.get("belady", np.nan), rate.get("static-oracle", np.nan))
            rows.append((prefetch, capacity, phase, rate.get("belady", np.nan), best, best_rate,
                         rate.get("belady", np.nan) - best_rate, oracle, oracle - best_rate, rate.get("lru", np.nan),
                         rate.get("static", np.nan), rate.get("static-oracle", np.nan),
                         rate.get("static", np.nan) - rate.get("lru", np.nan), random_set_hit_rate(capacity, self.n_keys)))
        return pd.DataFrame(rows, columns=["prefetch", "capacity", "phase", "belady", "best_realisable_policy",
                                           "best_realisable", "oracle_gap", "best_oracle", "best_oracle_gap", "lru",
                                           "static", "static_oracle", "static_minus_lru", "random_set"])

    def coverage(self) -> pd.DataFrame:
        return coverage_frame(self.state.lookups, self.layers, self.phases, self.options.window)

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        rates = self.hit_rate()
        return {"hit_rate": rates, "cost": self.cost(), "bandwidth_sweep": self.bandwidth_sweep(),
                "oracle_gap": self.oracle_gap(rates), "coverage": self.coverage(),
                "coverage_curve": coverage_curve(self.state.lookups, self.layers, self.phases),
                **({"lossy": self.lossy} if self.lossy is not None else {})}

    def headline_capacity(self) -> int:
        """2k when simulated (near the sweet spot reported for many MoE models), else the smallest."""
        caps = self.options.capacities
        return 2 * self.top_k if 2 * self.top_k in caps and self.options.scope == "layer" else min(caps)

    def summary(self) -> dict:
        rates = self.hit_rate()
        overall = rates[rates["layer"] == OVERALL]
        cap = self.headline_capacity()
        out: dict = {"scope": self.options.scope, "capacity": cap, "link": self.link.name,
                     "expert_bytes": float(self.expert_bytes.max()), "phases": list(self.phases)}
        at = overall[overall["capacity"] == cap]
        for r in at.itertuples():
            out[f"hit_rate_{r.phase}_{r.policy}_{r.prefetch}"] = r.hit_rate
        gap = self.oracle_gap(rates)
        for r in gap[gap["prefetch"] == self.options.prefetch[0]].itertuples():  # every capacity
            out[f"oracle_gap_{r.phase}_C{r.capacity}"] = r.oracle_gap
            out[f"best_realisable_{r.phase}_C{r.capacity}"] = r.best_realisable_policy
            out[f"static_minus_lru_{r.phase}_C{r.capacity}"] = r.static_minus_lru
        out["random_set_hit_rate"] = random_set_hit_rate(cap, self.n_keys)
        coverage = self.coverage()
        for phase, group in coverage.groupby("phase", sort=False):
            for column in ("effective_experts", "experts_for_90", "working_set"):
                out[f"mean_{column}_{phase}"] = group[column].mean()
        cost = self.cost([self.link])
        decode = cost[(cost["phase"] == "decode") & (cost["capacity"] == cap)]
        for r in decode.itertuples():
            out[f"decode_tokens_per_s_bound_{r.policy}_{r.prefetch}"] = r.tokens_per_s_bound
            out[f"decode_stall_ms_per_token_{r.policy}_{r.prefetch}"] = r.stall_s_per_token * 1e3
        if self.lossy is not None:
            pooled = self.lossy[(self.lossy["layer"] == OVERALL) & (self.lossy["capacity"] == cap)]
            for r in pooled.itertuples():
                out[f"lossy_{r.source}_{r.phase}_{r.knob}_hit_rate"] = r.hit_rate
                out[f"lossy_{r.source}_{r.phase}_{r.knob}_weight_discarded"] = r.weight_discarded
                if "delta_nll" in self.lossy and r.source == "model":
                    out[f"lossy_model_{r.knob}_delta_nll"] = r.delta_nll
        out["notes"] = list(self.notes)
        return jsonable(out)

