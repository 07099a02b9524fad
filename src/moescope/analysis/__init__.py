"""Routing analyses over traces: one module per statistic, each accumulate -> merge -> finalize.

    from moescope.analysis import AnalysisContext, run_analyses
    results = run_analyses(trace.shards, AnalysisContext.from_manifest(trace.manifest))
    results["load"].to_pandas()["per_layer"]; results["load"].summary()

Every analysis module exposes NAME, accumulate(shard, ctx) -> state, merge(a, b) -> state and
finalize(state, ctx) -> result; results are frozen, with .to_pandas() and .summary() (JSON-ready).
Router weight structure needs the model, so it is a plain function: analyze_router_weights.
"""

from moescope.analysis.context import OVERALL, AnalysisContext, Thresholds
from moescope.analysis.cross_layer import PrefetchTable
from moescope.analysis.result import AnalysisResult
from moescope.analysis.router_structure import analyze_router_weights
from moescope.analysis.runner import ANALYSES, run_analyses

__all__ = [
    "ANALYSES",
    "OVERALL",
    "AnalysisContext",
    "AnalysisResult",
    "PrefetchTable",
    "Thresholds",
    "analyze_router_weights",
    "run_analyses",
]
