"""Property-based: `moescope import` on arbitrary and almost-valid JSONL ends in the trace the rows describe
or in one ImportFormatError — never another exception, and never a partly written trace folder."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moescope.errors import MoescopeError
from moescope.trace.exchange import import_jsonl

FIELDS = ("problem_id", "layer", "token_id", "expert_ids", "weights")

# values a field might hold instead of the right one
odd_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=5), st.sampled_from([2**31, 2**31 - 1, 2**15, -1, 10**30, 1e308, -0.0]),
)
odd_values = st.one_of(odd_scalars, st.lists(odd_scalars, max_size=3), st.dictionaries(st.text(max_size=3), odd_scalars, max_size=2))


@st.composite
def routing_rows(draw):
    """Rows of a small valid routing table (tokens x layers), then maybe damaged, reordered or duplicated."""
    n_seq, n_pos, n_layers, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n_experts = draw(st.integers(k, 9))
    rows = []
    for seq in range(n_seq):
        for pos in range(n_pos):
            for layer in range(n_layers):
                ids = draw(st.permutations(range(n_experts)))[:k]
                weights = draw(st.lists(st.floats(0, 1, width=16), min_size=k, max_size=k))
                rows.append({"problem_id": seq * 7, "layer": layer, "token_id": pos, "expert_ids": ids, "weights": weights})
    rows = draw(st.permutations(rows))  # lines in any order: layers out of order, sequences interleaved
    for _ in range(draw(st.integers(0, 2))):
        row = dict(draw(st.sampled_from(rows)))
        mutation = draw(st.sampled_from(["field", "drop", "extra", "duplicate", "nan", "huge", "negative"]))
        key = draw(st.sampled_from(FIELDS))
        if mutation == "field":
            row[key] = draw(odd_values)
        elif mutation == "drop":
            row.pop(key)
        elif mutation == "extra":
            row[draw(st.text(max_size=4))] = draw(odd_values)
        elif mutation == "nan":
            row["weights"] = [math.nan] + row["weights"][1:]
        elif mutation == "huge":
            row[key] = draw(st.sampled_from([2**63, 10**400, 1e300, -(2**40)]))
        elif mutation == "negative":
            row["expert_ids"] = [-1] + row["expert_ids"][1:]
        rows.append(row) if mutation == "duplicate" else rows.insert(draw(st.integers(0, len(rows))), row)
    return rows


def _line(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _import(tmp_path, data: bytes):
    """(trace or None, the error); asserts the only error is a MoescopeError and nothing half-written stays."""
    case = tmp_path / uuid.uuid4().hex
    case.mkdir()
    (case / "in.jsonl").write_bytes(data)
    try:
        return import_jsonl(case / "in.jsonl", case / "out", shard_tokens=3), None
    except MoescopeError as err:
        assert str(err) and "\n" not in str(err)
        out = case / "out"
        assert not out.exists() or not (out / "manifest.json").exists() or not json.loads((out / "manifest.json").read_text())["shards"]
        return None, err


def _expected(rows) -> dict:
    """(seq, pos, layer) -> (ids, float16 weights), if the rows are a valid table; else None. Slots in schema-2
    order: float16 weight descending, equal weights by expert id ascending."""
    table = {}
    for row in rows:
        slots = sorted(zip(row["expert_ids"], np.float16(row["weights"]).tolist()), key=lambda s: (-s[1], s[0]))
        table[(row["problem_id"], row["token_id"], row["layer"])] = ([i for i, _ in slots], np.float16([w for _, w in slots]))
    return table


def _check_trace(trace, rows) -> None:
    expected = _expected(rows)
    got = {}
    for shard in trace.shards(verify=True):
        for layer in range(trace.n_layers):
            for t in range(len(shard.seq_id)):
                got[(int(shard.seq_id[t]), int(shard.pos[t]), layer)] = (shard.topk_ids[layer, t].tolist(),
                                                                         shard.topk_weights[layer, t].astype(np.float16))
    assert got.keys() == expected.keys()
    for key, (ids, weights) in expected.items():
        assert got[key][0] == ids and np.array_equal(got[key][1], weights), key


@given(rows=routing_rows())
def test_almost_valid_rows_give_their_trace_or_one_clear_error(tmp_path_factory, rows):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    trace, err = _import(tmp_path, b"\n".join(_line(r) for r in rows) + b"\n")
    if trace is not None:
        _check_trace(trace, rows)


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_give_one_clear_error(tmp_path_factory, data):
    trace, err = _import(tmp_path_factory.mktemp("fuzz"), data)
    assert trace is None  # random bytes are never five valid fields per line


@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_arbitrary_text_and_json_fragments(tmp_path_factory, text):
    _import(tmp_path_factory.mktemp("fuzz"), text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("data", [
    b"", b"\n\n\n", b"\xef\xbb\xbf" + b'{"problem_id": 0}', b"[" * 100_000, b'{"problem_id": ' + b"9" * 5000 + b"}",
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [' + b"9" * 5000 + b"]}",
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [1e400]}',
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [70000.0]}',
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [Infinity]}',
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [1], "\xed\xa0\x80": 1}',
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [0.5]}\n' * 2,
    b'{"problem_id": 2147483647, "layer": 0, "token_id": 2147483647, "expert_ids": [32767], "weights": [1]}',
    b'{"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1], "weights": [0.5]}\r\n\x00',
])
def test_edge_cases(tmp_path, data):
    trace, err = _import(tmp_path, data)
    if trace is not None:
        assert trace.complete and trace.n_tokens == 1
