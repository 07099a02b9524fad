"""Router outputs are stored in float16 unless `logits_dtype="float32"`, and float16 ties never count as
the router disagreeing with itself (issue 12, point 12)."""

from __future__ import annotations

import numpy as np
import torch

import moescope
from moescope.analysis import run_analyses
from moescope.pipeline.analyze import analysis_context


def _ids(rows: int = 64, width: int = 64) -> torch.Tensor:
    return torch.randint(3, 256, (rows, width), generator=torch.Generator().manual_seed(4))


def _router_logits(model, ids) -> np.ndarray:
    """[L, N, E] float32 logits the routers computed (the test's own hooks; TopKRouter returns them first)."""
    got, handles = [], []
    try:
        for module in model.modules():
            if type(module).__name__.endswith("TopKRouter"):
                handles.append(module.register_forward_hook(lambda m, a, out: got.append(out[0].detach().float().numpy())))
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return np.stack(got)


def test_plain_softmax_router_always_matches_its_own_top_k(tiny_moe, tmp_path):
    ids = _ids()
    trace = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(save_logits=True, batch_size=16))
    out = np.concatenate([s.router_output for s in trace.shards()], axis=1)  # [L, N, E] float16-rounded
    ranked = -np.sort(-out, axis=-1)
    assert (ranked[..., 1] == ranked[..., 2]).any(), "no float16 tie at the top-2 boundary: the test proves nothing"
    result = run_analyses(trace.shards, analysis_context(trace), only=["router_confidence"])["router_confidence"]
    assert result.topk_match_rate.tolist() == [1.0] * (trace.n_layers + 1)


def test_logits_dtype_float32_keeps_the_router_output_exactly(tiny_moe, tmp_path):
    ids = _ids(8, 32)
    want = _router_logits(tiny_moe, ids)  # [L, N, E]
    exact = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "f32", progress=False,
                             options=moescope.CaptureOptions(save_logits=True, logits_dtype="float32"))
    np.testing.assert_array_equal(next(exact.shards()).router_output, want)
    assert exact.manifest["router_output_dtype"] == "float32"
    rounded = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "f16", progress=False,
                               options=moescope.CaptureOptions(save_logits=True))
    np.testing.assert_array_equal(next(rounded.shards()).router_output, want.astype(np.float16).astype(np.float32))
    assert rounded.manifest["router_output_dtype"] == "float16"
    plain = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "none", progress=False)
    assert plain.manifest["router_output_dtype"] is None
