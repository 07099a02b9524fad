"""Session fixtures: results folders (complete, partial, quantization, missing) and the report made from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from report_data import (
    FULL_INPUTS,
    HOSTILE_DOMAIN,
    HOSTILE_FOLDER,
    HOSTILE_MODEL,
    HOSTILE_NOTE,
    PARTIAL_INPUTS,
    hostile_token,
    write_analysis_results,
    write_quant_results,
)


@pytest.fixture(scope="session")
def report_inputs(tmp_path_factory) -> dict[str, Path]:
    from moescope.analysis.synthetic import SyntheticSpec

    root = tmp_path_factory.mktemp("report-inputs")
    full_spec = SyntheticSpec(n_layers=4, n_experts=8, top_k=2, predicted_next_ids=True, vocab_size=120,
                              domains=("code", "math", HOSTILE_DOMAIN))
    full = write_analysis_results(root / HOSTILE_FOLDER, full_spec, n_tokens=2000, model=HOSTILE_MODEL, token_text=hostile_token)
    summary = json.loads((full / "summary.json").read_text())
    summary["notes"]["load"].append(HOSTILE_NOTE)
    (full / "summary.json").write_text(json.dumps(summary))
    return {
        "full": full,
        "partial": write_partial_results(root / "partial"),
        "quant": write_quant_results(root / "quant"),
        "missing": root / "not-run",
    }


def write_partial_results(out: Path) -> Path:
    """A routing-only trace imported from JSONL and analysed by the real pipeline with a few analyses:
    no router outputs, no domains, no sizes, no token text, no model."""
    from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard
    from moescope.pipeline.analyze import analyze_trace
    from moescope.trace.exchange import import_jsonl

    spec = SyntheticSpec(n_layers=2, n_experts=6, top_k=2, router_output=None, output_entropy=False, seq_len=(4, 40), vocab_size=60)
    shard = synthetic_shard(spec, 400, seed=2)
    L, T, _ = shard.topk_ids.shape
    layer, token = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")  # [L, T]
    lines = [
        json.dumps({"problem_id": int(shard.seq_id[t]), "layer": int(l), "token_id": int(shard.pos[t]),
                    "expert_ids": shard.topk_ids[l, t].tolist(), "weights": np.round(shard.topk_weights[l, t], 4).tolist()})
        for l, t in zip(layer.ravel(), token.ravel())
    ]
    jsonl = out.parent / "partial.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    trace = import_jsonl(jsonl, out.parent / "partial-trace")
    analyze_trace(trace.folder, out, only=["router_confidence", "cross_layer", "token_specialisation", "router_structure"], use_model=False)
    return out


@pytest.fixture(scope="session")
def full_report(report_inputs, tmp_path_factory) -> Path:
    from moescope.reporting import write_report

    out = tmp_path_factory.mktemp("report") / "report.html"
    return write_report([report_inputs[k] for k in FULL_INPUTS], out)


@pytest.fixture(scope="session")
def partial_report(report_inputs, tmp_path_factory) -> Path:
    """The routing-only folder and the quantization sweep, every figure also written to files/."""
    from moescope.reporting import write_report

    folder = tmp_path_factory.mktemp("partial-report")
    return write_report([report_inputs[k] for k in PARTIAL_INPUTS], folder / "report.html", figures_dir=folder / "files")
