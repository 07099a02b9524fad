"""The shipped tiny models load offline like any downloaded checkpoint and are what they claim to be."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from moescope.errors import ModelLoadError
from moescope.models import SHIPPED_MODELS, WEIGHTS_DIR, default_custom_router, shipped_model_path
from training import debian_docs

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


def test_all_share_one_tokenizer():
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
    with pytest.raises(ModelLoadError, match="tiny-moe, tiny-dense, tiny-varmoe, tiny-dsv3"):
        shipped_model_path("tiny-nonsense")
    assert shipped_model_path("moescope:tiny-dense").name == "tiny-dense"


def test_weights_are_bf16_safetensors_and_the_package_data_is_at_most_40_mb():
    from safetensors import safe_open

    for name in SHIPPED_MODELS:
        with safe_open(shipped_model_path(name) / "model.safetensors", "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        # DeepSeek-V3 keeps its correction bias in float32 (its update steps are below bf16's resolution)
        assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}
        assert {d for k, d in dtypes.items() if k.endswith("e_score_correction_bias")} <= {"F32"}
    package_data = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert package_data <= 40 * 2**20


def _metrics(name: str) -> dict:
    return json.loads((WEIGHTS_DIR / name / "metrics.json").read_text())


def test_metrics_record_training_on_at_least_10m_tokens():
    for name in SHIPPED_MODELS:
        metrics = _metrics(name)
        assert set(metrics["eval"]["held_out"]) == {"code", "math", "prose"}
        training = metrics["training"]
        assert training["tokens"] == training["steps"] * training["batch"] * training["seq_len"] >= 10_000_000
        assert set(training["batch_mix"]) == {"code", "math", "prose", "docs"}
        assert metrics["tokenizer"]["vocab_size"] == 8192


# Held-out perplexity of the models shipped before issue 17 (README of that release; same tokenizer, same
# windows); tiny-varmoe's as measured once its RoPE frequencies were initialised (issue 12.6), which is lower
# than the README's 260.3 / 147.1 / 578.1. tiny-dsv3 is new: it is held to tiny-moe's old values.
PREVIOUS_PPL = {"tiny-moe": {"code": 170.7, "math": 107.7, "prose": 450.0},
                "tiny-dense": {"code": 181.4, "math": 113.1, "prose": 467.9},
                "tiny-varmoe": {"code": 181.98, "math": 104.92, "prose": 469.98}}
PREVIOUS_PPL["tiny-dsv3"] = PREVIOUS_PPL["tiny-moe"]


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_held_out_perplexity_is_below_the_previous_release_and_re_measures(loaded, name):
    from training import evaluate
    from training.texts import held_out_texts

    model, tokenizer = loaded[name]
    recorded = _metrics(name)["eval"]
    for domain in ("code", "prose"):  # math: the test below, apart (it was the last target met)
        assert recorded["held_out"][domain]["ppl"] < PREVIOUS_PPL[name][domain], (domain, recorded["held_out"][domain])
    check = recorded["check"]
    texts = held_out_texts()
    for domain in ("code", "math", "prose"):  # the first windows again, now
        wins = evaluate.windows(tokenizer, texts[domain])[: check["windows"]]
        now, _ = evaluate.measure(model, wins, evaluate.token_bytes(tokenizer))
        assert now["tokens"] == check[domain]["tokens"]
        assert now["nll"] == pytest.approx(check[domain]["nll"], abs=2e-4)


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_held_out_math_perplexity_is_below_the_previous_release(name):
    assert _metrics(name)["eval"]["held_out"]["math"]["ppl"] < PREVIOUS_PPL[name]["math"]


MOE_MODELS = [n for n in SHIPPED_MODELS if n != "tiny-dense"]


@pytest.mark.parametrize("name", MOE_MODELS)
def test_recorded_routing_meets_the_targets(name):
    """Busiest expert <= 2x fair share and no dead expert in EVERY MoE layer; code vs prose TV > 0.1 somewhere."""
    from training.targets import BUSIEST_MAX, FULL_TOKENS, TV_MIN

    full = _metrics(name)["targets"]["full"]
    assert full["corpus"].startswith("eval split of code, math, prose (Wikipedia + Debian documentation)")
    assert full["max_tokens"] == FULL_TOKENS
    assert min(full["tokens_per_domain"].values()) > FULL_TOKENS / 5  # every domain weighs in
    layers = full["layers"]
    assert len(layers) == (3 if name == "tiny-dsv3" else 4)
    assert all(row["busiest_over_fair"] <= BUSIEST_MAX for row in layers), layers
    assert all(row["dead"] == 0 for row in layers), layers
    assert max(row["tv_code_prose"] for row in layers) > TV_MIN, layers
    assert all(full["met"].values())


@pytest.mark.skipif(not all((debian_docs.DPKG_INFO / f"{p}.list").is_file() for p in debian_docs.PACKAGES),
                    reason=f"the targets' prose includes Debian documentation: {debian_docs.INSTALL_HINT}")
@pytest.mark.parametrize("name", MOE_MODELS)
def test_moescope_measures_now_what_the_metrics_record(name):
    """The small capture + analyze that metrics.json recorded, repeated: the same numbers, to the digit, whenever the
    eval text is the one they were measured on (its Debian documentation comes from apt, whose packages change)."""
    from training.targets import measure_routing

    check = _metrics(name)["targets"]["check"]
    now = measure_routing("moescope:" + name, check["max_tokens"], name)
    if now["corpus_sha256"] != check["corpus_sha256"]:
        pytest.skip(f"the eval text differs from the one measured (Debian packages {now['debian_packages']} here, "
                    f"{check['debian_packages']} then): python -m training.evaluate re-measures")
    assert now == check


def test_import_is_light():
    code = ("import sys, moescope.models; "
            "heavy = [m for m in sys.modules if m == 'training' or m.startswith(('training.', 'moescope.corpora'))]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _np_deepseek_v3_route(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, n_group: int, topk_group: int,
                          k: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's router written out per token: (ids sorted ascending, their weights) [N, k] each."""
    scores = 1 / (1 + np.exp(-(x @ weight.T)))  # [N, E] sigmoid
    ids, weights = [], []
    for s in scores:
        biased = s + bias  # bias steers the choice only
        groups = biased.reshape(n_group, -1)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)  # sum of each group's best two
        kept = np.argsort(-group_score, kind="stable")[:topk_group]
        allowed = np.concatenate([np.arange(g * groups.shape[1], (g + 1) * groups.shape[1]) for g in kept])
        chosen = np.sort(allowed[np.argsort(-biased[allowed], kind="stable")[:k]])
        ids.append(chosen)
        weights.append(s[chosen] / s[chosen].sum())  # unbiased scores, renormalised (scaling factor 1)
    return np.array(ids), np.array(weights)


