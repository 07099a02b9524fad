"""The systems sections: expert placement over GPUs and offloading."""

from __future__ import annotations

from functools import partial


from moescope.reporting.document import FigureBlock, Notes, Section, TableBlock, Text
from moescope.reporting.figures import simulate as simulate_figs
from moescope.reporting.figures._base import OVERALL
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.simulate_bounds import offload_bound_blocks, placement_beyond_blocks
from moescope.reporting.sections.common import HINT_OFFLOAD, HINT_ONLY, _not_run, _notes_block, fmt, slug


def placement_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Expert placement"
    if not r.ran("placement"):
        return Section(sid, title, tuple(_not_run(r, "placement", HINT_ONLY)), ran=False)
    h = r.headline("placement")
    per_layer, gpu_load, stale = (r.table("placement", t) for t in ("per_layer", "gpu_load", "staleness"))
    policy = "hierarchical" if h.get("eplb_policy") == "hierarchical" else "global"
    blocks: list = [Text(
        f"The trace's load placed on {fmt(h.get('gpus'), 'd')} GPUs ({fmt(h.get('nodes'), 'd')} node(s), "
        f"{fmt(h.get('redundant'), 'd')} redundant slots per layer; DeepSeek EPLB's {policy} policy with "
        f"{fmt(h.get('groups'), 'd')} expert groups). Balancedness (mean / max GPU load, all layers): before, static sharding "
        f"{fmt(h.get('balancedness_static'), '.3f')}; after, greedy {fmt(h.get('balancedness_greedy'), '.3f')} and EPLB "
        f"{fmt(h.get('balancedness_eplb'), '.3f')} (imbalance max / mean − 1: {fmt(h.get('imbalance_static'), '.3f')} → "
        f"{fmt(h.get('imbalance_greedy'), '.3f')}, {fmt(h.get('imbalance_eplb'), '.3f')})."
    )]
    if per_layer is not None and len(per_layer):
        blocks.append(FigureBlock("placement_balancedness", partial(simulate_figs.placement_balancedness, per_layer),
                                  "Balancedness per layer of each placement (dashed: static sharding, before rebalancing)."))
    if gpu_load is not None and len(gpu_load):
        blocks.append(FigureBlock("placement_gpu_load", partial(simulate_figs.gpu_load_heatmaps, gpu_load),
                                  "Tokens each GPU serves per layer, relative to the layer's mean (red: busier; a replicated "
                                  "expert's tokens are split evenly over its replicas)."))
    if stale is not None and len(stale):
        blocks.append(FigureBlock("placement_staleness", partial(simulate_figs.staleness, stale),
                                  "Balancedness when each window is served by the placement of the window before it."))
    if per_layer is not None and len(per_layer):
        pooled = per_layer[per_layer["layer"] == OVERALL]
        columns = ["policy", "balancedness", "imbalance", "mean_gpus_per_token", "mean_nodes_per_token"]
        blocks.append(TableBlock(pooled[columns].reset_index(drop=True), "All layers: balance and all-to-all fan-out "
                                 "(distinct GPUs and nodes a token's experts are on; from `moescope placement`).",
                                 formats={"balancedness": ".3f", "imbalance": ".3f", "mean_gpus_per_token": ".2f",
                                          "mean_nodes_per_token": ".2f"}))
    blocks += placement_beyond_blocks(r)
    return Section(sid, title, tuple(blocks + _notes_block(r, "placement")))


def offload_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Expert offloading"
    if not r.ran("offload"):
        return Section(sid, title, (Notes(("Expert offloading was not simulated for this trace.", HINT_OFFLOAD), "missing"),), ran=False)
    h = r.headline("offload")
    hit_rate, sweep, cost = (r.table("offload", t) for t in ("hit_rate", "bandwidth_sweep", "cost"))
    capacity, phases = h.get("capacity"), h.get("phases") or ["prefill"]
    rates = [(k.removeprefix("hit_rate_"), v) for k, v in h.items() if k.startswith("hit_rate_") and v is not None]
    bounds = [(k.removeprefix("decode_tokens_per_s_bound_"), v) for k, v in h.items() if k.startswith("decode_tokens_per_s_bound_")]
    blocks: list = [Text(
        f"A cache of expert slots ({h.get('scope')} scope) replayed on the trace, cold at each sequence start; experts of "
        f"{fmt(h.get('expert_bytes'), ',.0f')} bytes over {h.get('link')}. Hit rate at {fmt(capacity, 'd')} slots: "
        + "; ".join(f"{name.replace('_', ' ')} {fmt(v, '.1%')}" for name, v in rates[:8])
        + ("." if not bounds else ". Decode tokens/s the link allows: " + "; ".join(f"{n.replace('_', ' ')} {fmt(v, ',.0f')}" for n, v in bounds[:4]) + ".")
    )]
    if hit_rate is not None and len(hit_rate):
        for phase in phases:
            blocks.append(FigureBlock(f"offload_hit_rate_{slug(phase)}", partial(simulate_figs.hit_rate_vs_capacity, hit_rate, phase),
                                      f"Hit rate against cache size, {phase} tokens, all layers (dashed: Belady, the offline optimum)."))
    if sweep is not None and len(sweep) and capacity is not None:
        phase = "decode" if "decode" in phases else phases[0]
        latency = float(sweep["latency_us"].iloc[0])
        blocks.append(FigureBlock("offload_stall_bandwidth", partial(simulate_figs.stall_vs_bandwidth, sweep, int(capacity), phase, latency),
                                  f"Stall per {phase} token against link bandwidth at {capacity} slots."))
    if cost is not None and len(cost):
        chosen = cost[(cost["link"] == h.get("link")) & (cost["capacity"] == capacity)]
        columns = ["policy", "prefetch", "phase", "stall_s_per_token", "link_s_per_token", "tokens_per_s_bound", "bytes_per_token"]
        blocks.append(TableBlock(chosen[columns].reset_index(drop=True), f"Cost per token on {h.get('link')} at {capacity} slots "
                                 "(stall: experts fetched on demand; link: all moved, prefetches included; the bound excludes compute).",
                                 formats={"stall_s_per_token": ".3g", "link_s_per_token": ".3g", "tokens_per_s_bound": ",.0f",
                                          "bytes_per_token": ",.0f"}))
    blocks += offload_bound_blocks(r)
    return Section(sid, title, tuple(blocks + _notes_block(r, "offload")))
