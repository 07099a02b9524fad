"""Router weight structure and router confidence."""

from __future__ import annotations

import math
from functools import partial


from moescope.reporting.document import FigureBlock, Notes, Section, TableBlock, Text
from moescope.reporting.figures import router as router_figs
from moescope.reporting.figures._base import facet_layers
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_MODEL, HINT_ONLY, HINT_ROUTER_OUTPUT, _not_run, _notes_block, fmt


def router_structure_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Router weight structure"
    if not r.ran("router_structure"):
        return Section(sid, title, (Notes(("Router weights were not analysed.", *r.notes("router_structure"), HINT_MODEL), "missing"),), ran=False)
    per_expert, pairs = r.table("router_structure", "per_expert"), r.table("router_structure", "pairs")
    h = r.headline("router_structure")
    blocks: list = [Text(
        f"Each expert's row of the router matrix: its L2 norm and spread, and how similar experts' rows are "
        f"(cosine). Mean off-diagonal cosine {fmt(h.get('mean_offdiagonal_cosine'))}, largest {fmt(h.get('max_offdiagonal_cosine'))}; "
        f"norm CV {fmt(h.get('norm_cv'))}."
    )]
    facets = facet_layers(shape["layers"], 3)
    if per_expert is not None and len(per_expert):
        blocks.append(FigureBlock("router_weight_norms", partial(router_figs.router_weight_stats, per_expert, facets),
                                  "Router weight L2 norm and standard deviation per expert (dashed: the layer's mean)."))
        if len(shape["layers"]) > len(facets):
            blocks.append(FigureBlock("router_weight_heatmaps", partial(router_figs.router_weight_heatmaps, per_expert),
                                      "Router weight norm and standard deviation, every layer and expert."))
    if pairs is not None and len(pairs):
        blocks.append(FigureBlock("router_cosine", partial(router_figs.cosine_matrices, pairs, facets, shape["n_experts"]),
                                  "Cosine similarity between experts' router vectors (red: alike, blue: opposed)."))
        if len(shape["layers"]) > 1:
            blocks.append(FigureBlock("router_cosine_per_layer", partial(router_figs.cosine_by_layer, pairs), "Router cosine similarity per layer."))
        top = pairs.sort_values(["cosine", "layer", "expert_a", "expert_b"], ascending=[False, True, True, True], kind="stable").head(10)
        blocks.append(TableBlock(top[["layer", "expert_a", "expert_b", "cosine"]].reset_index(drop=True),
                                 "Most similar expert pairs (router vectors).", formats={"cosine": ".3f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "router_structure")))


def confidence_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Router confidence"
    if not r.ran("router_confidence"):
        return Section(sid, title, tuple(_not_run(r, "router_confidence", HINT_ONLY)), ran=False)
    hist, per_layer, what_if = (r.table("router_confidence", t) for t in ("histograms", "per_layer", "what_if"))
    h = r.headline("router_confidence")
    entropy = h.get("mean_router_entropy")
    blocks: list = [Text(
        f"How decisively the router picks its experts. Mean first-expert weight {fmt(h.get('mean_top1_weight'))}, "
        f"second {fmt(h.get('mean_top2_weight'))}; mean routing entropy "
        + (f"{fmt(entropy)} nats (uniform over {shape['n_experts']} experts: {math.log(max(shape['n_experts'], 1)):.3g})" if entropy is not None else "not available (no router outputs)")
        + (f"; the captured top-k equals the top-k of the router output for {fmt(h.get('topk_matches_router'), '.1%')} of tokens." if h.get("topk_matches_router") is not None else ".")
    )]
    if hist is not None and router_figs.has_quantity(hist, "top1_weight"):
        blocks.append(FigureBlock("gate_weights", partial(router_figs.gate_weight_distributions, hist),
                                  "Gate weights of the first and second expert and their ratio, all layers pooled."))
    if hist is not None and router_figs.has_quantity(hist, "router_entropy"):
        blocks.append(FigureBlock("router_entropy", partial(router_figs.router_distribution, hist, shape["n_experts"], shape["top_k"]),
                                  "Entropy of the full router distribution, and the margin that decided the last expert."))
    else:
        blocks.append(Notes((f"Routing entropy over all experts, margins and what-if top-k need router outputs: {HINT_ROUTER_OUTPUT}.",), "missing"))
    if per_layer is not None and len(per_layer):
        blocks.append(FigureBlock("entropy_per_layer", partial(router_figs.entropy_per_layer, per_layer, shape["n_experts"], shape["top_k"]),
                                  "Mean routing entropy and gate weights per layer."))
    if what_if is not None and len(what_if):
        blocks.append(FigureBlock("what_if_top_k", partial(router_figs.what_if_top_k, what_if, shape["n_experts"], shape["top_k"]),
                                  "What top-m routing of the same router outputs would do (orange: the model's k)."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "router_confidence")))
