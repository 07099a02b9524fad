import math

import numpy as np
import pytest
import torch
from analysis_helpers import SHARD_LAYOUTS, SPECS, make_shard, run_one, split_at_sequences, synthetic_shards
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from moescope.analysis import AnalysisContext
from moescope.analysis.reference import aux_losses as reference


def _shard_routed_like_transformers(logits: np.ndarray, k: int, seq_len: int):
    """Shard whose selected experts are transformers' top-k of softmax(logits); logits [L, T, E]."""
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    T = logits.shape[1]
    return make_shard(ids.numpy(), weights.numpy(), seq_id=np.arange(T) // seq_len, router_output=logits)


@pytest.mark.parametrize("n_layers,n_tokens,n_experts,k", [(1, 1, 4, 1), (3, 7, 8, 2), (4, 50, 6, 3)])
def test_load_balancing_loss_agrees_with_transformers(n_layers, n_tokens, n_experts, k):
    rng = np.random.default_rng(n_tokens)
    logits = rng.standard_normal((n_layers, n_tokens, n_experts)).astype(np.float32) * 2
    shard = _shard_routed_like_transformers(logits, k, seq_len=3)
    ctx = AnalysisContext(n_experts=n_experts, top_k=k, n_layers=n_layers, router_output_kind="logits")
    result = run_one("aux_losses", split_at_sequences(shard, 3), ctx)
    per_layer = [torch.from_numpy(logits[l]) for l in range(n_layers)]
    pooled = load_balancing_loss_func(tuple(per_layer), n_experts, k).item()
    assert result.load_balancing_loss[-1] == pytest.approx(pooled, rel=1e-5)
    for l in range(n_layers):
        alone = load_balancing_loss_func((per_layer[l],), n_experts, k).item()
        assert result.load_balancing_loss[l] == pytest.approx(alone, rel=1e-5)
    z = router_z_loss_func(torch.from_numpy(logits)).item()  # mean over (layer, token) of logsumexp^2
    assert result.z_loss[-1] == pytest.approx(z, rel=1e-5)


def test_balanced_routing_gives_k_and_known_z_loss():
    # 4 experts, top-2, uniform logits, selections perfectly balanced
    ids = [[[0, 1], [2, 3], [1, 0], [3, 2]]]
    shard = make_shard(ids, router_output=np.zeros((1, 4, 4)))
    result = run_one(
        "aux_losses", [shard], AnalysisContext(n_experts=4, top_k=2, n_layers=1, router_output_kind="logits")
    )
    assert result.load_balancing_loss[0] == pytest.approx(2.0)
    assert result.z_loss[0] == pytest.approx(math.log(4) ** 2)


def test_probabilities_skip_z_loss_with_a_note():
    probs = np.full((1, 2, 4), 0.25)
    shard = make_shard([[[0], [1]]], router_output=probs)
    result = run_one(
        "aux_losses", [shard], AnalysisContext(n_experts=4, top_k=1, n_layers=1, router_output_kind="probs")
    )
    assert result.load_balancing_loss[0] == pytest.approx(4 * (0.5 * 0.25 + 0.5 * 0.25))
    assert math.isnan(result.z_loss[0])
    assert any("z-loss needs logits" in note for note in result.notes)


def test_no_router_outputs_is_a_note_not_an_error():
    result = run_one("aux_losses", [make_shard([[[0], [1]]])], AnalysisContext(n_experts=2, top_k=1, n_layers=1))
    assert np.isnan(result.load_balancing_loss).all()
    assert result.notes and result.summary()["load_balancing_loss_pooled_transformers"] is None
    assert result.summary()["load_balancing_loss_worst"] is None


@pytest.mark.parametrize("layout", SHARD_LAYOUTS.values(), ids=SHARD_LAYOUTS.keys())
@pytest.mark.parametrize("spec_name", ["base", "top1_probs", "wide"])
def test_matches_per_token_reference(spec_name, layout):
    spec = SPECS[spec_name]
    shards = synthetic_shards(spec, layout, seed=5)
    ctx = spec.context()
    result = run_one("aux_losses", shards, ctx)
    ref = reference.compute(shards, ctx)
    np.testing.assert_allclose(result.load_balancing_loss, ref["load_balancing_loss"], rtol=1e-5)
    if ctx.router_output_kind == "logits":
        np.testing.assert_allclose(result.z_loss, ref["z_loss"], rtol=1e-5)


def _opposite_layers(n_tokens: int = 64):
    """Two layers, 4 experts, top-2: layer 0 routes to experts 0/1, layer 1 to 2/3 (logits [L, T, E])."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, n_tokens, 4)).astype(np.float32) * 0.3
    logits[0, :, :2] += 4.0
    logits[1, :, 2:] += 4.0
    return logits


def test_summary_leads_with_per_layer_losses_and_labels_the_pooled_one():
    logits = _opposite_layers()
    shard = _shard_routed_like_transformers(logits, 2, seq_len=8)
    ctx = AnalysisContext(n_experts=4, top_k=2, n_layers=2, router_output_kind="logits")
    summary = run_one("aux_losses", [shard], ctx).summary()
    per_layer = [load_balancing_loss_func((torch.from_numpy(logits[l]),), 4, 2).item() for l in range(2)]
    pooled = load_balancing_loss_func(tuple(torch.from_numpy(x) for x in logits), 4, 2).item()
    assert min(per_layer) > 3.5 and pooled < 2.1  # each layer far from k = 2, the pooled value near it
    assert summary["load_balancing_loss_worst"] == pytest.approx(max(per_layer), rel=1e-5)
    assert summary["load_balancing_loss_worst_layer"] == int(np.argmax(per_layer))
    assert summary["load_balancing_loss_layer_mean"] == pytest.approx(np.mean(per_layer), rel=1e-5)
    assert summary["load_balancing_loss_pooled_transformers"] == pytest.approx(pooled, rel=1e-5)
    keys = list(summary)
    assert keys[0] == "load_balancing_loss_worst" and "load_balancing_loss" not in summary
    assert keys.index("load_balancing_loss_pooled_transformers") > keys.index("load_balancing_loss_layer_mean")


def test_printed_summary_shows_per_layer_values_before_pooled_ones(capsys):
    from moescope.analysis import run_analyses
    from moescope.pipeline.summary import print_summary

    shard = _shard_routed_like_transformers(_opposite_layers(), 2, seq_len=8)
    ctx = AnalysisContext(n_experts=4, top_k=2, n_layers=2, router_output_kind="logits")
    results = run_analyses([shard], ctx, only=["load", "aux_losses"])
    print_summary({"trace": {"model": "m", "tokens": 64, "moe_layers": 2},
                   "analyses": {name: r.summary() for name, r in results.items()}, "notes": {}})
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert lines[:3] == ["load.balance_score_worst", "load.balance_score_worst_layer", "load.balance_score_layer_mean"]
    assert lines.index("aux_losses.load_balancing_loss_worst") < lines.index("aux_losses.load_balancing_loss_pooled_transformers")
    assert lines.index("load.balance_score_layer_mean") < lines.index("load.balance_score_pooled")
