"""CaptureOptions: one frozen options type for capture, record, the CLI and the backends, validated once."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import moescope
from moescope.errors import MoescopeError
from moescope.recording.options import CaptureOptions, CaptureOptionsError


@pytest.mark.parametrize(("fields", "message"), [
    ({"seq_len": 0}, "seq_len must be a positive whole number, not 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive whole number, not 2.5"),
    ({"max_tokens": -1}, "max_tokens must be a positive whole number, not -1"),
    ({"shard_tokens": True}, "shard_tokens must be a positive whole number, not True"),
    ({"generate": -3}, "generate must be a whole number of tokens, 0 or more, not -3"),
    ({"logits_dtype": "bfloat16"}, "logits_dtype must be one of float16, float32, not 'bfloat16'"),
    ({"split": "test"}, "split must be one of all, train, eval, not 'test'"),
    ({"backend": "sglang"}, "backend must be one of hf, vllm, not 'sglang'"),
    ({"generate": 4, "predict_next_layer": True}, "predict_next_layer and save_expert_norms are recorded for prompt tokens only"),
    ({"tensor_parallel_size": 2}, "tensor parallelism is a vLLM option"),
    ({"backend": "vllm", "output_entropy": True}, "output_entropy is not available with the vLLM backend"),
    ({"workers": 2}, "workers is the number of Ray capture workers"),
    ({"router": "model.layers.*.mlp.gate"}, "router must be a moescope.CustomRouter, not str"),
])
def test_a_bad_value_is_one_line_when_the_options_are_made(fields, message):
    with pytest.raises(CaptureOptionsError) as err:
        CaptureOptions(**fields)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert isinstance(err.value, MoescopeError)


def test_options_are_frozen_and_public():
    options = moescope.CaptureOptions(max_tokens=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_tokens = 128
    assert moescope.CaptureOptions is CaptureOptions


def _ids():
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def test_old_keywords_still_work_with_a_deprecation_warning(tiny_moe, tmp_path):
    new = moescope.capture(tiny_moe, input_ids=_ids(), out=tmp_path / "new", progress=False,
                           options=CaptureOptions(save_logits=True, batch_size=1))
    with pytest.warns(DeprecationWarning, match=r"pass options=moescope.CaptureOptions\(save_logits=True, batch_size=1\)"):
        old = moescope.capture(tiny_moe, input_ids=_ids(), out=tmp_path / "old", progress=False,
                               save_router_output=True, batch_size=1)
    assert old.manifest["capture"] == new.manifest["capture"]
    a, b = next(old.shards()), next(new.shards())
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.router_output, b.router_output)
    with pytest.raises(TypeError, match="unexpected keyword argument 'save_logit'"):
        moescope.capture(tiny_moe, input_ids=_ids(), out=tmp_path / "x", save_logit=True)
    assert not (tmp_path / "x").exists()


def test_record_takes_the_same_options_and_refuses_capture_only_ones(tiny_moe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new way warns about nothing
        with torch.inference_mode(), moescope.record(tiny_moe, options=CaptureOptions(save_logits=True)) as rec:
            tiny_moe(input_ids=_ids(), use_cache=False)
    assert next(rec.trace.shards()).router_output is not None
    with pytest.warns(DeprecationWarning, match="moescope.record"):
        with torch.inference_mode(), moescope.record(tiny_moe, save_logits=True) as old:
            tiny_moe(input_ids=_ids(), use_cache=False)
    assert next(old.trace.shards()).router_output is not None
    with pytest.raises(MoescopeError, match="the options seq_len, generate apply to moescope.capture only"):
        moescope.record(tiny_moe, options=CaptureOptions(seq_len=64, generate=2))
