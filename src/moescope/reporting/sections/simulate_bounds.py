"""Blocks the offloading and placement sections add for the questions past one cache and one static EPLB:
coverage and the oracle gap (`moescope offload`), the lossy-routing quality frontier (`--lossy`), fan-out at each
placement's balance, replica budgets, the LP split bound and decode batches (`moescope placement`). Each
returns [] when its tables are absent (an `analyze` folder, an older results folder)."""

from __future__ import annotations

from functools import partial

from moescope.reporting.document import FigureBlock, TableBlock, Text
from moescope.reporting.figures import simulate_bounds as figs
from moescope.reporting.figures._base import OVERALL
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import fmt


def _present(table) -> bool:
    return table is not None and len(table) > 0


def offload_bound_blocks(r: AnalysisResults) -> list:
    blocks: list = []
    h = r.headline("offload")
    coverage, curve, gap = (r.table("offload", t) for t in ("coverage", "coverage_curve", "oracle_gap"))
    if _present(coverage):
        blocks.append(Text(
            "How much a cache has to hold, per layer: the effective number of experts (exp of the entropy of the layer's "
            f"lookup shares) averages {fmt(h.get('mean_effective_experts_prefill'), '.1f')} in prefill; "
            f"{fmt(h.get('mean_experts_for_90_prefill'), '.1f')} experts serve 90 % of lookups; a window of "
            f"{fmt(coverage['window'].iloc[0], 'd')} tokens touches {fmt(h.get('mean_working_set_prefill'), '.1f')} distinct experts."))
        if _present(curve):
            blocks.append(FigureBlock("offload_coverage", partial(figs.coverage_curve, curve),
                                      "Coverage curve: the share of a layer's lookups its n most used experts serve."))
        columns = ["phase", "layer", "lookups", "effective_experts", "experts_for_50", "experts_for_90", "experts_for_99",
                   "working_set"]
        blocks.append(TableBlock(coverage[columns].reset_index(drop=True), "Coverage per layer and phase.",
                                 formats={"effective_experts": ".2f", "working_set": ".2f"}))
    if _present(gap):
        blocks.append(FigureBlock("offload_oracle_gap", partial(figs.oracle_gap, gap),
                                  "Per capacity: Belady and the best fixed set in hindsight (dashed) against the best policy an "
                                  "engine can run, LRU, the pinned set learned on the other fold, and a random fixed set."))
        columns = ["prefetch", "capacity", "phase", "belady", "best_realisable_policy", "best_realisable", "oracle_gap",
                   "best_oracle_gap", "static_minus_lru", "random_set"]
        blocks.append(TableBlock(gap[columns].reset_index(drop=True), "Oracle gap per capacity (Belady keeps every expert it "
                                 "fetches; a pinned set streams its misses, so static-oracle can beat it: best_oracle_gap "
                                 "uses the better of the two).",
                                 formats={c: ".3f" for c in columns[3:] if c != "best_realisable_policy"}))
    lossy = r.table("offload", "lossy")
    if _present(lossy):
        blocks.append(FigureBlock("offload_quality_frontier", partial(figs.quality_frontier, lossy),
                                  "Cache-aware lossy routing: hit rate against its cost per knob (ΔNLL ± standard error when "
                                  "the model ran with that routing, else the router weight discarded); one point per capacity."))
        pooled = lossy[lossy["layer"] == OVERALL]
        columns = [c for c in ("source", "knob", "capacity", "phase", "hit_rate", "bytes_moved", "weight_discarded",
                               "delta_nll", "delta_nll_se") if c in pooled]
        blocks.append(TableBlock(pooled[columns].reset_index(drop=True), "Lossy knobs, all layers.",
                                 formats={"hit_rate": ".3f", "bytes_moved": ",.0f", "weight_discarded": ".4f",
                                          "delta_nll": ".4f", "delta_nll_se": ".4f"}))
    return blocks


def placement_beyond_blocks(r: AnalysisResults) -> list:
    blocks: list = []
    h = r.headline("placement")
    per_layer, budget, split, decode = (r.table("placement", t) for t in ("per_layer", "budget", "split", "decode_batches"))
    if _present(per_layer) and per_layer["mean_gpus_per_token"].notna().any():
        blocks.append(FigureBlock("placement_fanout_balance", partial(figs.fanout_vs_balance, per_layer),
                                  "Fan-out against balance: co-activation keeps experts chosen together on one GPU."))
    if _present(budget):
        blocks.append(Text(
            f"Replica budgets: the same {fmt(budget['redundant_uniform'].iloc[-1], 'd')} redundant slots spread over the "
            f"layers where they lower the busiest GPU most give balancedness "
            f"{fmt(h.get('balancedness_eplb_replica_budget'), '.3f')}, against {fmt(h.get('balancedness_eplb_uniform_replicas'), '.3f')} "
            "with the same count in every layer (EPLB places each layer)."))
        blocks.append(TableBlock(budget.reset_index(drop=True), "Redundant slots per layer: uniform against the budget.",
                                 formats={"mean_gpu_load": ",.0f", "busiest_gpu_uniform": ",.0f", "busiest_gpu_budget": ",.0f",
                                          "balancedness_uniform": ".3f", "balancedness_budget": ".3f"}))
    if _present(split):
        blocks.append(FigureBlock("placement_split_bound", partial(figs.split_bound, split),
                                  "Each window served by the previous window's placement: tokens split evenly over replicas "
                                  "(engines today) against the best split the LP finds (LPLB's bound)."))
    if _present(decode):
        blocks.append(FigureBlock("placement_decode_batches", partial(figs.decode_batches, decode),
                                  "Distinct experts a decode batch reads per layer: random batches (expectation) against "
                                  "batches grouped by the requests' prefill routing."))
    return blocks
