"""Expert load and the auxiliary losses."""

from __future__ import annotations

from functools import partial

import pandas as pd

from moescope.reporting.document import FigureBlock, Notes, Section, TableBlock, Text
from moescope.reporting.figures import load as load_figs
from moescope.reporting.figures._base import OVERALL, facet_layers
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_ONLY, HINT_ROUTER_OUTPUT, _not_run, _notes_block, fmt


def load_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    if not r.ran("load"):
        return Section(sid, "Expert load", tuple(_not_run(r, "load", HINT_ONLY)), ran=False)
    per_expert, per_layer = r.table("load", "per_expert"), r.table("load", "per_layer")
    h = r.headline("load")
    blocks: list = [Text(
        f"Share of each layer's routing slots per expert against the balanced share 1/E. Per layer, the balance score "
        f"(1 − coefficient of variation of the layer's expert loads; 1 is perfectly even) is {fmt(h.get('balance_score_worst'))} "
        f"in the worst layer ({fmt(h.get('balance_score_worst_layer'), 'd')}) and {fmt(h.get('balance_score_layer_mean'))} on average "
        f"over layers; the busiest expert takes {fmt(h.get('max_over_mean_worst'))}× its layer's mean load (layer "
        f"{fmt(h.get('max_over_mean_worst_layer'), 'd')}). Pooled over all layer × expert units the balance score is "
        f"{fmt(h.get('balance_score_pooled'))}. {fmt(h.get('n_dead'), 'd')} dead, {fmt(h.get('n_underused'), 'd')} under-used "
        f"and {fmt(h.get('n_overloaded'), 'd')} overloaded (layer, expert) units."
    )]
    if h.get("non_compute_share"):  # LongCat's identity experts, ZAYA's skip: router choices that are not experts
        blocks.append(Text(
            f"{fmt(h['non_compute_share'], '.1%')} of all routing slots went to non-compute choices "
            f"({', '.join(h.get('non_compute_kinds') or ['non-compute'])}): they are no expert's load and are left out of "
            "the shares and statistics here (per layer: column non_compute_share of the per-layer table)."
        ))
    if per_expert is None or not len(per_expert):
        return Section(sid, "Expert load", tuple(blocks + [Notes(("load tables missing from the results folder",), "missing")]))
    facets = _worst_first(per_layer, facet_layers(shape["layers"], 4))
    blocks.append(FigureBlock("load_bars", partial(load_figs.load_bars, per_expert, facets),
                              "Expert load per layer (bars: share of slots; dashed: expected 1/E; colour: status)."
                              + ("" if len(facets) == len(shape["layers"]) else f" Layers shown: {', '.join(map(str, facets))} of {len(shape['layers'])} (see the heatmap for all).")))
    blocks.append(FigureBlock("load_heatmap", partial(load_figs.load_heatmap, per_expert),
                              "Load / expected load for every layer and expert, log colour scale (red: overloaded, blue: under-used, black: dead)."))
    blocks.append(FigureBlock("load_histogram", partial(load_figs.load_histogram, per_expert), "How many experts carry each multiple of the expected load."))
    if per_layer is not None and len(shape["layers"]) > 1:
        blocks.append(FigureBlock("load_balance_per_layer", partial(load_figs.layer_balance, per_layer), "Balance statistics per layer; dashed: all layers pooled."))
    flagged = per_expert[per_expert["status"].astype(str) != "ok"]
    if len(flagged):
        top = flagged.sort_values(["load_over_expected", "layer", "expert"], ascending=[False, True, True], kind="stable")
        shown = pd.concat([top.head(10), top.tail(10)]).drop_duplicates(["layer", "expert"])
        blocks.append(TableBlock(shown[["layer", "expert", "count", "share", "load_over_expected", "status"]].reset_index(drop=True),
                                 f"Experts outside the thresholds: the {min(len(top), 10)} most and least loaded of {len(flagged)}.",
                                 formats={"count": ",d", "share": ".2%", "load_over_expected": ".2f"}, total_rows=len(flagged)))
    return Section(sid, "Expert load", tuple(blocks + _notes_block(r, "load")))


def _worst_first(per_layer: pd.DataFrame | None, facets: list[int]) -> list[int]:
    """Facet layers, with the most imbalanced layer swapped in when it is not among them."""
    if per_layer is None or not len(per_layer) or not facets:
        return facets
    rows = per_layer[per_layer["layer"] != OVERALL]
    if not rows["max_over_mean"].notna().any():
        return facets
    worst = int(rows.loc[rows["max_over_mean"].idxmax(), "layer"])
    if worst in facets:
        return facets
    return sorted([*facets[:-2], worst, facets[-1]]) if len(facets) >= 3 else sorted({*facets, worst})


def aux_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Auxiliary losses"
    if not r.ran("aux_losses"):
        return Section(sid, title, tuple(_not_run(r, "aux_losses", HINT_ROUTER_OUTPUT)), ran=False)
    per_layer = r.table("aux_losses", "per_layer")
    h = r.headline("aux_losses")
    if per_layer is None or not per_layer[["load_balancing_loss", "z_loss"]].notna().any().any():
        return Section(sid, title, (Notes((*r.notes("aux_losses"), HINT_ROUTER_OUTPUT), "missing"),), ran=False)
    blocks: list = [Text(
        f"Switch-Transformer load-balancing loss E·Σ f_i·P_i per layer (perfectly balanced = k = "
        f"{fmt(h.get('load_balancing_loss_balanced'), 'g')}): {fmt(h.get('load_balancing_loss_worst'), '.4g')} in the worst layer "
        f"({fmt(h.get('load_balancing_loss_worst_layer'), 'd')}), {fmt(h.get('load_balancing_loss_layer_mean'), '.4g')} on average "
        f"over layers. Pooled over all layers, as transformers' load_balancing_loss_func computes it from every layer's "
        f"logits at once: {fmt(h.get('load_balancing_loss_pooled_transformers'), '.4g')} (pooling averages away layers that "
        f"prefer different experts). Router z-loss {fmt(h.get('z_loss'), '.4g')}."
    )]
    blocks.append(FigureBlock("aux_losses_per_layer", partial(load_figs.aux_losses_per_layer, per_layer, shape["top_k"]), "Auxiliary losses per layer."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "aux_losses")))
