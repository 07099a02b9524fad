"""The vLLM backend against the Hugging Face backend: same model, same prompt tokens, same expert ids.

vLLM lives in its own environment (.venv-vllm, made by scripts/setup-vllm.sh). The end-to-end tests run that
environment's `moescope capture --backend vllm` as a subprocess and compare its trace with an in-process Hugging
Face capture of the same corpus; they skip, saying why, where that environment is absent. The row-assembly tests
(vLLM's flattened steps back to (sequence, position) order) need no vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pytest

import moescope
from moescope.errors import MoescopeError
from moescope.recording.batches import chunks
from moescope.trace.block import Sequence
from moescope.recording.options import CaptureSettings
from moescope.recording.vllm_backend import block_from_vllm
from moescope.trace.verify import verify_trace

ROOT = Path(__file__).resolve().parents[2]
VLLM_BIN = Path(os.environ.get("MOESCOPE_VLLM_ENV", ROOT / ".venv-vllm")) / "bin"


# -- assembling rows (no vLLM needed) ------------------------------------------------------------------
def _seq(i: int, n: int) -> Sequence:
    return Sequence(seq_id=i, token_ids=list(range(10 * i + 3, 10 * i + 3 + n)), source="t", domain="t", doc_id=str(i), text_sha1="")


def _outputs(n_new: list[int]):
    return [SimpleNamespace(request_id=str(i), outputs=[SimpleNamespace(token_ids=[7] * k)]) for i, k in enumerate(n_new)]


def _rec(rows: list[tuple[str, int, int]], k: int = 2):
    """What StepRecorder.take() returns for rows (internal request id, position, token id), 1 layer."""
    names = list(dict.fromkeys(r[0] for r in rows))
    pos = np.array([r[1] for r in rows], np.int32)
    ids = (pos[None, :, None] + np.arange(k)[None, None, :]).astype(np.int16)  # ids encode the position: checkable
    return {"req_ids": names, "req": np.array([names.index(r[0]) for r in rows], np.int32), "pos": pos,
            "token_id": np.array([r[2] for r in rows], np.int32), "topk_ids": ids,
            "topk_weights": np.full(ids.shape, 0.5, np.float32), "router_output": None}


def test_rows_of_chunked_prefill_and_decode_steps_come_back_in_sequence_order():
    a, b = _seq(0, 3), _seq(1, 2)
    # step 1: a's prompt and b's first token; step 2: b's second token and a's first decode; step 3: a's decode
    rows = [("0-x", 0, 3), ("0-x", 1, 4), ("0-x", 2, 5), ("1-y", 0, 13), ("1-y", 1, 14), ("0-x", 3, 7), ("0-x", 4, 7)]
    block = block_from_vllm([a, b], _outputs([3, 1]), _rec(rows), CaptureSettings(generate=3))
    assert block.seq_id.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert block.pos.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert block.generated.tolist() == [False, False, False, True, True, False, False]
    assert block.topk_ids[0, :, 0].tolist() == block.pos.tolist()


def test_a_recomputed_request_keeps_one_row_per_position():
    a = _seq(0, 3)
    rows = [("0-x", 0, 3), ("0-x", 1, 4), ("0-x", 0, 3), ("0-x", 1, 4), ("0-x", 2, 5)]  # preempted, recomputed
    block = block_from_vllm([a], _outputs([1]), _rec(rows), CaptureSettings())
    assert block.pos.tolist() == [0, 1, 2]


def test_a_token_vllm_did_not_route_is_an_error_not_a_gap():
    a = _seq(0, 3)
    with pytest.raises(MoescopeError, match="routed 2 of the 3 tokens"):
        block_from_vllm([a], _outputs([1]), _rec([("0-x", 1, 4), ("0-x", 2, 5)]), CaptureSettings())


def test_chunks_hold_whole_sequences_of_about_one_shard():
    groups = list(chunks([_seq(i, 4) for i in range(5)], tokens=8))
    assert [[s.seq_id for s in g] for g in groups] == [[0, 1], [2, 3], [4]]


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_get_it(tmp_path):
    cli = [sys.executable, "-m", "moescope.cli.main", "capture", "moescope:tiny-moe", "--backend", "vllm",
           "--data", "humaneval", "--out", str(tmp_path / "t")]
    result = subprocess.run(cli, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --backend vllm needs vLLM in this environment: bash scripts/setup-vllm.sh, then run .venv-vllm/bin/moescope"]
    assert not (tmp_path / "t").exists()


# -- end to end: a real vLLM engine ------------------------------------------------------------------
def _vllm_moescope() -> Path:
    exe = VLLM_BIN / "moescope"
    if not exe.exists():
        pytest.skip(f"no vLLM environment at {VLLM_BIN.parent}: run bash scripts/setup-vllm.sh")
    probe = subprocess.run([VLLM_BIN / "python", "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"vLLM does not import in {VLLM_BIN.parent}: {probe.stderr.strip().splitlines()[-1]}")
    return exe


def _capture_both(tmp: Path, name: str, corpus: str, **opts):
    """(HF trace folder, vLLM trace folder) of the same corpus and options, float32 on both sides."""
    exe = _vllm_moescope()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if v is not True]
    flags += [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is True]
    vllm_out = tmp / f"{name}-vllm"
    result = subprocess.run([exe, "capture", "moescope:tiny-moe", "--backend", "vllm", "--data", corpus, "--out",
                             str(vllm_out), "--dtype", "float32", "--no-progress", *flags],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    hf_out = tmp / f"{name}-hf"
    hf_opts = {("save_router_output" if k == "save_logits" else k): v for k, v in opts.items()}
    moescope.capture("moescope:tiny-moe", corpus, out=hf_out, dtype="float32", progress=False, **hf_opts)
    return hf_out, vllm_out


def _routing(folder: Path, columns: str):
    return duckdb.sql(f"select {columns} from read_parquet('{folder}/routing/*.parquet') order by layer, seq_id, pos").fetchnumpy()


@pytest.fixture(scope="module")
def prompt_traces(tmp_path_factory):
    # shards of about 1,000 tokens: several engine calls, each shard but the last encoded while the next one runs
    return _capture_both(tmp_path_factory.mktemp("vllm"), "prompt", "humaneval,wiki", max_tokens=4000, seq_len=128,
                         save_logits=True, shard_tokens=1000)


@pytest.mark.vllm
def test_vllm_and_hf_choose_the_same_experts_for_the_same_tokens(prompt_traces):
    hf_out, vllm_out = prompt_traces
    cols = "seq_id, pos, layer, topk_ids, topk_weights, router_output"
    hf, vl = _routing(hf_out, cols), _routing(vllm_out, cols)
    for key in ("seq_id", "pos", "layer"):
        np.testing.assert_array_equal(hf[key], vl[key])
    hf_ids, vl_ids = np.stack(hf["topk_ids"]), np.stack(vl["topk_ids"])
    differ = (np.sort(hf_ids, -1) != np.sort(vl_ids, -1)).any(-1)
    # a differing row must be a near-tie: HF's k-th and (k+1)-th router logits (float16-stored) all but equal
    logits = np.sort(np.stack(hf["router_output"]), -1)[:, ::-1]
    k = hf_ids.shape[1]
    gap = logits[:, k - 1] - logits[:, k]
    assert differ.mean() <= 1e-3 and (gap[differ] < 1e-2).all(), (differ.sum(), gap[differ])
    same = ~differ
    np.testing.assert_allclose(np.stack(vl["topk_weights"])[same], np.stack(hf["topk_weights"])[same], atol=1e-3)
    np.testing.assert_allclose(np.stack(vl["router_output"]), np.stack(hf["router_output"]), atol=5e-3)


@pytest.mark.vllm
def test_vllm_trace_has_the_hf_manifest_fields_and_verifies(prompt_traces):
    hf_out, vllm_out = prompt_traces
    hf, vl = (json.loads((f / "manifest.json").read_text()) for f in prompt_traces)
    assert vl["complete"] and vl["layers"] == hf["layers"] and vl["model"] == hf["model"]
    assert vl["corpus"] == hf["corpus"] and vl["router_output_kind"] == hf["router_output_kind"] == "logits"
    assert vl["capture"]["backend"] == "vllm" and hf["capture"]["backend"] == "hf"
    assert "vllm" in vl["versions"]
    tokens = "select seq_id, pos, token_id, generated from read_parquet('{}/tokens/*.parquet') order by seq_id, pos"
    assert duckdb.sql(tokens.format(hf_out)).fetchall() == duckdb.sql(tokens.format(vllm_out)).fetchall()
    assert verify_trace(vllm_out).ok
    assert len(list((vllm_out / "routing").glob("*.parquet"))) >= 3  # one engine call per shard of ~1,000 tokens


@pytest.mark.vllm
def test_vllm_generation_marks_generated_tokens_and_routes_them_like_hf(tmp_path):
    hf_out, vllm_out = _capture_both(tmp_path, "gen", "gsm-symbolic", max_tokens=1500, seq_len=48, generate=6)
    con = duckdb.connect()
    marks = "select generated, count(*) from read_parquet('{}/tokens/*.parquet') group by 1 order by 1"
    (_, n_prompt), (_, n_gen) = con.sql(marks.format(vllm_out)).fetchall()
    assert n_prompt == 1500 and 0 < n_gen <= 5 * con.execute(f"select count(*) from '{vllm_out}/sequences/*.parquet'").fetchone()[0]
    # where both engines fed the same token at the same place, they routed it to the same experts
    joined = con.execute(f"""
        select count(*) as n, count(*) filter (where list_sort(h.topk_ids) = list_sort(v.topk_ids)) as same
        from read_parquet('{hf_out}/routing/*.parquet') h
        join read_parquet('{vllm_out}/routing/*.parquet') v using (seq_id, pos, layer)
        join read_parquet('{hf_out}/tokens/*.parquet') ht using (seq_id, pos)
        join read_parquet('{vllm_out}/tokens/*.parquet') vt using (seq_id, pos)
        where ht.token_id = vt.token_id""").fetchone()
    n, same = joined
    assert n >= 4 * 1500 and same >= n - max(1, n // 1000)
