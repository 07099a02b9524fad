"""What the manifest declares per MoE layer for the families that broke it (issue 12, points 2 and 3),
checked against the family's own config, and the trace analysed end to end."""

from __future__ import annotations

import numpy as np

import moescope
from moescope.analysis import run_analyses
from moescope.pipeline.analyze import analysis_context

from .test_first_choice import uneven_batch
from .tiny_configs import build_tiny_model


def _capture(family, tmp_path, **kw):
    model = build_tiny_model(family)
    ids, mask = uneven_batch()
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / family, progress=False, **kw)
    return model, trace


def test_gemma4_layers_declare_top_k_experts_and_the_trace_analyses(tmp_path):
    model, trace = _capture("gemma4_text", tmp_path, save_router_output=True)
    assert model.config.top_k_experts == 2
    assert [layer["top_k"] for layer in trace.layers] == [model.config.top_k_experts] * model.config.num_hidden_layers
    results = run_analyses(trace.shards, analysis_context(trace))
    assert results["load"].counts.sum() == trace.n_tokens * 2 * trace.n_layers
