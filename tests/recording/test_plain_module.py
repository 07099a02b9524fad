"""A plain PyTorch MoE (no transformers, no `.config`, no tokenizer) is captured from nothing but the module,
its routers and token ids; what it routed is checked against routing recomputed here from the module's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moescope
from moescope import CustomRouter

VOCAB, HIDDEN, EXPERTS, TOP_K, LAYERS = 50, 24, 6, 2, 3


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, 32), nn.GELU(), nn.Linear(32, HIDDEN))
                                     for _ in range(EXPERTS))

    def forward(self, x):  # [B, T, H]
        probs = self.router(x).softmax(-1)  # [B, T, E]
        weights, ids = probs.topk(TOP_K, dim=-1)  # [B, T, k]
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            gate = (weights * (ids == e)).sum(-1, keepdim=True)  # [B, T, 1]; 0 where e was not chosen
            out = out + gate * expert(x)
        return x + out


class Block(nn.Module):
    """Mixing over the whole sequence (not causal: a padded position fed as a token would change every other
    token's routing), then the MoE."""

    def __init__(self):
        super().__init__()
        self.moe = MoEBlock()

    def forward(self, x, mask):  # [B, T, H], [B, T, 1]
        mean = (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)  # over real tokens only
        return self.moe(x + mean)


class TinyMoE(nn.Module):
    """forward(ids) -> logits [B, T, V]: a plain tensor, no output object, no attention_mask parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def hidden(self, ids, mask):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, mask[..., None].to(x.dtype))
        return x

    def forward(self, ids):
        return self.head(self.hidden(ids, torch.ones_like(ids)))


class TinyMoEWithMask(TinyMoE):
    """Declares its routers itself, takes an attention_mask and returns hidden states (a plain tensor)."""

    moescope_router = CustomRouter(pattern="blocks.*.moe.router", top_k=TOP_K)

    def forward(self, input_ids, attention_mask=None):
        return self.hidden(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)


def _reference(model, rows):
    """Top-k ids and renormalised weights per layer for each row run alone (no padding): [L, n, k] each."""
    inputs = []
    handles = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0][0].detach()))
               for m in model.modules() if isinstance(m, MoEBlock)]
    ids, weights = [], []
    with torch.no_grad():
        for row in rows:
            inputs.clear()
            model(torch.tensor([row]))
            per_layer = []
            for x, block in zip(inputs, [m for m in model.modules() if isinstance(m, MoEBlock)]):
                logits = x.double().numpy() @ block.router.weight.detach().double().numpy().T  # [T, E]
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                top = np.argsort(-p, -1, kind="stable")[:, :TOP_K]
                w = np.take_along_axis(p, top, -1)
                per_layer.append((top, w / w.sum(-1, keepdims=True)))
            ids.append(np.stack([t for t, _ in per_layer]))
            weights.append(np.stack([w for _, w in per_layer]))
    for h in handles:
        h.remove()
    return np.concatenate(ids, 1), np.concatenate(weights, 1)


@pytest.mark.parametrize("kind", ["router argument, no attention_mask", "class attribute, attention_mask"])
def test_plain_module_is_captured_from_the_module_routers_and_ids(tmp_path, kind):
    torch.manual_seed(0)
    with_mask = kind.endswith(", attention_mask")
    model = (TinyMoEWithMask if with_mask else TinyMoE)().eval()
    assert not hasattr(model, "config")
    lengths = [7, 1, 5, 7]
    g = torch.Generator().manual_seed(2)
    ids = torch.full((4, 7), 0)
    mask = torch.zeros((4, 7), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[r, :n] = 1
    router = None if with_mask else CustomRouter(pattern="blocks.*.moe.router", top_k=TOP_K)
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(router=router, batch_size=4, weights_dtype="float32"))
    shards = list(trace.shards())  # the last batch is a shard of its own
    topk_ids, topk_weights = (np.concatenate([getattr(s, f) for s in shards], axis=1) for f in ("topk_ids", "topk_weights"))
    token_id, pos = (np.concatenate([getattr(s, f) for s in shards]).tolist() for f in ("token_id", "pos"))
    rows = [ids[r, :n].tolist() for r, n in enumerate(lengths)]
    ref_ids, ref_w = _reference(model, rows)
    assert topk_ids.shape == (LAYERS, sum(lengths), TOP_K)
    np.testing.assert_array_equal(topk_ids, ref_ids)
    np.testing.assert_allclose(topk_weights, ref_w, rtol=1e-5, atol=1e-6)
    assert token_id == sum(rows, []) and pos == sum((list(range(n)) for n in lengths), [])
    manifest = trace.manifest
    assert manifest["model"]["class"] == type(model).__name__ and manifest["model"]["model_type"] is None
    assert manifest["model"]["hidden_size"] == HIDDEN  # read from the routers' input width
    assert [layer["n_experts"] for layer in manifest["layers"]] == [EXPERTS] * LAYERS
    assert [layer["module"] for layer in manifest["layers"]] == [f"blocks.{i}.moe.router" for i in range(LAYERS)]


def test_generate_on_a_module_without_generate_is_one_clear_error(tmp_path):
    from moescope.errors import MoescopeError

    with pytest.raises(MoescopeError, match="generate"):
        moescope.capture(TinyMoE(), input_ids=torch.ones((1, 3), dtype=torch.long), out=tmp_path / "t", progress=False,
                         options=moescope.CaptureOptions(generate=2, router=CustomRouter(pattern="blocks.*.moe.router", top_k=TOP_K)))
    assert not (tmp_path / "t").exists()
