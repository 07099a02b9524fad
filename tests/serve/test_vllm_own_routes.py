"""vLLM's own routed experts against moescope's `--backend vllm` ids on the same requests (an independent check
of both: two capture paths at the same selection point). vLLM returns routed experts only from its V2 model
runner, which needs Triton: where the installed vLLM cannot, the test is skipped with vLLM's own reason."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from serve_helpers import MODEL, vllm_python

pytestmark = pytest.mark.vllm


def test_vllm_routed_experts_equal_moescope_backend_ids(tmp_path):
    python = vllm_python()
    result = subprocess.run([python, __file__.replace("test_vllm_own_routes.py", "own_routes.py"), str(MODEL),
                             str(tmp_path / "routes.json")], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    if result.returncode == 3:
        pytest.skip(f"this vLLM cannot return routed experts: {result.stdout.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    both = json.loads((tmp_path / "routes.json").read_text())
    ours, theirs = both["moescope"], both["vllm"]
    assert ours["seq_id"] == theirs["seq_id"] and ours["pos"] == theirs["pos"]
    np.testing.assert_array_equal(np.array(ours["ids"]), np.array(theirs["ids"]))
