"""How predictable layer N+k is from layer N."""

from __future__ import annotations

from functools import partial


from moescope.reporting.document import FigureBlock, Notes, Section, Text
from moescope.reporting.figures import routing as routing_figs
from moescope.reporting.figures._base import facet_layers
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_LOOKAHEAD, HINT_ONLY, _not_run, _notes_block, fmt


def cross_layer_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Cross-layer predictability"
    if not r.ran("cross_layer"):
        return Section(sid, title, tuple(_not_run(r, "cross_layer", HINT_ONLY)), ran=False)
    sources = facet_layers(shape["layers"][:-1], 4)
    transitions = r.table("cross_layer", "transitions", where={"hop": (1,), "source_layer": tuple(sources)})
    recall, overall = r.table("cross_layer", "recall"), r.table("cross_layer", "recall_overall")
    h = r.headline("cross_layer")
    best = h.get("best_predictor_hop1")
    best_recall = h.get(f"recall_{best}_hop{0 if best == 'previous_token' else 1}") if best else None
    versus = [str(v) for v in h.get("versus_popularity") or []]
    blocks: list = [Text(
        "How well one layer's routing predicts the next layers' (for speculative expert prefetching). "
        + (f"Best predictor for the next layer: {routing_figs.PREDICTOR_LABELS.get(best, best)} with recall {fmt(best_recall, '.1%')} "
           f"(chance {fmt(shape['top_k'] / max(shape['n_experts'], 1), '.1%')}). " if best else "")
        + ("Against the static baseline (the k most-loaded experts of the predicted layer, learned on the other fold of "
           "documents): " + "; ".join(versus) + "." if versus else "")
    )]
    if len(shape["layers"]) < 2:
        blocks.append(Notes(("one MoE layer: no cross-layer transitions",), "missing"))
    if transitions is not None and len(transitions):
        blocks.append(FigureBlock("transitions", partial(routing_figs.transition_heatmaps, transitions, sources, shape["n_experts"]),
                                  "P(expert at layer N+1 | expert at layer N): a bright diagonal means experts keep their index."))
    if overall is not None and len(overall):
        blocks.append(FigureBlock("recall_vs_hop", partial(routing_figs.recall_vs_hop, overall, shape["top_k"], shape["n_experts"]),
                                  "Recall@k of each predictor against the hop distance, all layers pooled."))
    if recall is not None and len(recall) and len(shape["layers"]) > 2:
        blocks.append(FigureBlock("recall_per_layer", partial(routing_figs.recall_per_layer, recall, shape["top_k"]),
                                  "Recall per predicted layer."))
    if overall is not None and not (overall["predictor"] == "router_lookahead").any():
        blocks.append(Notes((f"The router-lookahead predictor needs the next layer's router run during capture: {HINT_LOOKAHEAD}.",), "missing"))
    return Section(sid, title, tuple(blocks + _notes_block(r, "cross_layer")))
