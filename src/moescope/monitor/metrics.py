"""One recorded training step's routing -> metric rows (step, layer, metric, value); layer -1 pools all layers.

The statistics are the analysis package's (load, aux_losses, router_confidence run on the step's shard),
not a second implementation: load share per expert, load entropy, balance, Switch load-balancing loss and
router z-loss (from the recorded router logits), router entropy and top-k weight statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class StepMetrics:
    """One recorded step's statistics: per layer, then all layers pooled (label -1)."""

    labels: np.ndarray  # int64 [L + 1]: the MoE layers' indices, then -1
    values: dict[str, np.ndarray]  # {metric: float64 [L + 1]}
    share: np.ndarray  # float64 [L, E]: each expert's share of its layer's routing slots

    def rows(self, step: int, per_layer: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
        """Rows [step, layer, metric, value]: the metrics (those finite anywhere), each expert's load share
        (`load_share/<e>`), then `per_layer` extras ({metric: [L]}, no pooled value)."""
        L, E = self.share.shape
        names = [name for name, values in self.values.items() if np.isfinite(values).any()]
        extra = per_layer or {}
        return pd.DataFrame({
            "step": step,
            "layer": np.concatenate([np.tile(self.labels, len(names)), np.repeat(self.labels[:L], E),
                                     np.tile(self.labels[:L], len(extra))]),
            "metric": np.concatenate([np.repeat(np.array(names, dtype=object), len(self.labels)),
                                      np.array([f"load_share/{e}" for e in range(E)] * L, dtype=object),
                                      np.repeat(np.array(list(extra), dtype=object), L)]),
            "value": np.concatenate([*(np.asarray(self.values[n], dtype=np.float64) for n in names), self.share.ravel(),
                                     *(np.asarray(v, dtype=np.float64) for v in extra.values())]),
        })

    def scalars(self, per_layer: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """Trainer log scalars: `moe/<metric>` for all layers, `moe/<metric>/layer<L>` per layer (no per-expert shares)."""
        out = {}
        for name, values in {**self.values, **(per_layer or {})}.items():
            for layer, value in zip(self.labels.tolist(), np.asarray(values, dtype=np.float64).tolist()):
                if math.isfinite(value):
                    out[f"moe/{name}" if layer < 0 else f"moe/{name}/layer{layer}"] = value
        return out


def step_metrics(shard: ShardData, ctx: AnalysisContext) -> StepMetrics:
    """The statistics of one recorded step (its routing as one shard)."""
    results = run_analyses([shard], ctx, only=list(ANALYSES))
    metrics = _per_layer(results)
    metrics["router_entropy_norm"] = metrics["router_entropy"] / math.log(ctx.n_experts)  # relative to its maximum
    labels = np.array(layer_labels(results["load"].layers), dtype=np.int64)  # [L + 1]: ..., -1
    return StepMetrics(labels, {name: np.asarray(v, dtype=np.float64) for name, v in metrics.items()},
                       np.asarray(results["load"].share, dtype=np.float64))
