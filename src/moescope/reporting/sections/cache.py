"""The expert cache and temporal locality."""

from __future__ import annotations

from functools import partial


from moescope.reporting.document import FigureBlock, Section, Text
from moescope.reporting.figures import routing as routing_figs
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_ONLY, _not_run, _notes_block, fmt


def cache_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Expert cache"
    if not r.ran("expert_cache"):
        return Section(sid, title, tuple(_not_run(r, "expert_cache", HINT_ONLY)), ran=False)
    cache = r.table("expert_cache")
    h = r.headline("expert_cache")
    rates = [(k, v) for k, v in h.items() if k.startswith("hit_rate_") and v is not None]
    blocks: list = [Text(
        "Hit rate of a cache holding C experts per layer, filled by LRU alone or by each predictor. "
        + "; ".join(f"{k.removeprefix('hit_rate_').replace('_C', ' at C=')}: {fmt(v, '.1%')}" for k, v in rates[:6])
    )]
    if cache is not None and len(cache):
        blocks.append(FigureBlock("cache_hit_rate", partial(routing_figs.cache_hit_rate, cache, shape["n_experts"], shape["top_k"]),
                                  "Expert cache hit rate against cache size, all layers pooled (bands: range over layers)."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "expert_cache")))


def locality_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Temporal locality"
    if not r.ran("temporal_locality"):
        return Section(sid, title, tuple(_not_run(r, "temporal_locality", HINT_ONLY)), ran=False)
    frame = r.table("temporal_locality")
    h = r.headline("temporal_locality")
    blocks: list = [Text(
        f"Do consecutive tokens of a sequence reuse experts? Same first-choice expert {fmt(h.get('same_first'), '.1%')} "
        f"(×{fmt(h.get('same_first_over_chance'), '.2f')} chance), top-k overlap {fmt(h.get('overlap'), '.1%')} "
        f"(×{fmt(h.get('overlap_over_chance'), '.2f')} chance), over {fmt(h.get('pairs'), ',d')} token pairs."
    )]
    if frame is not None and len(frame) and frame["same_first"].notna().any():
        blocks.append(FigureBlock("temporal_locality", partial(routing_figs.temporal_locality, frame),
                                  "Expert reuse between consecutive tokens per layer, against independent tokens with the same loads."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "temporal_locality")))
