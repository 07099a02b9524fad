"""What the manifest declares per MoE layer for the families that broke it (issue 12, points 2 and 3),
checked against the family's own config, and the trace analysed end to end."""

from __future__ import annotations

import numpy as np
import torch

import moescope
from moescope.analysis import run_analyses
from moescope.pipeline.analyze import analysis_context

from .experts_inputs import experts_inputs
from .test_first_choice import uneven_batch
from .tiny_configs import build_tiny_model


def _capture(family, tmp_path, **kw):
    model = build_tiny_model(family)
    ids, mask = uneven_batch()
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / family, progress=False,
                             options=moescope.CaptureOptions(**kw))
    return model, trace


def test_gemma4_layers_declare_top_k_experts_and_the_trace_analyses(tmp_path):
    model, trace = _capture("gemma4_text", tmp_path, save_logits=True)
    assert model.config.top_k_experts == 2
    assert [layer["top_k"] for layer in trace.layers] == [model.config.top_k_experts] * model.config.num_hidden_layers
    results = run_analyses(trace.shards, analysis_context(trace))
    assert results["load"].counts.sum() == trace.n_tokens * 2 * trace.n_layers


def _router_outputs(model, router_class: str, ids, mask) -> list[np.ndarray]:
    """Element 0 of every `router_class` module's output in one forward pass (the test's own hooks)."""
    outputs, handles = [], []
    try:
        for module in model.modules():
            if type(module).__name__ == router_class:
                handles.append(module.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().double().numpy())))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _load_analysis(trace):
    results = run_analyses(trace.shards, analysis_context(trace))
    return results, results["load"]


def test_longcat_identity_experts_are_declared_apart_and_carry_no_load(tmp_path):
    model, trace = _capture("longcat_flash", tmp_path, save_logits=True)
    routed, identity = model.config.n_routed_experts, model.config.zero_expert_num
    assert (routed, identity) == (8, 2)
    for layer in trace.layers:
        assert layer["n_experts"] == routed
        assert layer["non_compute_experts"] == {"ids": [8, 9], "kind": "identity"}
    ids, mask = uneven_batch()
    keep = mask.reshape(-1).bool().numpy()
    received = [r.ids[keep] for r in experts_inputs(model, ids, mask)]  # [n, k] per layer, ids up to 9
    shard = next(trace.shards())
    for layer, got in enumerate(received):
        np.testing.assert_array_equal(np.sort(shard.topk_ids[layer], -1), np.sort(got, -1))
    slots = np.stack(received)  # [L, n, k]
    assert (slots >= routed).mean() > 0.05, "the tiny router never picks an identity expert: nothing is tested"
    results, load = _load_analysis(trace)
    want = np.stack([np.bincount(layer[layer < routed], minlength=routed) for layer in slots])
    np.testing.assert_array_equal(load.counts, want)
    tables = load.to_pandas()
    assert tables["per_expert"]["expert"].max() == routed - 1
    share = tables["per_layer"]["non_compute_share"].to_numpy()
    np.testing.assert_allclose(share[:-1], (slots >= routed).mean(axis=(1, 2)))
    np.testing.assert_allclose(load.summary()["non_compute_share"], (slots >= routed).mean())
    assert load.summary()["non_compute_kinds"] == ["identity"] and load.summary()["invalid_slots"] == 0
    # router outputs hold routed + identity columns: confidence is over the router's full distribution
    assert shard.router_output.shape[-1] == routed + identity
    logits = shard.router_output.astype(np.float64)  # [L, n, R]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    chosen = np.zeros(probs.shape, bool)
    np.put_along_axis(chosen, shard.topk_ids.astype(np.int64), True, axis=-1)
    matches = np.where(chosen, probs, np.inf).min(-1) >= np.where(chosen, -np.inf, probs).max(-1)  # [L, n]
    np.testing.assert_allclose(results["router_confidence"].topk_match_rate[:-1], matches.mean(-1))


def test_zaya_skip_is_recorded_as_its_own_id_never_as_expert_0(tmp_path):
    model, trace = _capture("zaya", tmp_path, save_logits=True)
    n_experts = model.config.num_experts
    for layer in trace.layers:
        assert layer["n_experts"] == n_experts
        assert layer["non_compute_experts"] == {"ids": [n_experts], "kind": "skip"}
    ids, mask = uneven_batch()
    keep = mask.reshape(-1).bool().numpy()
    # what each router chose, before it masks skip: top-1 of softmax(logits) + balancing_biases (E + 1 classes)
    biases = [m.balancing_biases.double().numpy() for m in model.modules() if type(m).__name__ == "ZayaRouter"]
    chosen = []
    for logits, bias in zip(_router_outputs(model, "ZayaRouter", ids, mask), biases):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen.append(np.argmax(probs + bias, axis=-1)[keep])  # [n]
    chosen = np.stack(chosen)  # [L, n]
    assert (chosen == n_experts).any() and (chosen == 0).any(), "need both skips and real expert-0 choices"
    shard = next(trace.shards())
    np.testing.assert_array_equal(shard.topk_ids[..., 0], chosen)
    assert (shard.topk_weights[..., 0][chosen == n_experts] == 0).all()
    assert (shard.topk_weights[..., 0][chosen == 0] > 0).all()
    results, load = _load_analysis(trace)  # router outputs have E + 1 columns: the trace still analyses
    want = np.stack([np.bincount(layer[layer < n_experts], minlength=n_experts) for layer in chosen])
    np.testing.assert_array_equal(load.counts, want)
    np.testing.assert_allclose(load.summary()["non_compute_share"], (chosen == n_experts).mean())
    assert results["router_confidence"].topk_match_rate is not None


def test_the_report_shows_the_share_of_non_compute_choices(tmp_path):
    from moescope.pipeline.analyze import analyze_trace
    from moescope.reporting.results import load_results
    from moescope.reporting.sections.common import shape_of
    from moescope.reporting.sections.load import load_section

    _, trace = _capture("longcat_flash", tmp_path)
    analyze_trace(trace.folder, tmp_path / "results", only=["load"], use_model=False)
    results = load_results(tmp_path / "results")
    share = results.get("load", "non_compute_share")
    texts = [b.text for b in load_section(results, "load", shape_of(results)).blocks if hasattr(b, "text")]
    assert share > 0 and any(f"{share:.1%} of all routing slots went to non-compute choices (identity)" in t for t in texts)
