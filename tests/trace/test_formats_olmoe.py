"""OLMoE's routing-analysis JSONL (scripts/run_moe_analysis.py's layout, built here by hand) -> a trace."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

from moescope.cli.main import main

K, L, E = 8, 3, 64


def olmoe_line(rng, n: int) -> tuple[dict, np.ndarray]:
    """One line as OLMoE writes it, and its ids as [L, n, k] (largest logit first)."""
    logits = rng.normal(size=(L, n, E))
    ids = np.argsort(-logits, -1)[..., :K]  # what the script computes per layer
    exp_ids = np.stack(list(ids), -1)  # [n, k, L]: its np.stack(..., -1)
    return {"input_ids": rng.integers(0, 50000, n).tolist(), "predicted_token_ids": [0] * n,
            "exp_ids": exp_ids.tolist()}, ids


def test_olmoe_jsonl_becomes_one_sequence_per_line(tmp_path):
    rng = np.random.default_rng(2)
    lines = [olmoe_line(rng, n) for n in (1, 7, 30)]
    path = tmp_path / "c4_results.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in lines))
    assert main(["import", str(path), "--format", "olmoe", "--out", str(tmp_path / "t")]) == 0
    routing = duckdb.sql(f"select topk_ids from read_parquet('{tmp_path}/t/routing/*.parquet') "
                         "order by layer, seq_id, pos").fetchnumpy()["topk_ids"]
    np.testing.assert_array_equal(np.stack(routing).reshape(L, 38, K), np.concatenate([ids for _, ids in lines], 1))
    tokens = duckdb.sql(f"select seq_id, pos, token_id from read_parquet('{tmp_path}/t/tokens/*.parquet') "
                        "order by seq_id, pos").fetchnumpy()
    np.testing.assert_array_equal(tokens["token_id"], np.concatenate([row["input_ids"] for row, _ in lines]))
    np.testing.assert_array_equal(tokens["pos"], np.concatenate([np.arange(n) for n in (1, 7, 30)]))


@pytest.mark.parametrize("line, message", [
    ('{"input_ids": [1, 2]}', "expected an object with input_ids and exp_ids"),
    ('{"input_ids": [1, 2], "exp_ids": [[[1, 2]], [[3]]]}', "ragged"),
    ('{"input_ids": [1, 2], "exp_ids": [[[1], [2]]]}', "exp_ids must be integers [tokens=2]"),
    ('{"input_ids": [1], "exp_ids": [[[1], [1]]]}', "the same expert twice"),
    ('[1, 2', "not valid JSON"),
])
def test_malformed_lines_are_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    assert main(["import", str(path), "--format", "olmoe", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and message in err[0], err
    assert not (tmp_path / "t").exists()
