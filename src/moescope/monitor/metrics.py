"""One recorded training step's routing -> metric rows (step, layer, metric, value); layer -1 pools all layers.

The statistics are the analysis package's (load, aux_losses, router_confidence run on the step's shard),
not a second implementation: load share per expert, load entropy, balance, Switch load-balancing loss and
router z-loss (from the recorded router logits), router entropy and top-k weight statistics.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.result import layer_labels
from moescope.analysis.runner import run_analyses
from moescope.trace.shard import ShardData

ANALYSES = ("load", "aux_losses", "router_confidence")


def _per_layer(results: dict) -> dict[str, np.ndarray]:
    """{metric: float64 [L + 1]} (per layer, then all layers), read from the analyses' result objects (their
    tables would cost more to build than the statistics: histograms, what-if tables)."""
    load, aux, confidence = (results[name] for name in ANALYSES)
    return {
        "load_entropy_norm": load.stats["load_entropy_norm"],
        "balance_score": load.stats["balance_score"],
        "max_load_over_mean": load.stats["max_over_mean"],
        "n_unused": load.stats["n_dead"],
        "aux_loss": aux.load_balancing_loss,
        "z_loss": aux.z_loss,
        "router_entropy": confidence.mean("router_entropy"),
        "top1_weight_mean": confidence.mean("top1_weight"),
        "top1_weight_std": confidence.moments["top1_weight"].std_x(),
        "top2_weight_mean": confidence.mean("top2_weight"),
        "top1_margin_mean": confidence.mean("margin"),
    }


def step_metrics(shard: ShardData, ctx: AnalysisContext, step: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows [step, layer, metric, value], per-expert shares [layer, expert, share]) of one recorded step."""
    results = run_analyses([shard], ctx, only=list(ANALYSES))
    metrics = _per_layer(results)
    metrics["router_entropy_norm"] = metrics["router_entropy"] / math.log(ctx.n_experts)  # relative to its maximum
    labels = np.array(layer_labels(results["load"].layers), dtype=np.int64)  # [L + 1]: ..., -1
    share = results["load"].share  # [L, E]
    L, E = share.shape
    names = [name for name, values in metrics.items() if np.isfinite(values).any()]
    rows = pd.DataFrame({
        "step": step,
        "layer": np.concatenate([np.tile(labels, len(names)), np.repeat(labels[:L], E)]),
        "metric": np.concatenate([np.repeat(np.array(names, dtype=object), len(labels)),
                                  np.array([f"load_share/{e}" for e in range(E)] * L, dtype=object)]),
        "value": np.concatenate([*(np.asarray(metrics[n], dtype=np.float64) for n in names), share.ravel()]),
    })
    experts = pd.DataFrame({"layer": np.repeat(labels[:L], E), "expert": np.tile(np.arange(E), L), "share": share.ravel()})
    return rows, experts
