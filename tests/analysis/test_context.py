import numpy as np
import pytest

from moescope.analysis import AnalysisContext
from moescope.errors import MoescopeError, TraceError


def test_from_manifest_with_per_layer_entries():
    manifest = {
        "router_output_kind": "logits",
        "model": {"hidden_size": 64},
        "layers": [{"moe_layer": i, "n_experts": 8, "top_k": 2, "expert_sizes": [64] * 4 + [16] * 4} for i in range(3)],
    }
    ctx = AnalysisContext.from_manifest(manifest)
    assert ctx.hidden_size == 64
    assert (ctx.n_experts, ctx.top_k, ctx.n_layers, ctx.router_output_kind) == (8, 2, 3, "logits")
    assert ctx.expert_sizes.shape == (3, 8)
    np.testing.assert_array_equal(ctx.expert_flops()[0, :2], [2 * 3 * 64 * 64] * 2)


def test_from_manifest_with_top_level_values():
    ctx = AnalysisContext.from_manifest({"n_experts": [8, 8], "top_k": 2, "router_output_kind": None})
    assert (ctx.n_layers, ctx.expert_sizes, ctx.has_costs) == (2, None, False)


def test_from_manifest_rejects_what_it_cannot_use():
    with pytest.raises(TraceError, match="n_experts"):
        AnalysisContext.from_manifest({"top_k": 2})
    with pytest.raises(TraceError, match="top_k"):
        AnalysisContext.from_manifest({"layers": [{"n_experts": 4, "top_k": 1}, {"n_experts": 4, "top_k": 2}]})


def test_validation_messages():
    with pytest.raises(MoescopeError, match="router_output_kind"):
        AnalysisContext(n_experts=4, top_k=1, n_layers=1, router_output_kind="scores")
    with pytest.raises(MoescopeError, match="expert_sizes"):
        AnalysisContext(n_experts=4, top_k=1, n_layers=2, expert_sizes=np.ones((3, 4)))
    with pytest.raises(MoescopeError, match="expert FLOPs"):
        AnalysisContext(n_experts=4, top_k=1, n_layers=1).expert_flops()
