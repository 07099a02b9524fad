"""Domain specialisation: do code, math and prose tokens use different experts?

counts[d, l, e] = slots of domain d's tokens routed to expert e at layer l. Per domain and layer the
distribution p_d(e) = counts / sum_e counts. Between two domains: Jensen-Shannon divergence in bits
(0 = same routing, 1 = disjoint experts) per layer; OVERALL is the mean over layers.
Domain specificity of expert e at layer l for domain d: lift = P(d | e) / P(d), P(d) being d's share of
the layer's slots (1 = no preference; experts with fewer than `min_count` slots are not ranked).
The `domain_pair` of the thresholds (code vs math, as in the seeds) gets a per-expert comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL, AnalysisContext
from moescope.analysis.kernels import expert_counts, js_divergence, jsonable
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "domain_specialisation"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)


@dataclass(frozen=True, eq=False)
class DomainState:
    layers: tuple[int, ...]
    domain_names: tuple[str, ...]
    counts: np.ndarray  # int64 [D, L, E]
    tokens: np.ndarray  # int64 [D]


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> DomainState:
    view = ShardView.of(shard, ctx)
    D = len(view.shard.domain_names)
    domain = view.shard.domain.astype(np.intp)
    if view.T and (domain.min() < 0 or domain.max() >= D):
        raise MoescopeError(f"domain index out of range of the {D} domain names {view.shard.domain_names}")
    counts = expert_counts(view.ids, view.E, group=domain, n_groups=D)  # [D, L, E]
    return DomainState(view.layers, tuple(view.shard.domain_names), counts, np.bincount(domain, minlength=D))


def merge(a: DomainState, b: DomainState) -> DomainState:
    if a.layers != b.layers or a.domain_names != b.domain_names:
        raise MoescopeError("cannot merge domain states with different layers or domain names")
    return DomainState(a.layers, a.domain_names, a.counts + b.counts, a.tokens + b.tokens)


@dataclass(frozen=True, eq=False)
class DomainResult:
    layers: tuple[int, ...]
    domain_names: tuple[str, ...]
    counts: np.ndarray  # int64 [D, L, E]
    tokens: np.ndarray  # int64 [D]
    divergence: pd.DataFrame  # domain_a, domain_b, layer, js_divergence (OVERALL = mean over layers)
    specific: pd.DataFrame  # layer, expert, domain, count, p_expert_given_domain, p_domain_given_expert, lift
    pair_comparison: pd.DataFrame  # layer, expert, share_<a>, share_<b>, difference (for domain_pair)
    top_n: int
    notes: tuple[str, ...] = ()

    def distributions(self) -> pd.DataFrame:
        D, L, E = self.counts.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            share = self.counts / self.counts.sum(axis=2, keepdims=True)
        return pd.DataFrame(
            {
                "domain": np.repeat(self.domain_names, L * E),
                "layer": np.tile(np.repeat(self.layers, E), D),
                "expert": np.tile(np.arange(E), D * L),
                "count": self.counts.ravel(),
                "share": share.ravel(),
            }
        )

    def most_specific(self) -> pd.DataFrame:
        return (
            self.specific.sort_values(["lift", "count"], ascending=False, kind="stable")
            .head(self.top_n)
            .reset_index(drop=True)
        )

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        return {
            "distributions": self.distributions(),
            "divergence": self.divergence,
            "most_specific": self.most_specific(),
            "expert_domain": self.specific,
            "pair_comparison": self.pair_comparison,
        }

    def summary(self) -> dict:
        overall = self.divergence[self.divergence.layer == OVERALL]
        return jsonable(
            {
                "domains": list(self.domain_names),
                "tokens_per_domain": dict(zip(self.domain_names, self.tokens)),
                "js_divergence": {f"{r.domain_a}|{r.domain_b}": r.js_divergence for r in overall.itertuples()},
                "most_specific": self.most_specific()
                .head(10)[["layer", "expert", "domain", "lift"]]
                .to_dict("records"),
                "notes": list(self.notes),
            }
        )


def finalize(state: DomainState, ctx: AnalysisContext) -> DomainResult:
    th = ctx.thresholds
    counts = state.counts
    D, L, E = counts.shape
    present = [d for d in range(D) if counts[d].sum() > 0]
    names = state.domain_names
    rows = []
    for a, b in combinations(present, 2):  # domain pairs (a handful)
        jsd = js_divergence(counts[a], counts[b], axis=1)  # [L]
        rows.append(
            pd.DataFrame(
                {
                    "domain_a": names[a],
                    "domain_b": names[b],
                    "layer": [*state.layers, OVERALL],
                    "js_divergence": np.append(jsd, jsd.mean()),
                }
            )
        )
    divergence = (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["domain_a", "domain_b", "layer", "js_divergence"])
    )

    per_expert = counts.sum(axis=0)  # [L, E]
    domain_share = counts.sum(axis=2) / np.maximum(counts.sum(axis=(0, 2)), 1)  # [D, L]: P(d) per layer
    with np.errstate(invalid="ignore", divide="ignore"):
        p_e_given_d = counts / counts.sum(axis=2, keepdims=True)
        p_d_given_e = counts / per_expert[None]
        lift = p_d_given_e / domain_share[..., None]
    d_idx, l_idx, e_idx = np.meshgrid(np.arange(D), np.arange(L), np.arange(E), indexing="ij")
    keep = (per_expert[None] >= max(th.min_count, 1)) & (domain_share[..., None] > 0)
    keep = np.broadcast_to(keep, counts.shape)
    specific = pd.DataFrame(
        {
            "layer": np.asarray(state.layers)[l_idx[keep]],
            "expert": e_idx[keep],
            "domain": np.asarray(names, dtype=object)[d_idx[keep]],
            "count": counts[keep],
            "p_expert_given_domain": p_e_given_d[keep],
            "p_domain_given_expert": p_d_given_e[keep],
            "lift": lift[keep],
        }
    )
    notes = []
    if len(present) < 2:
        notes.append("fewer than two domains in the trace: no divergence between domains")
    pair = pd.DataFrame()
    a_name, b_name = th.domain_pair
    if a_name in names and b_name in names and counts[names.index(a_name)].sum() and counts[names.index(b_name)].sum():
        share_a = p_e_given_d[names.index(a_name)]
        share_b = p_e_given_d[names.index(b_name)]
        pair = pd.DataFrame(
            {
                "layer": np.repeat(state.layers, E),
                "expert": np.tile(np.arange(E), L),
                f"share_{a_name}": share_a.ravel(),
                f"share_{b_name}": share_b.ravel(),
                "difference": (share_a - share_b).ravel(),
            }
        )
    else:
        notes.append(f"no {a_name}-vs-{b_name} comparison: the trace lacks one of the two domains")
    return DomainResult(state.layers, names, counts, state.tokens, divergence, specific, pair, th.top_n, tuple(notes))
