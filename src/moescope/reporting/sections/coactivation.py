"""Which experts fire together."""

from __future__ import annotations

from functools import partial

import pandas as pd

from moescope.reporting.document import FigureBlock, Notes, Section, TableBlock, Text
from moescope.reporting.figures import routing as routing_figs
from moescope.reporting.figures._base import OVERALL, facet_layers
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_ONLY, _not_run, _notes_block, fmt


def coactivation_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Co-activation"
    if not r.ran("coactivation"):
        return Section(sid, title, tuple(_not_run(r, "coactivation", HINT_ONLY)), ran=False)
    facets = [OVERALL, *facet_layers(shape["layers"], 3)] if len(shape["layers"]) > 1 else facet_layers(shape["layers"], 1)
    pairs = r.table("coactivation", "pairs", where={"layer": tuple(facets)})
    h = r.headline("coactivation")
    if pairs is None or not len(pairs):
        return Section(sid, title, (Notes((*r.notes("coactivation"), "no expert pairs (top-1 routing)"), "missing"),), ran=False)
    blocks: list = [Text(
        f"How often two experts are chosen for the same token, relative to independent choice (lift; ×1 = independent). "
        f"Largest lift {fmt(h.get('max_lift'))}, mean {fmt(h.get('mean_lift'))}."
    )]
    blocks.append(FigureBlock("coactivation", partial(routing_figs.coactivation_heatmaps, pairs, facets, shape["n_experts"]),
                              "Co-activation lift of each expert pair (all layers pooled, then single layers; grey: never chosen together)."))
    frequent = h.get("most_frequent_pairs") or []
    if frequent:
        blocks.append(TableBlock(pd.DataFrame(frequent), "Most frequent expert pairs (share of tokens choosing both).",
                                 formats={"rate": ".2%", "lift": ".2f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "coactivation")))
