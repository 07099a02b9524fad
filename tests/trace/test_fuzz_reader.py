"""Property-based: reading a damaged trace — mutated manifest bytes or fields, mutated or swapped Parquet parts
(with or without a manifest that agrees with them) — ends in the data or in one TraceError, never another
exception. Covers open_trace, shards() with and without checksums, table(), verify and export."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import moescope
from moescope.errors import MoescopeError
from moescope.trace.exchange import export_trace, import_jsonl
from moescope.trace.verify import verify_trace

ODD = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=6),
                st.sampled_from(["../../etc/passwd", "/etc/passwd", "routing", "", "routing/part-00000.parquet", -1, 0,
                                 2**31, [], {}]),
                st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@pytest.fixture(scope="module")
def base_trace(tmp_path_factory):
    """A small trace with three shards: 3 layers, top-2, imported (no model needed)."""
    folder = tmp_path_factory.mktemp("base")
    lines = [json.dumps({"problem_id": s, "layer": layer, "token_id": p, "expert_ids": [(s + p + layer) % 5, 5],
                         "weights": [0.75, 0.25]})
             for s in range(6) for p in range(4) for layer in range(3)]
    (folder / "in.jsonl").write_text("\n".join(lines))
    import_jsonl(folder / "in.jsonl", folder / "trace", shard_tokens=8)
    return folder / "trace"


def _copy(base, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / uuid.uuid4().hex
    shutil.copytree(base, dst)
    return dst


def _exercise(folder) -> str:
    """Every read path, each on its own; returns 'ok' or the first error. Any exception but a MoescopeError
    fails the test."""

    def shards(verify):
        trace = moescope.open_trace(folder)
        for shard in trace.shards(verify=verify):
            assert shard.topk_ids.shape[:2] == (trace.n_layers, len(shard.seq_id))

    def facts():
        trace = moescope.open_trace(folder)
        repr(trace), trace.n_tokens, trace.complete, trace.domain_names

    operations = [facts, lambda: shards(False), lambda: shards(True), lambda: verify_trace(folder).lines(),
                  lambda: export_trace(moescope.open_trace(folder), folder.parent / f"{folder.name}.jsonl", fmt="jsonl"),
                  *[lambda name=name: moescope.open_trace(folder).table(name) for name in ("routing", "tokens", "sequences")]]
    errors = []
    for operation in operations:
        try:
            operation()
        except MoescopeError as err:
            assert str(err)
            errors.append(str(err))
    assert not (folder.parent / f".{folder.name}.jsonl.tmp").exists()  # a failed export leaves no partial file
    return errors[0] if errors else "ok"


def _set_path(tree, path, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _paths(value, (*prefix, i))


@given(data=st.data())
def test_manifest_with_mutated_fields(base_trace, tmp_path_factory, data):
    folder = _copy(base_trace, tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    mutated = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(mutated) if p]
        path = data.draw(st.sampled_from(paths))
        _set_path(mutated, path, data.draw(st.one_of(ODD, st.just(_DELETE))))
    (folder / "manifest.json").write_text(json.dumps(mutated))
    _exercise(folder)
    assert not (folder.parent / "passwd.jsonl").exists()


@given(data=st.data())
def test_manifest_with_mutated_bytes(base_trace, tmp_path_factory, data):
    folder = _copy(base_trace, tmp_path_factory)
    raw = bytearray((folder / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at:at + data.draw(st.integers(1, 40))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    (folder / "manifest.json").write_bytes(bytes(raw))
    _exercise(folder)


@given(data=st.data(), table=st.sampled_from(["routing", "tokens", "sequences"]), agree=st.booleans())
def test_parquet_part_with_mutated_bytes(base_trace, tmp_path_factory, data, table, agree):
    """agree=True also rewrites the manifest's size and checksum, as if the writer itself had produced the bytes:
    then only the Parquet reader and the schema checks stand between the damage and the analyses."""
    folder = _copy(base_trace, tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][data.draw(st.integers(0, len(manifest["shards"]) - 1))]["files"][table]
    part = folder / entry["path"]
    raw = bytearray(part.read_bytes())
    op = data.draw(st.sampled_from(["flip", "cut", "random", "swap"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "random":
        raw = bytearray(data.draw(st.binary(max_size=600)))
    else:  # a valid Parquet file of another table in this one's place
        other = data.draw(st.sampled_from([t for t in ("routing", "tokens", "sequences") if t != table]))
        raw = bytearray((folder / manifest["shards"][0]["files"][other]["path"]).read_bytes())
    part.write_bytes(bytes(raw))
    if agree:
        entry["bytes"], entry["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    result = _exercise(folder)
    if not agree and op != "flip":
        assert result != "ok"  # size or checksum gives it away


def test_undamaged_base_reads(base_trace, tmp_path_factory):
    assert _exercise(_copy(base_trace, tmp_path_factory)) == "ok"
