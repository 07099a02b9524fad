"""How code, math and prose route differently."""

from __future__ import annotations

from functools import partial


from moescope.reporting.document import FigureBlock, Notes, Section, TableBlock, Text
from moescope.reporting.figures import domains as domain_figs
from moescope.reporting.figures._base import facet_layers
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_ONLY, _not_run, _notes_block, fmt


def domain_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Domain specialisation"
    if not r.ran("domain_specialisation"):
        return Section(sid, title, tuple(_not_run(r, "domain_specialisation", HINT_ONLY)), ran=False)
    dist, div, pair, specific = (r.table("domain_specialisation", t) for t in ("distributions", "divergence", "pair_comparison", "most_specific"))
    h = r.headline("domain_specialisation")
    domains = h.get("domains") or []
    tokens = h.get("tokens_per_domain") or {}
    js = h.get("js_divergence") or {}
    blocks: list = [Text(
        "Do different kinds of text use different experts? Domains: "
        + (", ".join(f"{d} ({fmt(tokens.get(d), ',d')} tokens)" for d in domains) or "none recorded") + ". "
        + ("Mean Jensen-Shannon divergence: " + ", ".join(f"{k.replace('|', ' vs ')} {fmt(v, '.3f')} bits" for k, v in js.items()) + "." if js else "")
    )]
    present = [d for d in domains if tokens.get(d)]
    if len(present) < 2:
        blocks.append(Notes(("Fewer than two domains in the trace: capture a corpus that mixes domains "
                             "(e.g. --data humaneval,gsm-symbolic,wiki) to compare them.",), "missing"))
    if dist is not None and len(dist) and len(present) >= 2:
        facets = facet_layers(shape["layers"], 3)
        blocks.append(FigureBlock("domain_load", partial(domain_figs.domain_load, dist, facets, shape["n_experts"]),
                                  "Each domain's expert load (share of the domain's slots per expert)."))
    if div is not None and len(div):
        blocks.append(FigureBlock("domain_divergence", partial(domain_figs.domain_divergence, div), "Divergence between domains per layer."))
    if pair is not None and len(pair):
        a, b = [c.removeprefix("share_") for c in pair.columns if c.startswith("share_")][:2]
        blocks.append(FigureBlock("domain_pair_difference", partial(domain_figs.domain_pair_difference, pair, a, b),
                                  f"{a} minus {b}: share of each domain's slots per expert, every layer."))
    if specific is not None and len(specific) and len(present) >= 2:
        blocks.append(TableBlock(specific.head(15).reset_index(drop=True), "Most domain-specific experts (lift = P(domain | expert) / P(domain)).",
                                 formats={"count": ",d", "p_expert_given_domain": ".2%", "p_domain_given_expert": ".2%", "lift": ".2f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "domain_specialisation")))
