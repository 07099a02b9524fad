"""Two traces side by side: headline numbers, per-layer load divergence, and — on the tokens both traces
hold (a model and its quantized copy, two checkpoints, on the same text) — per-token agreement.

Which tokens both traces hold is decided from the data, never from seq_id alone (see SHARED_TOKENS): two
captures of the same texts in another order still compare, and traces of different texts get the
distribution-level comparison only, said in `per_token`. Top-1 agreement reads slot 0, the first choice.
"""

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
from moescope.pipeline.output import check_output_folder, prepare_output_folder, publish
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


def _views(con, name: str, trace: Trace) -> None:
    for table in ("routing", "tokens", "sequences"):  # routing: slot 0 = first choice, schema 1 too (trace/slots.py)
        con.execute(f"CREATE VIEW {name}_{table} AS {trace.table_sql(table, con=con, prefix=f'{name}_')}")


# Sequences match when their text is the same (the k-th sequence of a text in `a` with the k-th in `b`, in
# seq_id order, so a text cut into several sequences or listed twice pairs up in order). Within a pair, tokens
# are compared from position 0 up to the first position whose token ids differ (or that one trace lacks): a
# token's routing depends on every token before it. Unknown texts ('') and unknown token ids (< 0) never match.
SHARED_TOKENS = """
WITH seq_a AS (SELECT seq_id, text_sha1, n_tokens,
                      row_number() OVER (PARTITION BY text_sha1 ORDER BY seq_id) AS occurrence
               FROM a_sequences WHERE text_sha1 <> ''),
     seq_b AS (SELECT seq_id, text_sha1, n_tokens,
                      row_number() OVER (PARTITION BY text_sha1 ORDER BY seq_id) AS occurrence
               FROM b_sequences WHERE text_sha1 <> ''),
     pairs AS (SELECT seq_a.seq_id AS seq_a, seq_b.seq_id AS seq_b, least(seq_a.n_tokens, seq_b.n_tokens) AS n
               FROM seq_a JOIN seq_b USING (text_sha1, occurrence)),
     differ AS (SELECT p.seq_a, min(ta.pos) AS first
                FROM pairs p JOIN a_tokens ta ON ta.seq_id = p.seq_a JOIN b_tokens tb ON tb.seq_id = p.seq_b AND tb.pos = ta.pos
                WHERE ta.token_id <> tb.token_id OR ta.token_id < 0
                GROUP BY p.seq_a)
SELECT p.seq_a, p.seq_b, least(p.n, coalesce(d.first, p.n)) AS prefix
FROM pairs p LEFT JOIN differ d USING (seq_a)
"""


def _token_agreement(a: Trace, b: Trace) -> tuple[pd.DataFrame, int]:
    """(per MoE layer over the tokens both traces hold: top-1 agreement and mean top-k Jaccard, sequences shared)."""
    con = duckdb.connect()
    _views(con, "a", a)
    _views(con, "b", b)
    con.execute(f"CREATE TEMP TABLE shared AS SELECT * FROM ({SHARED_TOKENS}) WHERE prefix > 0")
    n_sequences = int(con.execute("SELECT count(*) FROM shared").fetchone()[0])
    frame = con.execute(
        """SELECT ra.layer,
                  count(*) AS tokens,
                  avg(CASE WHEN ra.topk_ids[1] = rb.topk_ids[1] THEN 1.0 ELSE 0.0 END) AS top1_agreement,
                  avg(len(list_intersect(ra.topk_ids, rb.topk_ids))
                      / len(list_distinct(list_concat(ra.topk_ids, rb.topk_ids)))) AS topk_jaccard
           FROM shared s
           JOIN a_routing ra ON ra.seq_id = s.seq_a AND ra.pos < s.prefix
           JOIN b_routing rb ON rb.seq_id = s.seq_b AND rb.pos = ra.pos AND rb.layer = ra.layer
           GROUP BY ra.layer ORDER BY ra.layer"""
    ).fetchdf()
    return frame, n_sequences


def _per_token_line(shared: int, n_sequences: int, a: Trace, b: Trace) -> str:
    if not shared:
        return ("no token is in both traces (no sequence has the same text and token ids in both): "
                "only the distributions are compared")
    return (f"per-token agreement over the {shared} tokens in both traces ({n_sequences} sequences; "
            f"{shared / max(a.n_tokens, 1):.1%} of a's tokens, {shared / max(b.n_tokens, 1):.1%} of b's)")


def compare_traces(path_a: str | os.PathLike, path_b: str | os.PathLike, out: str | os.PathLike) -> dict:
    a, b = open_trace(path_a), open_trace(path_b)
    check_output_folder(out, markers=MARKERS, what="comparison results", remote=True)  # refused before the work, created after it
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
    out = prepare_output_folder(out, markers=MARKERS, what="comparison results", remote=True)  # s3://: a staging folder
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
    agreement, n_sequences = _token_agreement(a, b) if a.n_layers == b.n_layers else (pd.DataFrame(), 0)
    shared = int(agreement["tokens"].iloc[0]) if len(agreement) else 0
    summary.update(shared_tokens=shared, shared_sequences=n_sequences, per_token=_per_token_line(shared, n_sequences, a, b))
    if a.n_layers != b.n_layers:
        summary["per_token"] = f"different numbers of MoE layers ({a.n_layers} vs {b.n_layers}): only the distributions are compared"
    if shared:
        agreement.to_csv(out / "token_agreement.csv", index=False)
        agreement.to_parquet(out / "token_agreement.parquet", index=False)
        summary["mean_top1_agreement"] = float(agreement["top1_agreement"].mean())
        summary["mean_topk_jaccard"] = float(agreement["topk_jaccard"].mean())
    summary["headline"] = jsonable(dict(zip(headline["metric"], zip(headline["a"], headline["b"]))))
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    publish(out)  # uploaded to an s3:// --out, summary.json last
    if not len(headline):
        raise MoescopeError("the traces share no comparable statistics")
    return summary
