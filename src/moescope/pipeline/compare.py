"""Two traces side by side: headline numbers, per-layer load divergence, and — when both traces
route the same tokens (a model and its quantized copy, two checkpoints) — per-token agreement."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pandas as pd

from moescope.analysis.kernels import js_divergence, jsonable
from moescope.analysis.runner import run_analyses
from moescope.errors import MoescopeError
from moescope.pipeline.analyze import analysis_context
from moescope.pipeline.output import check_output_folder, prepare_output_folder
from moescope.trace.manifest import atomic_write_bytes
from moescope.trace.reader import Trace, open_trace

ROUTING_ONLY = ("load", "router_confidence", "temporal_locality", "cross_layer", "domain_specialisation")

MARKERS = ("summary.json", "headline.csv")  # what a previous comparison left in its folder


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)


def _token_agreement(a: Trace, b: Trace) -> pd.DataFrame:
    """Per MoE layer over tokens present in both traces: top-1 agreement and mean top-k Jaccard."""
    con = duckdb.connect()
    for name, trace in (("a", a), ("b", b)):
        con.execute(f"CREATE VIEW {name} AS {trace.table_sql('routing')}")  # slot 0 = first choice (trace/slots.py)
    return con.execute(
        """SELECT a.layer,
                  count(*) AS tokens,
                  avg(CASE WHEN a.topk_ids[1] = b.topk_ids[1] THEN 1.0 ELSE 0.0 END) AS top1_agreement,
                  avg(len(list_intersect(a.topk_ids, b.topk_ids))
                      / len(list_distinct(list_concat(a.topk_ids, b.topk_ids)))) AS topk_jaccard
           FROM a JOIN b USING (seq_id, pos, layer)
           GROUP BY a.layer ORDER BY a.layer"""
    ).fetchdf()


def compare_traces(path_a: str | os.PathLike, path_b: str | os.PathLike, out: str | os.PathLike) -> dict:
    a, b = open_trace(path_a), open_trace(path_b)
    check_output_folder(out, markers=MARKERS, what="comparison results")  # refused before the work, created after it
    results = {}
    for label, trace in (("a", a), ("b", b)):
        ctx = analysis_context(trace)
        results[label] = run_analyses(trace.shards, ctx, only=ROUTING_ONLY)
    flat = {"a": {}, "b": {}}
    for label in flat:
        for name, result in results[label].items():
            _flatten(name, jsonable(result.summary()), flat[label])
    keys = sorted(set(flat["a"]) & set(flat["b"]))
    headline = pd.DataFrame({"metric": keys, "a": [flat["a"][k] for k in keys], "b": [flat["b"][k] for k in keys]})
    headline["b_minus_a"] = headline["b"] - headline["a"]
    out = prepare_output_folder(out, markers=MARKERS, what="comparison results")
    headline.to_csv(out / "headline.csv", index=False)
    headline.to_parquet(out / "headline.parquet", index=False)
    summary = {"a": str(path_a), "b": str(path_b), "tokens": {"a": a.n_tokens, "b": b.n_tokens}}
    load_a, load_b = results["a"]["load"].counts, results["b"]["load"].counts  # [L, E]
    if load_a.shape == load_b.shape:
        share = lambda c: c / np.maximum(c.sum(-1, keepdims=True), 1)
        jsd = js_divergence(share(load_a), share(load_b))
        frame = pd.DataFrame({"layer": np.arange(len(jsd)), "load_js_divergence": jsd})
        frame.to_csv(out / "load_divergence.csv", index=False)
        summary["mean_load_js_divergence"] = float(jsd.mean())
    else:
        summary["note"] = f"different shapes (layers x experts {load_a.shape} vs {load_b.shape}): load not compared"
    if a.n_layers == b.n_layers:
        agreement = _token_agreement(a, b)
        if len(agreement):
            agreement.to_csv(out / "token_agreement.csv", index=False)
            agreement.to_parquet(out / "token_agreement.parquet", index=False)
            summary["shared_tokens"] = int(agreement["tokens"].iloc[0])
            summary["mean_top1_agreement"] = float(agreement["top1_agreement"].mean())
            summary["mean_topk_jaccard"] = float(agreement["topk_jaccard"].mean())
    summary["headline"] = jsonable(dict(zip(headline["metric"], zip(headline["a"], headline["b"]))))
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    if not len(headline):
        raise MoescopeError("the traces share no comparable statistics")
    return summary
