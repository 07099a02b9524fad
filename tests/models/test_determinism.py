"""Every shipped model computes the same thing in every process: same logits, same routing, same trace bytes.

Each side is a FRESH interpreter (not a fork: a forked child inherits its parent's heap, so memory left
uninitialised on load could read the same in both and hide the bug). One interpreter per side loads every
shipped model and runs `moescope.cli.main.main(["capture", ...])` — the `moescope` console script's entry
point — once per shipped MoE, so the two sides cost two imports, not eight.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moescope.models import SHIPPED_MODELS, shipped_model_path

SIDE = r"""
import hashlib, json, sys
import torch
from transformers import AutoModelForCausalLM
from moescope.cli.main import main
from moescope.models import SHIPPED_MODELS, shipped_model_path

torch.set_num_threads(1)
out = sys.argv[1]
ids = torch.arange(3, 70)[None]  # (1, 67)
logits = {}
for name in SHIPPED_MODELS:
    model = AutoModelForCausalLM.from_pretrained(shipped_model_path(name), dtype=torch.float32).eval()
    with torch.inference_mode():
        logits[name] = hashlib.sha256(model(input_ids=ids).logits.numpy().tobytes()).hexdigest()
    if name == "tiny-dense":
        continue  # no routers to capture
    rc = main(["capture", "moescope:" + name, "--data", "humaneval,wiki", "--split", "eval", "--max-tokens", "600",
               "--out", f"{out}/{name}", "--no-progress"])
    assert rc in (0, None), rc
print(json.dumps(logits))
"""


@pytest.fixture(scope="module")
def two_sides(tmp_path_factory):
    """Both fresh interpreters, run side by side: (logit digests, trace folder) per side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    folders = [tmp_path_factory.mktemp(f"side{i}") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", SIDE, str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for f in folders]
    sides = []
    for proc, folder in zip(procs, folders):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        sides.append((json.loads(stdout.strip().splitlines()[-1]), folder))
    return sides


def test_two_fresh_processes_compute_identical_logits(two_sides):
    (first, _), (second, _) = two_sides
    assert set(first) == set(SHIPPED_MODELS)
    assert first == second


def _part_digests(trace: Path) -> dict[str, str]:
    manifest = json.loads((trace / "manifest.json").read_text())
    return {entry["path"]: entry["sha256"] for shard in manifest["shards"] for entry in shard["files"].values()}


@pytest.mark.parametrize("name", [n for n in SHIPPED_MODELS if n != "tiny-dense"])
def test_two_fresh_captures_write_byte_identical_trace_parts(two_sides, name):
    (_, first), (_, second) = two_sides
    digests = _part_digests(first / name)
    assert any(path.startswith("routing/") for path in digests)
    assert digests == _part_digests(second / name)
    for path, sha in digests.items():  # the manifests tell the truth about the files on disk
        assert hashlib.sha256((second / name / path).read_bytes()).hexdigest() == sha


def test_varmoe_loads_exactly_what_a_fresh_build_with_its_weights_computes():
    """from_pretrained == (build from config, which computes everything __init__ computes) + load the saved tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = shipped_model_path("tiny-varmoe")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    missing, unexpected = built.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embeddings
    built.tie_weights()
    ids = torch.arange(3, 300)[None]  # (1, 297): positions far enough out that wrong RoPE frequencies show
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids).logits, built(input_ids=ids).logits, rtol=0, atol=0)
