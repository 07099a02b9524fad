"""`moescope export --format replay`: per request int16 [tokens, MoE layers, k], and back through the vLLM reader."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

import moescope
from moescope.cli.main import main


@pytest.fixture(scope="module")
def generated_trace(tiny_model_dir, tmp_path_factory):
    """A real capture of prompts and greedy continuations on a tiny random Qwen3-MoE."""
    out = tmp_path_factory.mktemp("replay") / "trace"
    texts = ["def f(x): return x", "The cat sat on the mat.", "1 + 2 = 3", "a"]
    return moescope.capture(str(tiny_model_dir), texts, out=out, progress=False,
                            options=moescope.CaptureOptions(generate=3, seq_len=32, dtype="float32"))


def test_replay_layout_holds_each_sequence_and_reads_back_as_the_same_trace(generated_trace, tmp_path):
    folder = generated_trace.folder
    assert main(["export", str(folder), "--format", "replay", "--out", str(tmp_path / "routes.npz")]) == 0
    routing = duckdb.sql(f"select seq_id, pos, layer, topk_ids from read_parquet('{folder}/routing/*.parquet') "
                         "order by seq_id, pos, layer").fetchnumpy()
    tokens = duckdb.sql(f"select seq_id, token_id, generated from read_parquet('{folder}/tokens/*.parquet') "
                        "order by seq_id, pos").fetchnumpy()
    L = int(routing["layer"].max()) + 1
    with np.load(tmp_path / "routes.npz", allow_pickle=False) as npz:
        assert npz["moe_decoder_layers"].tolist() == [l["decoder_layer"] for l in generated_trace.layers]
        for seq in np.unique(tokens["seq_id"]):
            mine = routing["seq_id"] == seq
            expected = np.stack(routing["topk_ids"][mine]).reshape(-1, L, 2)  # rows ordered (pos, layer)
            assert npz[f"routed_experts_{seq}"].dtype == np.int16
            np.testing.assert_array_equal(npz[f"routed_experts_{seq}"], expected)
            np.testing.assert_array_equal(npz[f"token_ids_{seq}"], tokens["token_id"][tokens["seq_id"] == seq])
            np.testing.assert_array_equal(npz[f"generated_{seq}"], tokens["generated"][tokens["seq_id"] == seq])
        assert tokens["generated"].any()

    assert main(["import", str(tmp_path / "routes.npz"), "--format", "vllm", "--out", str(tmp_path / "back")]) == 0
    query = "select seq_id, pos, layer, topk_ids from read_parquet('{}/routing/*.parquet') order by all"
    assert duckdb.sql(query.format(tmp_path / "back")).fetchall() == duckdb.sql(query.format(folder)).fetchall()
    query = "select seq_id, pos, token_id, generated from read_parquet('{}/tokens/*.parquet') order by all"
    assert duckdb.sql(query.format(tmp_path / "back")).fetchall() == duckdb.sql(query.format(folder)).fetchall()


def test_a_trace_of_partial_sequences_is_refused_in_one_line(tmp_path, capsys):
    # a vLLM response that skipped its first 2 prompt rows (routed_experts_prompt_start=2)
    response = {"choices": [{"token_ids": [9], "prompt_token_ids": [1, 2, 3, 4], "routed_experts": [[[1, 2]], [[3, 4]]]}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(response))
    assert main(["import", str(tmp_path / "r.jsonl"), "--format", "vllm", "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "t"), "--format", "replay", "--out", str(tmp_path / "x.npz")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 't'}: sequence 0 does not hold positions 0..1; "
                                               "the replay layout needs whole sequences")
    assert not (tmp_path / "x.npz").exists() and not list(tmp_path.glob(".x.npz*"))
