"""Results folders for the report tests, made by the real analyses and the real quant summary/store.

`write_analysis_results` runs every analysis on a synthetic trace (moescope.analysis.synthetic) and writes
the folder exactly as `moescope analyze` lays it out (<analysis>__<table>.parquet/.csv + summary.json),
plus a trace manifest.json for the header. `write_quant_results` fills the sweep's configs/per_layer
tables (its own column tuples) with numbers shaped like a real sweep's and writes them with the sweep's
own summary function and store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from moescope.analysis.router_structure import analyze_router_weights
from moescope.analysis.runner import run_analyses
from moescope.analysis.synthetic import SyntheticSpec, synthetic_trace

# Strings a model, corpus or user controls, which must show as text in the page, never run.
HOSTILE_MODEL = "moe <img src=x onerror=alert(1)>"
HOSTILE_NOTE = "<script>alert('note')</script> & more"
HOSTILE_DOMAIN = "<b>prose</b>"
HOSTILE_FOLDER = 'moe "<run>" & co'


FULL_INPUTS = ("full", "quant", "missing")  # the complete report: every analysis, quantization, a folder never written
PARTIAL_INPUTS = ("partial", "quant")  # a routing-only trace analysed with --only, and the sweep


def hostile_token(token_id: int) -> str:
    return f"<script>alert({token_id})</script>" if token_id % 5 == 0 else f"tok{token_id} & <i>"


def _write_tables(out: Path, name: str, tables) -> list[str]:
    frames = tables if isinstance(tables, dict) else {"": tables}
    stems = []
    for table, frame in frames.items():
        stem = f"{name}__{table}" if table else name
        frame = frame.reset_index(drop=True)
        frame.to_parquet(out / f"{stem}.parquet", index=False)
        frame.to_csv(out / f"{stem}.csv", index=False)
        stems.append(stem)
    return stems


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    return value


def write_analysis_results(
    out: Path,
    spec: SyntheticSpec,
    *,
    n_tokens: int = 3000,
    model: str = "synthetic-moe",
    only: list[str] | None = None,
    router_weights: bool = True,
    sizes: bool = True,
    token_text=None,
) -> Path:
    """A results folder of every analysis (or `only` these) over a synthetic trace; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    trace = out.parent / f"{out.name}-trace"
    trace.mkdir(exist_ok=True)
    overrides = {} if sizes else {"expert_sizes": None}
    if token_text is not None:
        overrides["token_text"] = token_text
    ctx = spec.context(**overrides)
    shards = list(synthetic_trace(spec, n_tokens, max(n_tokens // 2, 1), seed=3))
    results = run_analyses(shards, ctx, only=only)
    notes = {name: list(r.notes) for name, r in results.items()}
    if router_weights:
        rng = np.random.default_rng(5)
        weights = {l: rng.standard_normal((spec.n_experts, 16)) + 0.4 * rng.standard_normal(16) for l in range(spec.n_layers)}
        results["router_structure"] = analyze_router_weights(weights)
        notes["router_structure"] = []
    else:
        notes["router_structure"] = ["skipped: router weights need the model, not requested (--no-model)"]
    tables = {name: _write_tables(out, name, r.to_pandas()) for name, r in results.items()}
    summary = {
        "trace": {"path": str(trace), "model": model, "tokens": sum(s.n_tokens for s in shards), "moe_layers": spec.n_layers,
                  "complete": True, "corpus": {"spec": ",".join(spec.domains), "split": "eval"}},
        "analyses": {name: _jsonable(r.summary()) for name, r in results.items()},
        "tables": tables,
        "notes": notes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    manifest = {
        "schema_version": 1,
        "model": {"id": model, "model_type": "synthetic", "class": "SyntheticMoe", "hidden_size": spec.hidden_size},
        "layers": [{"moe_layer": l, "decoder_layer": l, "n_experts": spec.n_experts, "top_k": spec.top_k,
                    "expert_sizes": [int(s) for s in spec.sizes()] if sizes else None} for l in range(spec.n_layers)],
        "capture": {"seq_len": spec.seq_len[1], "save_router_output": spec.router_output is not None,
                    "predict_next_layer": spec.predicted_next_ids},
        "corpus": summary["trace"]["corpus"],
        "router_output_kind": spec.router_output,
        "versions": {"moescope": "test", "numpy": "test"},
        "complete": True,
    }
    (trace / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def write_quant_results(out: Path, *, bits=(2, 3, 4, 8), n_layers: int = 3, seed: int = 0) -> Path:
    """A sweep folder (configs, per_layer, summary.json, sweep.json) for an MoE and its dense control."""
    from moescope.quant.store import ResultStore
    from moescope.quant.summary import summarize
    from moescope.quant.sweep import CONFIG_COLUMNS, PER_LAYER_COLUMNS

    rng = np.random.default_rng(seed)
    params = {"router": 1536, "experts": 294912, "attention": 49152, "all": 345600}
    configs, per_layer = [], []
    for model, targets in (("moe", ("router", "experts", "attention", "all")), ("dense", ("experts", "attention", "all"))):
        for target in targets:
            for b in bits:
                for layer in (-1, *range(n_layers)):
                    scale = 2.0 ** (-b) * (1 if layer < 0 else 1 / n_layers)
                    rel_error = 1.7 * 2.0 ** (-b) * (1 + 0.05 * rng.standard_normal())
                    delta = scale * {"router": 0.02, "experts": 0.3, "attention": 0.2, "all": 0.6}[target] * (1.3 if model == "dense" else 1)
                    row = {c: np.nan for c in CONFIG_COLUMNS}
                    scope = "all" if layer < 0 else f"L{layer}"
                    n = params[target] // (1 if layer < 0 else n_layers)
                    row.update(config_id=f"{model}:{target}:rtn-asym:channel:{b}b:{scope}", model=model, target=target,
                               scheme="rtn-asym", bits=b, granularity="channel", layer=layer, n_params=n, rel_error=rel_error,
                               nll=5.5 + delta, ppl=float(np.exp(5.5 + delta)), delta_nll=delta, delta_nll_se=0.1 * delta + 1e-4,
                               delta_nll_per_mparam=delta / (n / 1e6), seconds=0.1)
                    if model == "moe":
                        for mode in ("local", "e2e"):
                            if mode == "local" and target not in ("router", "all"):
                                continue
                            for moe_layer in range(n_layers):
                                flip = min(1.0, (0.9 if target in ("router", "all") else 0.2) * 2.0 ** (-b) * (1 + 0.3 * moe_layer * (mode == "e2e")))
                                per_layer.append({"config_id": row["config_id"], "model": model, "target": target, "scheme": "rtn-asym",
                                                  "bits": b, "granularity": "channel", "layer": layer, "mode": mode, "moe_layer": moe_layer,
                                                  "decoder_layer": moe_layer, "replayed": False, "n_tokens": 600, "flip_top1": flip,
                                                  "flip_topk_set": min(1.0, 1.3 * flip), "jaccard": 1 - 0.6 * flip, "kl": 0.5 * flip,
                                                  "entropy_ref": 0.7, "entropy_delta": -0.05 * flip})
                        for mode in ("local", "e2e"):
                            mine = [r for r in per_layer if r["config_id"] == row["config_id"] and r["mode"] == mode]
                            if mine:
                                row[f"flip_top1_{mode}"] = float(np.mean([r["flip_top1"] for r in mine]))
                                row[f"flip_topk_set_{mode}"] = float(np.mean([r["flip_topk_set"] for r in mine]))
                                row[f"jaccard_{mode}"] = float(np.mean([r["jaccard"] for r in mine]))
                                row[f"kl_{mode}"] = float(np.mean([r["kl"] for r in mine]))
                                row[f"entropy_delta_{mode}"] = 0.0
                    configs.append(row)
    configs = pd.DataFrame(configs, columns=list(CONFIG_COLUMNS))
    per_layer = pd.DataFrame(per_layer, columns=list(PER_LAYER_COLUMNS))
    reference = {kind: {"nll": 5.5, "ppl": float(np.exp(5.5)), "tokens_predicted": 589, "sequences": 11, "n_params": 366624}
                 for kind in ("moe", "dense")}
    store = ResultStore(out, {"fingerprint": "synthetic", "options": {"bits": list(bits), "per_layer": True},
                              "models": {"moe": "SyntheticMoe", "dense": "SyntheticDense"}})
    store.write_tables({"configs": configs, "per_layer": per_layer}, summarize(configs, reference=reference, notes=["synthetic numbers for the report tests"]))
    return out
