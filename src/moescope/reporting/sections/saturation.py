"""Router saturation across checkpoints."""

from __future__ import annotations

from functools import partial


from moescope.reporting.document import FigureBlock, Group, KeyValues, Notes, Section, TableBlock, Text
from moescope.reporting.figures import saturation as saturation_figs
from moescope.reporting.results import SaturationResults
from moescope.reporting.sections.common import _guarded, fmt


# -- router saturation across checkpoints ----------------------------------------------------------------
def saturation_group(r: SaturationResults, gid: str, label: str) -> Group:
    s = r.summary.get("saturation") or {}
    header = KeyValues((("final checkpoint", str(s.get("final"))), ("checkpoints", fmt(len(s.get("checkpoints") or {}), "d")),
                        ("tokens", fmt(s.get("tokens"), ",d")), ("MoE layers, top-k", f"{s.get('moe_layers')}, top-{s.get('top_k')}")))
    return Group(gid, label, "router saturation across checkpoints", header,
                 (_guarded(partial(saturation_section, r, f"{gid}-saturation"), f"{gid}-saturation", "Router saturation"),))


def saturation_section(r: SaturationResults, sid: str) -> Section:
    title = "Router saturation"
    per_layer = r.per_layer
    if per_layer is None or not len(per_layer):
        return Section(sid, title, (Notes(("saturation table missing from the results folder",), "missing"),), ran=False)
    s = r.summary.get("saturation") or {}
    pooled = per_layer[per_layer["layer"] == -1].sort_values("order")
    first = pooled.iloc[0]
    blocks: list = [Text(
        f"How much of each checkpoint's routing is already the final checkpoint's, on the same {fmt(s.get('tokens'), ',d')} tokens "
        f"(as OLMoE measured it): top-1 agreement (same first choice) and top-k overlap (|∩|/k). The earliest checkpoint, "
        f"{first['checkpoint']}, agrees on {fmt(first['top1_agreement'], '.1%')} of first choices and shares "
        f"{fmt(first['topk_overlap'], '.1%')} of its top-{s.get('top_k')} experts with the final one (all layers).")]
    blocks.append(FigureBlock("saturation", partial(saturation_figs.saturation_curves, per_layer, str(s.get("x") or "checkpoint")),
                              "Agreement with the final checkpoint per checkpoint; one line per MoE layer, thick: all layers pooled."))
    table = per_layer[per_layer["layer"] == -1][["checkpoint", "step", "tokens", "top1_agreement", "topk_overlap"]]
    blocks.append(TableBlock(table.reset_index(drop=True), "All layers pooled, per checkpoint.",
                             formats={"tokens": ",d", "top1_agreement": ".1%", "topk_overlap": ".1%"}))
    return Section(sid, title, tuple(blocks))
