"""Router confidence: how decisively the router picks its experts.

From the captured gate weights (always available), per token with weights sorted descending:
  top-1 / top-2 weight after renormalising the k weights to sum 1 (so scaled routers compare),
  their ratio w1 / w2 (log-binned over [1, ratio_max]; w2 = 0 lands in the overflow bin and is left out
  of the mean), and the entropy of the renormalised selected weights.
From router outputs (when captured), p = router probabilities (softmax of logits) over all R router classes
(the E routed experts, then any non-compute choices: LongCat's identity experts, ZAYA's skip), since the
router chooses among all of them:
  routing entropy H(p) in nats (histogram over [0, ln R]); margin p_(k) - p_(k+1) between the last
  selected and the first rejected class; the share of tokens whose captured top-k set is *a* top-k of p —
  every captured class at least as probable as every other one, so exact ties (common in float16 logits)
  match whichever tied class the router took; below 1 for bias-corrected or group-limited routers — and what
  top-m routing of p would do for each m in `what_if_top_k`: the load it puts on each routed expert (a pick of
  a non-compute choice loads none), how many experts it uses and the first weight p_(1) / sum of the m largest p.
Histograms have `hist_bins` equal bins plus an underflow and an overflow bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import CoMoments, expert_counts, histogram_edges, histogram_moments, jsonable
from moescope.analysis.result import layer_labels
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "router_confidence"


@dataclass(frozen=True, eq=False)
class Histogram:
    edges: np.ndarray  # float64 [B + 1] (bin edges; log10 edges already exponentiated when log)
    counts: np.ndarray  # int64 [L, B + 2]: underflow, B bins, overflow


@dataclass(frozen=True, eq=False)
class ConfidenceState:
    layers: tuple[int, ...]
    n_tokens: int
    histograms: dict[str, Histogram]
    moments: dict[str, CoMoments]  # each over [L]
    what_if_k: tuple[int, ...]  # the m of each what-if routing that applies (m <= E)
    what_if_load: np.ndarray | None  # int64 [M, L, E]
    topk_matches: np.ndarray | None  # int64 [L] tokens whose captured set equals top-k of the router output


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> ConfidenceState:
    view = ShardView.of(shard, ctx)
    th, k, E = ctx.thresholds, view.k, view.E
    bins = th.hist_bins
    hist: dict[str, Histogram] = {}
    mom: dict[str, CoMoments] = {}

    w = view.sorted_weights  # [k, L, T] descending, each slot contiguous: the sums below add slot by slot
    with np.errstate(invalid="ignore", divide="ignore"):
        wn = w / w.sum(axis=0)  # [k, L, T] renormalised

    def add(name: str, values: np.ndarray, lo: float, hi: float, *, log: bool = False, **how) -> None:
        """Histogram of a [L, T] feature over [lo, hi] and its per-layer moments (of `moment_values` when given)."""
        counts, mom[name] = histogram_moments(values, lo, hi, bins, **how)
        hist[name] = Histogram(histogram_edges(lo, hi, bins, log=log), counts)

    add("top1_weight", wn[0], 0, 1)  # moments over finite values: a token whose weights are all 0 is left out
    if k >= 2:
        add("top2_weight", wn[1], 0, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = w[0] / w[1]  # [L, T]
            log_ratio = np.log10(ratio)
        add("weight_ratio", log_ratio, 0, math.log10(th.ratio_max), log=True, moment_values=ratio)
        with np.errstate(invalid="ignore", divide="ignore"):
            h_sel = -sum(p * np.log(np.where(p == 0, 1.0, p)) for p in wn)  # [L, T]; 0 log 0 = 0
        add("selected_entropy", h_sel, 0, math.log(k))

    R = view.R  # router classes: E routed experts, then the non-compute choices
    what_if_k = tuple(m for m in th.what_if_top_k if m <= R)
    what_if_load = matches = None
    if view.router_probs is not None:
        add("router_entropy", view.router_entropy, 0, math.log(R), finite_only=False)  # [L, T]
        top_ids, top_p = view.router_top  # [m, L, T] descending
        if R > k:
            add("margin", top_p[k - 1].astype(np.float64) - top_p[k], 0, 1, finite_only=False)  # [L, T]
        matches = _is_a_router_top_k(view, top_ids, top_p).sum(axis=1)  # [L]
        loads = []
        for m in what_if_k:  # a handful of alternative k values, each vectorised over the shard
            loads.append(expert_counts(top_ids[:m].transpose(1, 2, 0), E))  # non-compute picks count for no expert
            first = top_p[0] / top_p[:m].sum(axis=0, dtype=np.float64)
            mom[f"what_if_top{m}_first_weight"] = CoMoments.of(first, axis=1)
        what_if_load = np.stack(loads)
    return ConfidenceState(view.layers, view.T, hist, mom, what_if_k, what_if_load, matches)


def _is_a_router_top_k(view: ShardView, top_ids: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """bool [L, T]: every captured class is at least as probable as every class not captured.

    top_ids/top_p [m, L, T] (m >= k + 1) are the most probable classes, descending: the most probable class
    not captured is among the first k + 1 of them, so k*(k+1) whole-array comparisons decide the match.
    """
    raw = view.shard.topk_ids.transpose(2, 0, 1)  # [k, L, T] captured class ids
    inside = (raw >= 0) & (raw < view.R)
    p = np.take_along_axis(view.router_probs, np.where(inside, raw, 0).astype(np.intp), axis=0)  # [k, L, T]
    lowest_captured = np.where(inside, p, -np.inf).min(axis=0)  # [L, T]
    best_rejected = np.full(lowest_captured.shape, -np.inf, np.float32)
    for j in range(min(view.k + 1, top_ids.shape[0])):  # the k+1 most probable classes
        captured = (top_ids[j][None] == raw).any(axis=0)
        best_rejected = np.where(captured, best_rejected, np.maximum(best_rejected, top_p[j]))
    return inside.all(axis=0) & (lowest_captured >= best_rejected)


def merge(a: ConfidenceState, b: ConfidenceState) -> ConfidenceState:
    if a.layers != b.layers or a.histograms.keys() != b.histograms.keys():
        raise MoescopeError("cannot merge router-confidence states of different layers or router-output availability")
    return ConfidenceState(
        a.layers,
        a.n_tokens + b.n_tokens,
        {key: Histogram(h.edges, h.counts + b.histograms[key].counts) for key, h in a.histograms.items()},
        {key: m.merge(b.moments[key]) for key, m in a.moments.items()},
        a.what_if_k,
        None if a.what_if_load is None else a.what_if_load + b.what_if_load,
        None if a.topk_matches is None else a.topk_matches + b.topk_matches,
    )


@dataclass(frozen=True, eq=False)
class ConfidenceResult:
    layers: tuple[int, ...]
    n_tokens: int
    histograms: dict[str, Histogram]
    moments: dict[str, CoMoments]  # each [L + 1]: per layer, then OVERALL
    what_if_k: tuple[int, ...]
    what_if_load: np.ndarray | None  # int64 [M, L, E]
    topk_match_rate: np.ndarray | None  # float64 [L + 1]
    notes: tuple[str, ...] = ()

    def mean(self, quantity: str) -> np.ndarray:
        """float64 [L + 1] mean of a quantity per layer then overall (NaN when not available)."""
        m = self.moments.get(quantity)
        return np.full(len(self.layers) + 1, np.nan) if m is None else m.mean()

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        per_layer = {"layer": layer_labels(self.layers)}
        for q in ("top1_weight", "top2_weight", "weight_ratio", "selected_entropy", "router_entropy", "margin"):
            per_layer[f"mean_{q}"] = self.mean(q)
        per_layer["std_top1_weight"] = self.moments["top1_weight"].std_x()
        per_layer["topk_matches_router"] = self.topk_match_rate if self.topk_match_rate is not None else np.nan
        rows = []
        for q, h in self.histograms.items():
            counts = np.vstack([h.counts, h.counts.sum(axis=0)])  # [L + 1, B + 2]
            lo = np.concatenate([[-np.inf], h.edges])
            hi = np.concatenate([h.edges, [np.inf]])
            for i, layer in enumerate(layer_labels(self.layers)):
                rows.append(
                    pd.DataFrame({"quantity": q, "layer": layer, "bin_lo": lo, "bin_hi": hi, "count": counts[i]})
                )
        histograms = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
        return {"per_layer": pd.DataFrame(per_layer), "histograms": histograms, "what_if": self._what_if_table()}

    def _what_if_table(self) -> pd.DataFrame:
        if self.what_if_load is None:
            return pd.DataFrame(
                columns=["layer", "top_k", "experts_used", "max_share", "mean_first_weight", "std_first_weight"]
            )
        frames = []
        for i, m in enumerate(self.what_if_k):
            load = np.vstack([self.what_if_load[i], self.what_if_load[i].sum(axis=0)])  # [L + 1, E]
            first = self.moments[f"what_if_top{m}_first_weight"]
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layer_labels(self.layers),
                        "top_k": m,
                        "experts_used": np.append(
                            (self.what_if_load[i] > 0).sum(axis=1), (self.what_if_load[i] > 0).sum()
                        ),
                        "max_share": load.max(axis=1) / np.maximum(load.sum(axis=1), 1),
                        "mean_first_weight": first.mean(),
                        "std_first_weight": first.std_x(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> dict:
        out = {
            "mean_top1_weight": self.mean("top1_weight")[-1],
            "mean_top2_weight": self.mean("top2_weight")[-1],
            "mean_weight_ratio": self.mean("weight_ratio")[-1],
            "mean_router_entropy": self.mean("router_entropy")[-1],
            "mean_margin": self.mean("margin")[-1],
            "topk_matches_router": None if self.topk_match_rate is None else self.topk_match_rate[-1],
            "notes": list(self.notes),
        }
        for m in self.what_if_k if self.what_if_load is not None else ():
            out[f"what_if_top{m}_mean_first_weight"] = self.mean(f"what_if_top{m}_first_weight")[-1]
        return jsonable(out)


def finalize(state: ConfidenceState, ctx: AnalysisContext) -> ConfidenceResult:
    notes = []
    if state.what_if_load is None:
        notes.append(ctx.missing_router_output("routing entropy, margins and what-if top-k"))
    elif ctx.top_k >= ctx.router_width:
        notes.append("k = E: there is no (k+1)-th expert, so no margin")
    rate = None
    if state.topk_matches is not None:
        rate = np.append(state.topk_matches, state.topk_matches.sum() / len(state.layers)) / max(state.n_tokens, 1)
    return ConfidenceResult(
        state.layers,
        state.n_tokens,
        state.histograms,
        {key: m.with_overall() for key, m in state.moments.items()},
        state.what_if_k,
        state.what_if_load,
        rate,
        tuple(notes),
    )
