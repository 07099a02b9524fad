"""`moescope offload`: a trace -> expert-cache hit rates, bytes moved, stall time and a decode bound, as files.

Everything that can be refused is refused before the output folder is touched: unknown policies or
predictors, capacities below what one token needs at once, router-lookahead without predictions, decode
figures from a trace without generated tokens, expert sizes nobody recorded. The learned predictors
(transition, popularity) read the trace once more first (cross_layer's tables). Writes
`offload__<table>.{parquet,csv}` and summary.json, which `moescope report` reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from moescope.analysis.kernels import jsonable
from moescope.errors import MoescopeError
from moescope.pipeline.analyze import analysis_context, result_tables, write_results
from moescope.pipeline.output import check_output_folder, prepare_output_folder
from moescope.simulate.cost import Link, expert_bytes
from moescope.simulate.lossy import Knob, lossy_frame, parse_knobs, simulate_lossy
from moescope.simulate.offload import ALL_POLICIES, PHASES, OffloadOptions, OffloadResult, simulate_trace
from moescope.trace.reader import Trace, open_trace

NAME = "offload"


def default_capacities(top_k: int, n_experts: int, scope: str, n_layers: int) -> tuple[int, ...]:
    """k, 2k, 4k, ... below E, then E (per layer); the same times the layer count for one global budget."""
    caps, c = [], top_k
    while c < n_experts:
        caps.append(c)
        c *= 2
    caps.append(n_experts)
    return tuple(c * (n_layers if scope == "global" else 1) for c in caps)


def run_offload(trace_path: str | os.PathLike, out: str | os.PathLike, *, capacities: tuple[int, ...] | None = None,
                policies: tuple[str, ...] | None = None, prefetch: tuple[str, ...] = ("none",), window: int = 8,
                scope: str = "layer", phases: tuple[str, ...] | None = None, link: str = "pcie4x16",
                bandwidth_gbps: float | None = None, latency_us: float | None = None, expert_bytes_each: float | None = None,
                dtype: str | None = None, lossy: str | None = None, model: str | None = None, data: str | None = None,
                max_tokens: int = 4096, seq_len: int = 256, device: str = "auto") -> dict:
    """Simulate the expert caches and write their tables into `out`; returns the summary.

    `lossy` ("drop-cold:F,topk:K,rerank:B") adds simulate/lossy.py's cache-aware routing per capacity; with
    `model` and `data` the model also runs with that routing (pipeline/offload_quality.py: ΔNLL ± SE).
    `policies` defaults to all six (simulate.offload.ALL_POLICIES); `phases` defaults to prefill, plus decode when the trace generated tokens; asking for decode on a trace
    without generated tokens is refused.
    """
    trace = open_trace(trace_path)
    if not trace.manifest["shards"]:
        raise MoescopeError(f"{trace_path} has no committed shards; nothing to simulate")
    ctx = analysis_context(trace)
    defaults = default_capacities(ctx.top_k, ctx.n_experts, scope, ctx.n_layers)
    options = OffloadOptions(defaults if capacities is None else tuple(capacities),
                             ALL_POLICIES if policies is None else tuple(policies), tuple(prefetch), scope, window)
    options.check(ctx, lookahead_width=_lookahead_width(trace))
    if window > trace.n_tokens:
        raise MoescopeError(f"--window {window} is longer than the trace's {trace.n_tokens:,} tokens")
    generated = int(np.asarray(trace.table("tokens", columns=["generated"]).column("generated")).sum())
    phases = _phases(phases, generated)
    chosen = _link(link, bandwidth_gbps, latency_us)
    sizes = _expert_bytes(trace, ctx, expert_bytes_each, dtype)
    knobs = _knobs(lossy, options, ctx)
    quality = _quality_inputs(model, data, knobs, ctx, max_tokens=max_tokens, seq_len=seq_len, device=device)
    check_output_folder(out, markers=("summary.json",), what="offload results", remote=True)  # refused before the work

    state = simulate_trace(trace.shards, ctx, options)
    notes = ("each sequence starts with empty caches; a token's experts are looked up together, after its prefetch; "
             "stall = experts fetched on demand, link time = every expert moved (compute time not included)",)
    if result_static_note := _static_note(options, state):
        notes += (result_static_note,)
    if "decode" not in phases:
        notes += ("no generated tokens in the trace: prefill only (capture with --generate N for decode figures)",)
    result = OffloadResult(options, tuple(range(ctx.n_layers)), ctx.top_k, ctx.n_experts, state, sizes, chosen, phases, notes)
    if knobs:
        counts, fetched = simulate_lossy(trace.shards, ctx, knobs, options.capacities)
        frame = lossy_frame(counts, fetched, sizes, knobs, options.capacities, result.layers, phases, "trace")
        result = dataclasses.replace(result, lossy=frame, notes=result.notes + (
            "lossy: an LRU cache per layer decides the routing (simulate/lossy.py); hit_rate = hits / experts used",))
    if quality is not None:
        from moescope.pipeline.offload_quality import lossy_quality

        loaded, layers, batches = quality
        measured = lossy_quality(loaded, layers, batches, knobs, options.capacities, sizes)
        result = dataclasses.replace(result, lossy=pd.concat([result.lossy, measured], ignore_index=True), notes=result.notes + (
            f"lossy source 'model': {model} run on {data} ({len(batches)} sequences of <= {seq_len} tokens) with the "
            "cache deciding its routing inside the forward pass; delta_nll per predicted token against the unmodified "
            "model, standard error over sequences",))
    return write_offload(result, trace_path, trace, out)


def _quality_inputs(model: str | None, data: str | None, knobs, ctx, *, max_tokens: int, seq_len: int, device: str):
    """(model, its MoE layers, one-sequence batches) for the lossy model run, or None; checked before writing."""
    if model is None and data is None:
        return None
    if model is None or data is None:
        raise MoescopeError("--model and --data go together: the model runs on the data with the lossy routing")
    if not knobs:
        raise MoescopeError("--model runs the lossy knobs; give --lossy drop-cold:F,topk:K,rerank:B")
    if max_tokens < 2 or seq_len < 2:
        raise MoescopeError("--max-tokens and --seq-len must be at least 2 (a sequence of one token predicts nothing)")
    from moescope.adapters.discover import find_moe_layers
    from moescope.intervention.plan import plan_interventions
    from moescope.quant.sweep import make_batches
    from moescope.recording.loading import load_model

    loaded, tokenizer = load_model(model, device=device, dtype="float32")  # ΔNLL of routing, not of bf16 rounding
    layers = find_moe_layers(loaded)
    shape = (len(layers), layers[0].n_experts, layers[0].top_k) if layers else None
    if shape != (ctx.n_layers, ctx.n_experts, ctx.top_k):
        raise MoescopeError(f"--model {model} has (MoE layers, experts, top-k) = {shape}, the trace "
                            f"{(ctx.n_layers, ctx.n_experts, ctx.top_k)}: run the model the trace was captured from")
    plan_interventions(loaded, layers, route={i: (lambda *a: None) for i in range(len(layers))})  # refused in one line
    batches = make_batches(tokenizer, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=1)
    return loaded, layers, batches


def _knobs(lossy: str | None, options: OffloadOptions, ctx) -> tuple[Knob, ...]:
    if lossy is None:
        return ()
    if options.scope != "layer":
        raise MoescopeError("--lossy simulates a cache per layer; leave out --scope global")
    knobs = parse_knobs(lossy)
    for knob in knobs:
        knob.check(ctx.top_k, ctx.router_output_kind in ("logits", "probs"))
    return knobs


def _static_note(options: OffloadOptions, state) -> str | None:
    static = [p for p in options.policies if p in ("static", "static-oracle")]
    if static and "none" not in options.prefetch:
        return f"{', '.join(static)}: pinned sets take no prefetches and are reported under --prefetch none only"
    if "static" in options.policies and not (state.lookups.by_fold.sum(axis=(1, 2, 3)) > 0).all():
        return ("static left out: every lookup falls in one of the two document folds, so a set learned on the "
                "other fold cannot be evaluated (static-oracle is the best fixed set in hindsight)")
    return None


def _lookahead_width(trace: Trace) -> int | None:
    schema = pq.read_schema(trace.check_part(trace.manifest["shards"][0]["files"]["routing"]))
    return schema.field("next_layer_prediction").type.list_size if "next_layer_prediction" in schema.names else None


def _phases(phases: tuple[str, ...] | None, generated: int) -> tuple[str, ...]:
    if phases is None:
        return PHASES if generated else ("prefill",)
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise MoescopeError(f"unknown --phase {', '.join(unknown) or '(none)'}; choose from {', '.join(PHASES)}")
    if "decode" in phases and not generated:
        raise MoescopeError("--phase decode needs generated tokens, and this trace has none; "
                            "capture with --generate N (or ask for --phase prefill)")
    return tuple(p for p in PHASES if p in phases)


def _link(name: str, gbps: float | None, latency_us: float | None) -> Link:
    if gbps is None and latency_us is None:
        return Link.preset(name)
    preset = Link.preset(name)
    return Link.custom(gbps if gbps is not None else preset.bandwidth / 1e9,
                       latency_us if latency_us is not None else preset.latency * 1e6)


def _expert_bytes(trace: Trace, ctx, each: float | None, dtype: str | None) -> np.ndarray:
    """float64 [L, E]: from --expert-bytes, else the manifest's expert sizes or the model's config."""
    if each is not None:
        if not each > 0:
            raise MoescopeError(f"--expert-bytes must be positive, got {each}")
        return np.full((ctx.n_layers, ctx.n_experts), float(each))
    return expert_bytes(trace.layers, trace.manifest["model"].get("hidden_size"), model_config(trace), dtype=dtype,
                        matrices=ctx.expert_matrices)


def model_config(trace: Trace) -> dict | None:
    """The trace's model config.json as a dict when it is on this machine (a folder, a shipped model or the
    Hugging Face cache), else None. Never downloads."""
    from moescope.recording.loading import resolve_model_path

    name = trace.manifest["model"].get("id") or ""
    if not name or name.startswith("imported:"):
        return None
    path = Path(resolve_model_path(name)) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoescopeError(f"cannot read the model config {path}: {err}; pass --expert-bytes") from None


def write_offload(result: OffloadResult, trace_path, trace: Trace, out) -> dict:
    out = prepare_output_folder(out, markers=("summary.json",), what="offload results", remote=True)
    tables = {NAME: result_tables(NAME, result)}
    o = result.options
    summary = {
        "trace": {"path": str(trace_path), "model": trace.manifest["model"].get("id"), "tokens": trace.n_tokens,
                  "moe_layers": trace.n_layers, "complete": trace.complete, "corpus": trace.manifest.get("corpus")},
        "options": {"capacities": list(o.capacities), "policies": list(o.policies), "prefetch": list(o.prefetch),
                    "scope": o.scope, "window": o.window, "phases": list(result.phases), "link": result.link.name,
                    "bandwidth_gbps": result.link.bandwidth / 1e9, "latency_us": result.link.latency * 1e6},
        "analyses": {NAME: result.summary()},
        "tables": {NAME: list(tables[NAME])},
        "notes": {NAME: list(result.notes)},
    }
    write_results(out, tables, jsonable(summary))  # summary.json last: a folder with one is complete
    return summary