def test_dsv3_is_a_deepseek_v3_moe(loaded):
    from moescope.adapters.discover import find_moe_layers

    model = loaded["tiny-dsv3"][0]
    cfg = model.config
    assert cfg.model_type == "deepseek_v3" and cfg.n_group > 1 and 1 < cfg.topk_group < cfg.n_group
    assert cfg.n_shared_experts == 1 and cfg.first_k_dense_replace == 1 and cfg.routed_scaling_factor == 1.0
    layers = find_moe_layers(model)
    assert [layer.block_path for layer in layers] == [f"model.layers.{i}.mlp" for i in (1, 2, 3)]
    # same expert parameters per MoE layer as tiny-moe, and 3 x 128 routed + 128 shared = 512 channels per token
    assert cfg.n_routed_experts * cfg.moe_intermediate_size == 8 * 256
    assert (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size == 512
    for i in (1, 2, 3):  # balanced by the bias: it was trained away from zero, in float32
        bias = model.model.layers[i].mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().max() > 0


@pytest.mark.parametrize("n_tokens", [1, 7, 256])
def test_dsv3_routes_as_a_hand_written_deepseek_v3_router(loaded, n_tokens):
    model = loaded["tiny-dsv3"][0]
    gate = model.model.layers[2].mlp.gate
    x = torch.randn(n_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(n_tokens))
    with torch.inference_mode():
        _, weights, ids = gate(x)  # [N, k] each, slots unordered (topk sorted=False)
    order = ids.argsort(-1)
    ref_ids, ref_weights = _np_deepseek_v3_route(x.double().numpy(), gate.weight.detach().double().numpy(),
                                                 gate.e_score_correction_bias.double().numpy(),
                                                 model.config.n_group, model.config.topk_group,
                                                 model.config.num_experts_per_tok)
    np.testing.assert_array_equal(ids.gather(-1, order).numpy(), ref_ids)
    np.testing.assert_allclose(weights.gather(-1, order).double().numpy(), ref_weights, rtol=1e-5)


def test_models_page_tables_are_the_shipped_metrics():
    from pathlib import Path

    from training.evaluate import model_tables

    page = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    assert model_tables({name: _metrics(name) for name in SHIPPED_MODELS}) in page
