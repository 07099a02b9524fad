"""SGLang per_token expert-distribution dumps, written here by hand in SGLang's layout, -> a trace."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

from moescope.cli.main import main

DECODER_LAYERS, E, PHYSICAL, K, SLOTS = 3, 8, 10, 2, 8  # layer 0 dense; 2 redundant physical experts; 8 slots
EXTEND, DECODE = 1, 2


class Payload:
    """Unpickling this would run code: a weights_only load must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def physical_to_logical() -> torch.Tensor:
    table = torch.arange(PHYSICAL) % E  # physical 8, 9 replicate logical 0, 1
    return table.repeat(DECODER_LAYERS, 1)


def record(rng, lengths: list[int] | None, mode: int, n: int) -> tuple[dict, np.ndarray]:
    """One forward pass of n tokens; returns (SGLang's record, the logical ids [MoE layers, n, k] it encodes)."""
    logical = np.argsort(rng.random((DECODER_LAYERS - 1, n, E)), axis=-1)[..., :K]
    physical = logical + np.where((logical < 2) & (rng.random(logical.shape) < 0.5), E, 0)  # some via replicas
    ids = torch.full((DECODER_LAYERS, n, SLOTS), -1, dtype=torch.int32)
    ids[1:, :, :K] = torch.from_numpy(physical.astype(np.int32))
    positions = np.concatenate([np.arange(m) + 3 for m in lengths]) if lengths else rng.integers(10, 50, n)
    rec = dict(forward_pass_id=int(rng.integers(100)), rank=0, gatherer_key="primary",
               input_ids=rng.integers(0, 5000, n).tolist(), positions=positions.tolist(), extend_seq_lens=lengths,
               forward_mode=mode, topk_ids_of_layer=ids, misc_objects=[], global_physical_count=torch.zeros(3, PHYSICAL))
    return rec, logical


def test_per_token_dump_becomes_one_sequence_per_request_with_logical_ids(tmp_path):
    rng = np.random.default_rng(3)
    passes = [record(rng, [1, 7, 12], EXTEND, 20), record(rng, None, DECODE, 3), record(rng, [5], EXTEND, 5)]
    path = tmp_path / "expert_distribution_recorder_1700000000.0_0.pt"
    torch.save(dict(records=[r for r, _ in passes], last_physical_to_logical_map=physical_to_logical()), path)
    assert main(["import", str(path), "--format", "sglang", "--out", str(tmp_path / "t")]) == 0

    ids = np.concatenate([logical for _, logical in passes], axis=1)  # [2, 28, k]
    routing = duckdb.sql(f"select topk_ids from read_parquet('{tmp_path}/t/routing/*.parquet') "
                         "order by layer, seq_id, pos").fetchnumpy()
    np.testing.assert_array_equal(np.stack(routing["topk_ids"]).reshape(ids.shape), ids)
    tokens = duckdb.sql(f"select seq_id, pos, token_id, generated from read_parquet('{tmp_path}/t/tokens/*.parquet') "
                        "order by seq_id, pos").fetchnumpy()
    sizes = [1, 7, 12, 1, 1, 1, 5]  # the extend pass's three requests, three one-token decodes, one more request
    np.testing.assert_array_equal(tokens["seq_id"], np.repeat(np.arange(7), sizes))
    np.testing.assert_array_equal(tokens["token_id"], np.concatenate([r["input_ids"] for r, _ in passes]))
    np.testing.assert_array_equal(tokens["pos"], np.concatenate([r["positions"] for r, _ in passes]))
    np.testing.assert_array_equal(tokens["generated"], np.repeat([False, True, False], [20, 3, 5]))


def _import_fails(tmp_path, path, capsys) -> str:
    assert main(["import", str(path), "--format", "sglang", "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()
    err = capsys.readouterr()
    assert "pwned" not in err.out
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")
    return lines[0]


def test_a_dump_with_a_pickled_object_is_refused_without_running_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rec, _ = record(rng, [4], EXTEND, 4)
    rec["misc_objects"] = [Payload()]
    torch.save(dict(records=[rec]), tmp_path / "evil.pt")
    assert "loads without unpickling objects" in _import_fails(tmp_path, tmp_path / "evil.pt", capsys)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(records=None), "no records list"),
    (lambda d: d.update(logical_count=torch.zeros(3, 8)), "'stat' dump"),
    (lambda d: d["records"][0].pop("positions"), "a record needs"),
    (lambda d: d["records"][0].update(extend_seq_lens=[3]), "does not add up"),
    (lambda d: d["records"][0].update(topk_ids_of_layer=torch.zeros(3, 4)), "integer tensor [layers, tokens, slots]"),
    (lambda d: d["records"][0]["topk_ids_of_layer"].__setitem__((1, 2, 1), -1), "fewer than 2 experts"),
    (lambda d: d["records"][0]["topk_ids_of_layer"].__setitem__((1, 2, 1), 99), "beyond last_physical_to_logical_map"),
])
def test_malformed_dumps_are_one_line_naming_the_file(tmp_path, capsys, mutate, message):
    rng = np.random.default_rng(1)
    rec, _ = record(rng, [4], EXTEND, 4)
    data = dict(records=[rec], last_physical_to_logical_map=physical_to_logical())
    mutate(data)
    torch.save(data, tmp_path / "bad.pt")
    assert message in _import_fails(tmp_path, tmp_path / "bad.pt", capsys)


def test_not_a_torch_file(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"\x00garbage")
    assert "loads without unpickling objects" in _import_fails(tmp_path, tmp_path / "x.pt", capsys)
