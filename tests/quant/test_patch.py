"""`quantized` changes exactly the target weights and restores every parameter bit-exactly, also on error."""

from __future__ import annotations

import pytest
import torch

from quant_models import gpt_oss, qwen2_moe, qwen3_dense, qwen3_moe, varmoe, varmoe_router
from moescope.quant import make_format, quantized, select_weights
from moescope.quant import patch as patch_module

FMT = make_format("rtn-asym", 2, "channel")


def _snapshot(model):
    return {name: (p.detach().clone(), p.data_ptr()) for name, p in model.named_parameters()}


def _assert_restored(model, snap):
    for name, p in model.named_parameters():
        saved, ptr = snap[name]
        assert torch.equal(p.detach(), saved), name
        assert p.data_ptr() == ptr, f"{name} was not given back its own storage"


CASES = [(qwen3_moe, t) for t in ("router", "experts", "shared", "attention", "all")] + [
    (qwen2_moe, "shared"), (qwen2_moe, "all"), (gpt_oss, "experts")]


@pytest.mark.parametrize("build,target", CASES, ids=[f"{b.__name__}-{t}" for b, t in CASES])
def test_changes_exactly_the_targets_and_restores_bit_exact(build, target):
    model = build()
    snap = _snapshot(model)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    refs = select_weights(model, target)
    names = {r.name for r in refs}
    if target == "shared" and build is not qwen2_moe:
        assert not refs
        return
    assert refs
    with quantized(model, target, FMT) as report:
        assert report.n_params == sum(r.param.numel() for r in refs)
        for name, p in model.named_parameters():
            changed = not torch.equal(p.detach(), snap[name][0])
            assert changed == (name in names), name  # 2-bit changes every target matrix, nothing else
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, before)
    _assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_target_contents():
    model = qwen2_moe()
    assert all(r.name.endswith("gate.weight") and r.param.dim() == 2 for r in select_weights(model, "router"))
    assert {r.param.dim() for r in select_weights(model, "experts")} == {3}
    assert all(".shared_expert." in r.name for r in select_weights(model, "shared"))
    assert all(".self_attn." in r.name for r in select_weights(model, "attention"))
    everything = {r.name for r in select_weights(model, "all")}
    assert any("shared_expert_gate" in n for n in everything)  # all = every decoder-layer matrix
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in everything)
    experts = select_weights(gpt_oss(), "experts")
    assert experts and all(r.transposed for r in experts) and not any("bias" in r.name for r in experts)
    dense = qwen3_dense()
    assert select_weights(dense, "router") == [] and select_weights(dense, "shared") == []
    assert {r.name.split(".")[-2] for r in select_weights(dense, "experts")} == {"gate_proj", "up_proj", "down_proj"}


def test_per_expert_linear_modules():
    model = varmoe()
    refs = select_weights(model, "experts", custom_router=varmoe_router())
    assert len(refs) == 2 * 4 * 3 and all(".experts." in r.name and r.param.dim() == 2 for r in refs)
    assert [r.name for r in select_weights(model, "router", custom_router=varmoe_router())] == [
        "model.layers.0.moe.router.weight", "model.layers.1.moe.router.weight"]
    snap = _snapshot(model)
    with quantized(model, ["router", "experts"], FMT, custom_router=varmoe_router()) as report:
        assert len(report.weights) == 26
    _assert_restored(model, snap)


def test_single_layer_selection():
    model = qwen3_moe()
    snap = _snapshot(model)
    with quantized(model, "all", FMT, layers=1) as report:
        assert {r.layer for r in report.weights} == {1}
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), snap[name][0]) == (".layers.1." not in name or "norm" in name), name
    _assert_restored(model, snap)


def test_restored_after_exception_in_the_block():
    model = qwen3_moe()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with quantized(model, "all", FMT):
            raise RuntimeError("boom")
    _assert_restored(model, snap)


def test_restored_after_exception_while_patching(monkeypatch):
    model = qwen3_moe()
    snap = _snapshot(model)
    real, calls = patch_module.quantize, []

    def failing(w, fmt, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("fails on the fifth weight")
        return real(w, fmt, **kw)

    monkeypatch.setattr(patch_module, "quantize", failing)
    with pytest.raises(ValueError, match="fifth"):
        with quantized(model, "all", FMT):
            pass
    assert len(calls) == 5
    _assert_restored(model, snap)


def test_no_hooks_or_parameters_added():
    model = qwen3_moe()
    n_params = len(list(model.parameters()))
    with quantized(model, "all", FMT):
        pass
    assert len(list(model.parameters())) == n_params
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
