"""replay-check of real vLLM traces (.venv-vllm's engine) against transformers in float32: the README's figures.

vLLM records the routes (`--backend vllm`, float32 and bfloat16 engines, the same 1,000 tokens); this process
recomputes them with the Hugging Face model in float32. A float32 engine routes every token as transformers
does; a bfloat16 engine differs on a few near-tie rows.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from moescope.pipeline.replay_check import replay_check

from serve_helpers import VLLM_ENV, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def vllm_traces(tmp_path_factory):
    vllm_python()  # skips, saying why, without the environment
    tmp = tmp_path_factory.mktemp("vllm-replay")
    traces = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp / dtype
        result = subprocess.run([VLLM_ENV / "bin" / "moescope", "capture", "moescope:tiny-moe", "--backend", "vllm",
                                 "--data", "humaneval,wiki", "--max-tokens", "1000", "--seq-len", "128", "--dtype", dtype,
                                 "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert result.returncode == 0, result.stderr[-3000:]
        traces[dtype] = out
    return traces


def test_a_float32_vllm_trace_routes_like_transformers(vllm_traces):
    overall = replay_check(vllm_traces["float32"], "moescope:tiny-moe", dtype="float32")["table"].iloc[-1]
    assert overall["rows"] == 4000
    assert overall["set_differs"] == overall["first_differs"] == 0.0
    assert overall["weight_abs_diff_mean"] < 1e-5 and overall["weight_abs_diff_max"] <= 2**-11  # float16 rounding
    assert overall[["zeros", "duplicated", "misaligned"]].sum() == 0


def test_a_bfloat16_vllm_trace_differs_from_float32_on_few_rows(vllm_traces):
    overall = replay_check(vllm_traces["bfloat16"], "moescope:tiny-moe", dtype="float32")["table"].iloc[-1]
    assert 0 < overall["set_differs"] <= 0.01 and overall["first_differs"] <= 0.01
    assert 1e-4 < overall["weight_abs_diff_mean"] < 1e-2
    assert overall[["zeros", "duplicated", "misaligned"]].sum() == 0
