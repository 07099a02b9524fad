"""Trace storage: exchange formats round-trip, interrupted captures resume exactly, damage is detected."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import moescope
from moescope.errors import ImportFormatError, TraceError
from moescope.trace.exchange import export_trace, import_jsonl
from moescope.trace.verify import verify_trace
from moescope.trace.writer import TraceWriter


@pytest.fixture
def ids():
    return torch.randint(3, 256, (10, 16), generator=torch.Generator().manual_seed(5))


def _capture(model, ids, out, **kw):
    return moescope.capture(model, input_ids=ids, out=out, progress=False,
                            options=moescope.CaptureOptions(batch_size=2, shard_tokens=40, **kw))


def test_jsonl_roundtrip_and_row_format(tiny_moe, ids, tmp_path):
    trace = _capture(tiny_moe, ids, tmp_path / "t")
    assert len(trace.manifest["shards"]) == 3  # 160 tokens in batches of 32; a shard closes at >= 40 tokens
    n = export_trace(trace, tmp_path / "r.jsonl", fmt="jsonl")
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert n == len(lines) == 10 * 16 * 4
    first = json.loads(lines[0])
    assert set(first) == {"problem_id", "layer", "token_id", "expert_ids", "weights"}
    assert (first["problem_id"], first["token_id"], first["layer"]) == (0, 0, 0)  # row index, position
    back = import_jsonl(tmp_path / "r.jsonl", tmp_path / "back")
    a = [s for s in trace.shards()]
    b = [s for s in back.shards()]
    np.testing.assert_array_equal(np.concatenate([s.topk_ids for s in a], 1), np.concatenate([s.topk_ids for s in b], 1))
    np.testing.assert_array_equal(np.concatenate([s.topk_weights for s in a], 1), np.concatenate([s.topk_weights for s in b], 1))


def test_trace_is_compact_and_readable_by_duckdb_and_pyarrow(tiny_moe, ids, tmp_path):
    trace = _capture(tiny_moe, ids, tmp_path / "t")
    assert trace.sql("SELECT count(*) AS n FROM routing")["n"][0] == 640
    table = pq.read_table(tmp_path / "t" / "routing")
    assert table.num_rows == 640 and table.schema.field("topk_ids").type.list_size == 2


def test_csv_export(tiny_moe, ids, tmp_path):
    trace = _capture(tiny_moe, ids, tmp_path / "t")
    export_trace(trace, tmp_path / "r.csv", fmt="csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "seq_id,pos,token_id,layer,expert_ids,weights" and len(lines) == 641


def test_interrupted_capture_resumes_to_the_same_trace(tiny_moe, ids, tmp_path, monkeypatch):
    full = _capture(tiny_moe, ids, tmp_path / "full")
    original = TraceWriter.write_shard
    calls = {"n": 0}

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, *a, **kw)

    monkeypatch.setattr(TraceWriter, "write_shard", failing)
    with pytest.raises(OSError):
        _capture(tiny_moe, ids, tmp_path / "cut")
    monkeypatch.setattr(TraceWriter, "write_shard", original)
    partial = moescope.open_trace(tmp_path / "cut")
    assert not partial.complete and len(partial.manifest["shards"]) == 2
    assert verify_trace(tmp_path / "cut").ok
    resumed = _capture(tiny_moe, ids, tmp_path / "cut")
    assert resumed.complete
    export_trace(full, tmp_path / "a.jsonl", fmt="jsonl")
    export_trace(resumed, tmp_path / "b.jsonl", fmt="jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_complete_trace_is_not_overwritten(tiny_moe, ids, tmp_path):
    _capture(tiny_moe, ids, tmp_path / "t")
    with pytest.raises(TraceError, match="already holds a complete trace with different capture settings"):
        _capture(tiny_moe, ids, tmp_path / "t", seq_len=8)
    (tmp_path / "f").write_text("x")
    with pytest.raises(TraceError, match="is a file"):
        _capture(tiny_moe, ids, tmp_path / "f")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TraceError, match="not empty"):
        _capture(tiny_moe, ids, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_second_writer_is_refused(tmp_path):
    manifest = {"model": {"id": "x"}, "corpus": {}, "capture": {}, "layers": []}
    with TraceWriter(tmp_path / "t", manifest):
        with pytest.raises(TraceError, match="another moescope process"):
            TraceWriter(tmp_path / "t", manifest)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damage_is_reported_by_file(tiny_moe, ids, tmp_path, damage):
    trace = _capture(tiny_moe, ids, tmp_path / "t")
    part = tmp_path / "t" / trace.manifest["shards"][1]["files"]["routing"]["path"]
    if damage == "truncate":
        part.write_bytes(part.read_bytes()[:-20])
    elif damage == "flip":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    elif damage == "delete":
        part.unlink()
    else:
        manifest = tmp_path / "t" / "manifest.json"
        manifest.write_text(manifest.read_text()[:100])
        with pytest.raises(TraceError, match="manifest is corrupt"):
            moescope.open_trace(tmp_path / "t")
        return
    report = verify_trace(tmp_path / "t")
    assert not report.ok and str(part) in report.problems[0]
    if damage != "flip":  # a flipped byte keeps the size: only the checksum (verify) sees it
        with pytest.raises(TraceError, match=part.name):
            list(moescope.open_trace(tmp_path / "t").shards())


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1]}', "missing field"),
        ('{"problem_id": -1, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [1.0]}', "problem_id"),
        ('{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1, 1], "weights": [0.5, 0.5]}', "repeats"),
        ('{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [NaN]}', "finite"),
        ('{"problem_id": 0, "layer": 1, "token_id": 0, "expert_ids": [1], "weights": [1.0]}', "0..L-1"),
    ],
)
def test_malformed_jsonl_is_rejected_with_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ImportFormatError, match=message):
        import_jsonl(path, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifest_layers_need_a_positive_top_k(tiny_moe, ids, tmp_path):
    """A layer saying top_k 0 is a discovery bug, not a trace to analyse (issue 12, point 3)."""
    trace = _capture(tiny_moe, ids, tmp_path / "t")
    manifest = json.loads((trace.folder / "manifest.json").read_text())
    manifest["layers"][1]["top_k"] = 0
    (trace.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match=r"layers\[1\] lacks positive n_experts/top_k"):
        moescope.open_trace(trace.folder)


def test_routing_is_read_in_batches_that_cut_layers_anywhere(tmp_path, monkeypatch):
    """Trace.read_shard reads a routing part in batches of ROUTING_BATCH_ROWS rows into [L, T, k] arrays: batches of 7
    rows (cutting layers and tokens anywhere) give the same shards as one batch; rows out of order are refused."""
    import dataclasses

    import pyarrow as pa

    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.trace import reader
    from moescope.trace.reader import open_trace

    spec = SyntheticSpec(n_layers=3, n_experts=16, top_k=4, vocab_size=50, seq_len=(3, 9))
    write_synthetic_trace(tmp_path / "t", spec, 50, 20)
    whole = list(open_trace(tmp_path / "t").shards())
    monkeypatch.setattr(reader, "ROUTING_BATCH_ROWS", 7)
    for a, b in zip(whole, open_trace(tmp_path / "t").shards(), strict=True):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert (x is None and y is None) or np.array_equal(x, y), field.name
    trace = open_trace(tmp_path / "t")
    entry = trace.manifest["shards"][0]["files"]["routing"]
    table = pq.read_table(tmp_path / "t" / entry["path"])
    T = len(whole[0].seq_id)
    two_rows_swapped = pa.concat_tables([table.slice(0, 8), table.slice(9, 1), table.slice(8, 1), table.slice(10)])
    two_layers_swapped = pa.concat_tables([table.slice(T, T), table.slice(0, T), table.slice(2 * T)])  # same tokens
    for bad in (two_rows_swapped, two_layers_swapped):
        pq.write_table(bad, tmp_path / "t" / entry["path"])
        entry["bytes"] = (tmp_path / "t" / entry["path"]).stat().st_size
        with pytest.raises(TraceError, match="not one row per token and layer"):
            trace.read_shard(trace.manifest["shards"][0])
