"""One recorded training step's routing -> metric rows (step, layer, metric, value); layer -1 pools all layers.

The statistics are the analysis package's (load, aux_losses, router_confidence run on the step's shard),
not a second implementation: load share per expert, load entropy, balance, Switch load-balancing loss and
router z-loss (from the recorded router logits), router entropy and top-k weight statistics.
"""

from __future__ import annotations

import math

import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.runner import run_analyses
from moescope.trace.shard import ShardData

ANALYSES = ("load", "aux_losses", "router_confidence")
# (analysis, table column) -> metric name
PER_LAYER = {
    ("load", "load_entropy_norm"): "load_entropy_norm",
    ("load", "balance_score"): "balance_score",
    ("load", "max_over_mean"): "max_load_over_mean",
    ("load", "n_dead"): "n_unused",
    ("aux_losses", "load_balancing_loss"): "aux_loss",
    ("aux_losses", "z_loss"): "z_loss",
    ("router_confidence", "mean_router_entropy"): "router_entropy",
    ("router_confidence", "mean_top1_weight"): "top1_weight_mean",
    ("router_confidence", "std_top1_weight"): "top1_weight_std",
    ("router_confidence", "mean_top2_weight"): "top2_weight_mean",
    ("router_confidence", "mean_margin"): "top1_margin_mean",
}


def step_metrics(shard: ShardData, ctx: AnalysisContext, step: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows [step, layer, metric, value], per-expert shares [layer, expert, share]) of one recorded step."""
    results = run_analyses([shard], ctx, only=list(ANALYSES))
    frames = []
    for (analysis, column), metric in PER_LAYER.items():
        table = results[analysis].to_pandas()["per_layer"]
        if column in table and table[column].notna().any():
            frames.append(pd.DataFrame({"layer": table["layer"], "metric": metric, "value": table[column].astype(float)}))
    per_layer = pd.concat(frames, ignore_index=True)
    entropy = per_layer[per_layer["metric"] == "router_entropy"]
    if len(entropy):  # relative to its maximum, log E
        frames.append(entropy.assign(metric="router_entropy_norm", value=entropy["value"] / math.log(ctx.n_experts)))
    experts = results["load"].to_pandas()["per_expert"][["layer", "expert", "share"]]
    shares = pd.DataFrame({"layer": experts["layer"], "metric": "load_share/" + experts["expert"].astype(str),
                           "value": experts["share"].astype(float)})
    rows = pd.concat([*frames, shares], ignore_index=True)
    rows.insert(0, "step", step)
    return rows, experts
