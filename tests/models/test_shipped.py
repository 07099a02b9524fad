"""The shipped tiny models load offline like any downloaded checkpoint and are what they claim to be."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from moescope.errors import ModelLoadError
from moescope.models import SHIPPED_MODELS, WEIGHTS_DIR, default_custom_router, shipped_model_path

TEXTS = [
    "def add(a, b):\n    return a + b  # 12345\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Anarchism is a political philosophy; ünïcödé — 日本語 ✓\n\n\ttabs",
]


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {
        name: (AutoModelForCausalLM.from_pretrained(shipped_model_path(name), dtype=torch.float32).eval(),
               AutoTokenizer.from_pretrained(shipped_model_path(name)))
        for name in SHIPPED_MODELS
    }


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_loads_offline_and_gives_finite_logits(loaded, name):
    model, tokenizer = loaded[name]
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**batch).logits  # (B, T, V)
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_tokenizer_round_trips_and_has_special_tokens(loaded, name):
    model, tokenizer = loaded[name]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.config.pad_token_id
    assert len(tokenizer) == model.config.vocab_size


def test_all_three_share_one_tokenizer():
    files = {name: (shipped_model_path(name) / "tokenizer.json").read_bytes() for name in SHIPPED_MODELS}
    assert len(set(files.values())) == 1


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_forward_is_deterministic(loaded, name):
    model, tokenizer = loaded[name]
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def _expert_params(model) -> tuple[int, int, int]:
    """(all parameters, expert parameters, router parameters)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    router_names = ("mlp.gate.weight", "moe.router.weight")
    routers = sum(p.numel() for n, p in model.named_parameters() if n.endswith(router_names))
    return total, experts, routers


def test_moe_and_dense_have_the_same_active_parameters_per_token(loaded):
    moe, dense = loaded["tiny-moe"][0], loaded["tiny-dense"][0]
    total, experts, routers = _expert_params(moe)
    active_moe = total - experts + experts * moe.config.num_experts_per_tok // moe.config.num_experts
    dense_total = sum(p.numel() for p in dense.parameters())
    # identical except the routers (4 x 128 x 8 = 4,096 parameters, 0.2 %)
    assert active_moe - routers == dense_total
    assert dense.config.intermediate_size == moe.config.num_experts_per_tok * moe.config.moe_intermediate_size
    assert (dense.config.hidden_size, dense.config.num_hidden_layers, dense.config.vocab_size) == (
        moe.config.hidden_size, moe.config.num_hidden_layers, moe.config.vocab_size)


def test_varmoe_experts_really_differ_in_size(loaded):
    model = loaded["tiny-varmoe"][0]
    sizes = model.config.expert_sizes
    assert len(set(sizes)) > 1
    for layer in model.model.layers:
        assert [expert.gate_proj.out_features for expert in layer.moe.experts] == sizes
        assert [expert.down_proj.in_features for expert in layer.moe.experts] == sizes
    router = default_custom_router("tiny-varmoe")
    assert router is not None and list(router.expert_sizes) == sizes
    assert default_custom_router("moescope:tiny-moe") is None


def test_varmoe_routes_as_its_custom_router_declares(loaded):
    """softmax -> top-2 -> renormalise of the logits the `model.layers.*.moe.router` Linear returns."""
    from moescope.adapters.discover import find_moe_layers

    model, tokenizer = loaded["tiny-varmoe"]
    spec = default_custom_router("tiny-varmoe")
    layers = find_moe_layers(model, spec)
    assert len(layers) == model.config.num_hidden_layers
    assert all(isinstance(model.get_submodule(layer.block_path), nn.Linear) for layer in layers)

    block = model.model.layers[0].moe
    x = torch.randn(1, 5, model.config.hidden_size)
    with torch.inference_mode():
        out, logits = block(x)
        weights, ids = torch.topk(logits.softmax(-1), spec.top_k, dim=-1)  # (5, k)
        weights = weights / weights.sum(-1, keepdim=True)
        expected = sum(weights[:, j, None] * torch.stack([block.experts[e](x[0, t]) for t, e in enumerate(ids[:, j])])
                       for j in range(spec.top_k))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_varmoe_ignores_left_padding(loaded):
    model, tokenizer = loaded["tiny-varmoe"]
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]  # (1, T)
    padded = torch.cat([torch.full((1, 3), tokenizer.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        left = model(input_ids=padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(left, plain, rtol=1e-4, atol=1e-4)


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ModelLoadError, match="tiny-moe, tiny-dense, tiny-varmoe"):
        shipped_model_path("tiny-nonsense")
    assert shipped_model_path("moescope:tiny-dense").name == "tiny-dense"


def test_weights_are_small_bf16_safetensors():
    from safetensors import safe_open

    total = 0
    for name in SHIPPED_MODELS:
        path = shipped_model_path(name) / "model.safetensors"
        total += path.stat().st_size
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert total < 30 * 2**20


def test_metrics_record_held_out_perplexity_per_domain():
    for name in SHIPPED_MODELS:
        metrics = json.loads((WEIGHTS_DIR / name / "metrics.json").read_text())
        assert set(metrics["eval"]["held_out"]) == {"code", "math", "prose"}
        assert metrics["training"]["tokens"] == metrics["training"]["steps"] * 16 * 256


def test_import_is_light():
    code = ("import sys, moescope.models; "
            "heavy = [m for m in ('moescope.models.train', 'moescope.models.evaluate', 'moescope.corpora') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
