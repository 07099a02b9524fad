"""Schema 2: every routing row's slots are in gate-weight order (descending, ties: lower id first), in the
Parquet parts, in `Trace.shards()`, in SQL, in JSONL/CSV exports and imports; schema-1 traces (slots in
the experts' order) are reordered when read, and `verify` finds a schema-2 part that breaks the order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import moescope
from moescope.errors import TraceError
from moescope.trace.exchange import export_trace, import_jsonl
from moescope.trace.manifest import sha256_file
from moescope.trace.verify import verify_trace


def _python_order(ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """The contract for one row, as plain Python: weight descending (NaN last), then id ascending; a row with
    no weight at all (ids by rank, as engines record them) as given."""
    if all(w != w for w in weights):
        return list(ids), list(weights)
    key = lambda slot: (-(slot[1] if slot[1] == slot[1] else -np.inf), slot[0])
    pairs = sorted(zip(ids, weights), key=key)
    return [i for i, _ in pairs], [w for _, w in pairs]


@pytest.mark.parametrize("rows", [1, 7, 256])
def test_order_slots_matches_a_python_sort_with_ties_and_nan(rows):
    from moescope.trace.slots import order_slots

    rng = np.random.default_rng(rows)
    k = 4
    ids = np.stack([rng.permutation(9)[:k] for _ in range(rows)]).astype(np.int16)
    weights = rng.choice(np.array([0.0, 0.25, 0.5, 0.5, 0.75, np.nan], np.float16), size=(rows, k))  # many ties
    weights[::3] = np.nan  # rows of ids only (engine imports): their order is the engine's rank order
    got_ids, got_w = order_slots(ids, weights)
    for r in range(rows):
        want_ids, want_w = _python_order(ids[r].tolist(), weights[r].tolist())
        assert got_ids[r].tolist() == want_ids
        np.testing.assert_array_equal(got_w[r], np.array(want_w, np.float16))
    assert ids.dtype == got_ids.dtype and weights.dtype == got_w.dtype


WEIGHTS = np.array([0.0, -0.0, 0.25, 0.5, 0.5, -0.5, np.inf, -np.inf, np.nan, 1e-8], np.float32)


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("ids_dtype", [np.int16, np.int32, np.int64])
@pytest.mark.parametrize("weights_dtype", [np.float16, np.float32, np.float64])
def test_order_slots_at_256_experts_top_8_matches_a_python_sort(rows, ids_dtype, weights_dtype):
    """Both the packed-key sort (int16-range ids, float16/32 weights) and the lexsort it falls back to (wider ids,
    float64 weights) against the contract written per row: signed zeros tie, infinities and NaN place, slot
    arrays move along, rows of ids only keep their order."""
    from moescope.trace.slots import order_slots

    rng = np.random.default_rng(rows)
    k = 8
    ids = rng.integers(0, 256, (rows, k)).astype(ids_dtype)  # repeats too: equal (weight, id) keep their order
    if ids_dtype is not np.int16:
        ids[0, 0] = 70000 if ids_dtype is np.int64 else -3  # beyond int16 (fallback) / negative
    weights = rng.choice(WEIGHTS, size=(rows, k)).astype(weights_dtype)
    weights[1::5] = np.nan
    norms = rng.random((rows, k)).astype(np.float32)
    got_ids, got_w, got_norms = order_slots(ids, weights, norms)
    for r in range(rows):
        if np.isnan(weights[r]).all():
            order = list(range(k))
        else:
            key = lambda slot: (-(weights[r, slot] if weights[r, slot] == weights[r, slot] else -np.inf), ids[r, slot], slot)
            order = sorted(range(k), key=key)
        assert got_ids[r].tolist() == ids[r, order].tolist()
        np.testing.assert_array_equal(got_w[r], weights[r, order])
        np.testing.assert_array_equal(np.signbit(got_w[r]), np.signbit(weights[r, order]))  # the stored zero, moved
        np.testing.assert_array_equal(got_norms[r], norms[r, order])
    assert (got_ids.dtype, got_w.dtype) == (ids.dtype, weights.dtype)


def test_order_slots_returns_rows_already_in_order_as_given():
    from moescope.trace.slots import order_slots

    ids = np.array([[[3, 1, 2]], [[0, 1, 2]]], np.int16)  # [L=2, T=1, k=3]
    weights = np.array([[[0.5, 0.25, 0.25]], [[0.5, 0.5, 0.0]]], np.float16)
    got = order_slots(ids, weights)
    assert got[0] is ids and got[1] is weights


def _jsonl(rows: list[dict], path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_import_and_export_put_the_largest_weight_first(tmp_path):
    rows = [
        {"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [3, 1, 5], "weights": [0.1, 0.6, 0.3]},
        {"problem_id": 0, "layer": 0, "token_id": 1, "expert_ids": [4, 2, 0], "weights": [0.25, 0.25, 0.5]},  # tie
        {"problem_id": 1, "layer": 0, "token_id": 0, "expert_ids": [7, 6, 1], "weights": [0.5, 0.3, 0.2]},  # sorted
    ]
    trace = import_jsonl(_jsonl(rows, tmp_path / "in.jsonl"), tmp_path / "t")
    shard = next(trace.shards())
    assert shard.topk_ids[0].tolist() == [[1, 5, 3], [0, 2, 4], [7, 6, 1]]
    np.testing.assert_allclose(shard.topk_weights[0], np.float16([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.5, 0.3, 0.2]]))
    export_trace(trace, tmp_path / "out.jsonl", fmt="jsonl")
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["expert_ids"] for r in exported] == [[1, 5, 3], [0, 2, 4], [7, 6, 1]]
    export_trace(trace, tmp_path / "out.csv", fmt="csv")
    assert (tmp_path / "out.csv").read_text().splitlines()[1].split(",")[4].strip('"') == "[1"
    assert trace.sql("SELECT topk_ids[1] AS first FROM routing ORDER BY seq_id, pos")["first"].tolist() == [1, 0, 7]


def _rewrite_routing(trace, reorder, schema_version: int) -> None:
    """Rewrite every routing part with `reorder` applied to each row's slots, and the manifest to match:
    how an older moescope (schema 1, slots as the experts received them) would have left the trace."""
    manifest = json.loads((trace.folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        entry = shard["files"]["routing"]
        path = trace.folder / entry["path"]
        table = pq.read_table(path)
        k = table.schema.field("topk_ids").type.list_size
        columns = {}
        for name, dtype in (("topk_ids", pa.int16()), ("topk_weights", pa.float32())):
            values = table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, k)[:, reorder]
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), dtype), k)
        for name, column in columns.items():
            table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)
        pq.write_table(table, path)
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    manifest["schema_version"] = schema_version
    (trace.folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def captured(tiny_moe, padded_batch, tmp_path):
    ids, mask = padded_batch
    return moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "v2", progress=False)


def test_schema1_trace_is_reordered_when_read(captured, tiny_moe, padded_batch, tmp_path):
    export_trace(captured, tmp_path / "v2.jsonl", fmt="jsonl")
    want = next(captured.shards())
    old = moescope.capture(tiny_moe, input_ids=padded_batch[0], attention_mask=padded_batch[1], out=tmp_path / "v1",
                           progress=False)
    _rewrite_routing(old, [1, 0], schema_version=1)  # top-2 slots swapped: slot 0 is now the smaller weight
    old = moescope.open_trace(tmp_path / "v1")
    raw = pq.read_table(tmp_path / "v1" / "routing").column("topk_weights").combine_chunks().flatten().to_numpy()
    assert (raw.reshape(-1, 2)[:, 0] < raw.reshape(-1, 2)[:, 1]).mean() > 0.9  # really stored out of order
    got = next(old.shards())
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    np.testing.assert_array_equal(got.topk_weights, want.topk_weights)
    np.testing.assert_array_equal(next(old.shards(ids_only=True)).topk_ids, want.topk_ids)  # ordered by the weights
    sql = old.sql("SELECT topk_ids, topk_weights FROM routing ORDER BY layer, seq_id, pos")
    np.testing.assert_array_equal(np.stack(sql["topk_ids"].to_numpy()), want.topk_ids.reshape(-1, 2))
    export_trace(old, tmp_path / "v1.jsonl", fmt="jsonl")
    assert (tmp_path / "v1.jsonl").read_text() == (tmp_path / "v2.jsonl").read_text()
    assert verify_trace(tmp_path / "v1").ok


def test_unfinished_schema1_capture_is_not_resumed_into(captured, tiny_moe, padded_batch, tmp_path):
    _rewrite_routing(captured, [1, 0], schema_version=1)
    manifest = json.loads((captured.folder / "manifest.json").read_text())
    (captured.folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    ids, mask = padded_batch
    with pytest.raises(TraceError, match="unfinished capture of trace schema 1"):
        moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=captured.folder, progress=False)
    again = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=captured.folder, progress=False, overwrite=True)
    assert again.manifest["schema_version"] == 2


def test_verify_finds_a_schema2_part_out_of_order(captured):
    assert verify_trace(captured.folder).ok
    _rewrite_routing(captured, [1, 0], schema_version=2)
    report = verify_trace(captured.folder)
    assert not report.ok and "not in gate-weight order" in report.problems[0]


def test_unknown_schema_version_is_refused_in_one_line(captured):
    manifest = json.loads((captured.folder / "manifest.json").read_text())
    (captured.folder / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 3}))
    with pytest.raises(TraceError, match=r"schema version 3 is not supported.*reads versions 1, 2"):
        moescope.open_trace(captured.folder)


def test_next_layer_prediction_is_in_the_predicting_routers_order(tiny_moe, padded_batch, tmp_path):
    ids, mask = padded_batch
    trace = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(predict_next_layer=True))
    shard = next(trace.shards())
    routers = [m for m in tiny_moe.modules() if type(m).__name__.endswith("TopKRouter")]
    inputs = []
    handles = [r.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]))) for r in routers]
    try:
        with torch.inference_mode():
            tiny_moe(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    keep = mask.reshape(-1).bool()
    for layer in range(len(routers) - 1):
        logits = (inputs[layer][keep] @ routers[layer + 1].weight.T).detach().double().numpy()
        preferred = np.argsort(-logits, axis=-1, kind="stable")[:, :2]  # most preferred first
        np.testing.assert_array_equal(shard.predicted_next_ids[layer], preferred)


def test_compare_reads_the_first_choice_of_a_schema1_trace(captured, tiny_moe, padded_batch, tmp_path):
    from moescope.pipeline.compare import compare_traces

    ids, mask = padded_batch
    old = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "v1", progress=False)
    _rewrite_routing(old, [1, 0], schema_version=1)
    summary = compare_traces(captured.folder, tmp_path / "v1", tmp_path / "cmp")
    assert summary["mean_top1_agreement"] == 1.0 and summary["mean_topk_jaccard"] == 1.0
