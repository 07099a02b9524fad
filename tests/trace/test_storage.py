"""Traces on an object store (a real S3 server on loopback, moto): the same trace as a local folder, the commit
protocol without rename (unique part names, manifest PUT, lease), and how storage is configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import moescope
from moescope.errors import MoescopeError, TraceError
from moescope.trace.exchange import export_trace
from moescope.trace.lease import Lease
from moescope.trace.storage import location, parse_options, s3_keywords
from moescope.trace.verify import verify_trace
from moescope.trace.writer import TraceWriter

MANIFEST = {"model": {"id": "x"}, "corpus": {}, "capture": {}, "layers": []}


@pytest.fixture
def ids():
    return torch.randint(3, 256, (10, 16), generator=torch.Generator().manual_seed(5))


def _capture(model, ids, out, **kw):
    return moescope.capture(model, input_ids=ids, out=out, progress=False,
                            options=moescope.CaptureOptions(batch_size=2, shard_tokens=40, **kw))


def _checksums(trace) -> list[tuple]:
    return [(s["index"], table, s["files"][table]["rows"], s["files"][table]["sha256"])
            for s in trace.manifest["shards"] for table in ("routing", "tokens", "sequences")]


def _rows(trace) -> dict[str, list]:
    con = trace.duckdb()
    return {"routing": con.execute("SELECT * FROM routing ORDER BY seq_id, pos, layer").fetchall(),
            "tokens": con.execute("SELECT * FROM tokens ORDER BY seq_id, pos").fetchall(),
            "sequences": con.execute("SELECT * FROM sequences ORDER BY seq_id").fetchall()}


def test_capture_to_s3_is_the_local_trace(tiny_moe, ids, tmp_path, s3):
    local = _capture(tiny_moe, ids, tmp_path / "t")
    remote = _capture(tiny_moe, ids, f"{s3}/runs/t")
    assert remote.remote and str(remote.folder) == f"{s3}/runs/t"
    assert remote.complete and len(remote.manifest["shards"]) == 3
    assert _checksums(remote) == _checksums(local)  # the same bytes in every part
    assert _rows(remote) == _rows(local)
    reopened = moescope.open_trace(f"{s3}/runs/t")
    assert reopened.sql("SELECT count(*) AS n FROM routing")["n"][0] == 640
    for a, b in zip(local.shards(), reopened.shards(verify=True)):
        assert (a.topk_ids == b.topk_ids).all() and (a.topk_weights == b.topk_weights).all()
    assert verify_trace(f"{s3}/runs/t").ok
    export_trace(local, tmp_path / "a.jsonl", fmt="jsonl")
    export_trace(reopened, tmp_path / "b.jsonl", fmt="jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # part names carry the writer's token: a part no other writer can overwrite
    names = sorted(location(f"{s3}/runs/t").list())
    assert names[0] == "manifest.json" and all(n.count("-") == 2 for n in names[1:]), names
    # a rerun of the finished capture writes nothing (same manifest object)
    before = location(f"{s3}/runs/t").read_bytes("manifest.json")
    assert _capture(tiny_moe, ids, f"{s3}/runs/t").complete
    assert location(f"{s3}/runs/t").read_bytes("manifest.json") == before


def test_damage_on_s3_is_reported_by_object(tiny_moe, ids, s3):
    trace = _capture(tiny_moe, ids, f"{s3}/t")
    where = location(f"{s3}/t")
    rel = trace.manifest["shards"][1]["files"]["routing"]["path"]
    data = bytearray(where.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    where.write_bytes(rel, bytes(data))
    report = verify_trace(f"{s3}/t")
    assert not report.ok and f"{s3}/t/{rel}" in report.problems[0] and "checksum" in report.problems[0]
    where.write_bytes(rel, bytes(data[:-20]))
    with pytest.raises(TraceError, match="truncated"):
        list(moescope.open_trace(f"{s3}/t").shards())


def test_dead_writers_parts_are_removed_and_resume_gives_the_same_trace(tiny_moe, ids, tmp_path, s3, monkeypatch):
    full = _capture(tiny_moe, ids, tmp_path / "full")
    original = TraceWriter.write_shard
    calls = {"n": 0}

    def failing(self, tables, **kw):  # the third shard's parts are PUT, then the writer dies before its commit
        calls["n"] += 1
        if calls["n"] == 3:
            from moescope.trace.writer import write_parts
            write_parts(self.folder, tables, self.next_index(), tag=self.part_tag)
            raise OSError(28, "No space left on device")
        return original(self, tables, **kw)

    monkeypatch.setattr(TraceWriter, "write_shard", failing)
    with pytest.raises(OSError):
        _capture(tiny_moe, ids, f"{s3}/cut")
    monkeypatch.setattr(TraceWriter, "write_shard", original)
    where = location(f"{s3}/cut")
    partial = moescope.open_trace(f"{s3}/cut")
    listed = {f["path"] for s in partial.manifest["shards"] for f in s["files"].values()}
    stray = {n for n in where.list() if n.endswith(".parquet")} - listed
    assert not partial.complete and len(partial.manifest["shards"]) == 2 and len(stray) == 3  # unlisted parts
    assert not where.list("_lease")  # released on the way out
    resumed = _capture(tiny_moe, ids, f"{s3}/cut")
    assert resumed.complete and not stray & set(where.list())  # the next writer removed them
    assert _checksums(resumed) == _checksums(full) and _rows(resumed) == _rows(full)


def test_second_writer_is_refused_in_one_line(s3):
    with TraceWriter(f"{s3}/t", MANIFEST) as first:
        with pytest.raises(TraceError, match="being written by another moescope process") as err:
            TraceWriter(f"{s3}/t", MANIFEST)
        assert "\n" not in str(err.value) and str(os.getpid()) in str(err.value)
        assert list(location(f"{s3}/t").list("_lease")) == [first._lease.rel]  # the refused one left nothing
    with TraceWriter(f"{s3}/t", MANIFEST):  # released: the next one gets it
        pass


def test_a_killed_writers_lease_is_taken_over_at_once_on_its_machine(s3):
    """The lease of a process that no longer exists on this machine does not wait for its expiry."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    where = location(f"{s3}/t")
    ghost = Lease(where)
    ghost._put()
    holder = json.loads(where.read_bytes(ghost.rel))
    where.write_bytes(ghost.rel, json.dumps({**holder, "pid": dead_pid}).encode())
    with TraceWriter(f"{s3}/t", MANIFEST) as writer:
        assert list(where.list("_lease")) == [writer._lease.rel]
    # a live holder elsewhere (another host name) is waited for until it expires
    where.write_bytes(ghost.rel, json.dumps({**holder, "host": "elsewhere"}).encode())
    with pytest.raises(TraceError, match="another moescope process \\(elsewhere"):
        TraceWriter(f"{s3}/t", MANIFEST)
    where.write_bytes(ghost.rel, json.dumps({**holder, "host": "elsewhere", "expires": 0}).encode())
    with TraceWriter(f"{s3}/t", MANIFEST):
        pass


def test_writer_that_lost_its_lease_does_not_commit(s3):
    writer = TraceWriter(f"{s3}/t", MANIFEST)
    location(f"{s3}/t").delete(writer._lease.rel)  # as another writer does to a lease it found expired
    with pytest.raises(TraceError, match="lost its lease"):
        writer.update()
    writer.close()
    assert location(f"{s3}/t").size("manifest.json") is None


def test_a_contenders_candidate_does_not_stop_the_holder(s3):
    """A second writer's candidate is there for a moment (until it lists and sees the holder's): the holder commits
    on; the contender withdraws and is refused (before, both lost: found by the two-process test)."""
    where = location(f"{s3}/t")
    with TraceWriter(f"{s3}/t", MANIFEST) as writer:
        contender = Lease(where)
        contender._put()  # PUT, not yet listed
        writer.update()  # the holder's commit goes through
        assert where.size("manifest.json") is not None
        with pytest.raises(TraceError, match="another moescope process"):
            contender.acquire()
        assert list(where.list("_lease")) == [writer._lease.rel]


def test_refusals_before_anything_is_written(s3, s3_server):
    where = location(f"{s3}/mine")
    where.write_bytes("notes.txt", b"keep me")
    with pytest.raises(TraceError, match="not empty and is not a moescope trace"):
        TraceWriter(f"{s3}/mine", MANIFEST)
    assert where.list() == {"notes.txt": 7}
    with pytest.raises(TraceError, match="no such bucket"):
        TraceWriter("s3://no-such-bucket-here/t", MANIFEST)
    with pytest.raises(TraceError, match="no such trace"):
        moescope.open_trace(f"{s3}/nothing")
    with pytest.raises(TraceError, match="not a moescope trace"):
        moescope.open_trace(f"{s3}/mine")


def test_storage_options_profile_and_endpoint_variables(tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert s3_keywords({}) == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert s3_keywords({}) == {"endpoint_override": "127.0.0.1:9000", "scheme": "http", "region": "us-east-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:8443")  # the S3-specific one wins
    assert s3_keywords({})["endpoint_override"] == "s3.example:8443"
    (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    (tmp_path / "config").write_text("[profile lab]\nregion = eu-west-3\nendpoint_url = http://minio:9000\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    kw = s3_keywords({"profile": "lab"})
    assert kw == {"access_key": "AK", "secret_key": "SK", "region": "eu-west-3", "endpoint_override": "minio:9000",
                  "scheme": "http"}
    kw = s3_keywords({"profile": "lab", "endpoint_url": "http://127.0.0.1:1", "region": "x", "connect_timeout": "2"})
    assert (kw["endpoint_override"], kw["region"], kw["connect_timeout"]) == ("127.0.0.1:1", "x", 2.0)  # options first
    with pytest.raises(MoescopeError, match="profile 'nope'"):
        s3_keywords({"profile": "nope"})
    assert parse_options(["region=eu", "endpoint_url=http://h:1"]) == {"region": "eu", "endpoint_url": "http://h:1"}
    with pytest.raises(MoescopeError, match="give KEY=VALUE"):
        parse_options(["region"])
    with pytest.raises(MoescopeError, match="unknown option"):
        parse_options(["colour=red"])


def test_record_into_s3_is_the_local_recording(tiny_moe, ids, tmp_path, s3):
    """`moescope.record(model, out=URL)` around the user's own calls: the trace a local folder gets."""
    traces = []
    for out in (tmp_path / "rec", f"{s3}/rec"):
        with moescope.record(tiny_moe, out=out) as rec:
            for row in range(0, 10, 2):
                tiny_moe(input_ids=ids[row:row + 2])
        traces.append(rec.trace)
    local, remote = traces
    assert remote.remote and remote.complete and len(remote.manifest["shards"]) >= 1
    assert _checksums(remote) == _checksums(local) and _rows(remote) == _rows(local)
    with pytest.raises(TraceError, match="already holds a trace"):
        with moescope.record(tiny_moe, out=f"{s3}/rec"):
            pass


def test_concurrent_manifest_replacements_read_whole(s3):
    """A reader racing a writer that replaces a growing manifest always gets a whole one (storage.read_json)."""
    import threading

    where = location(f"{s3}/m")
    where.write_bytes("manifest.json", json.dumps({"n": 0, "pad": ""}).encode())
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            where.write_bytes("manifest.json", json.dumps({"n": n, "pad": "x" * n}).encode())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = [where.read_json("manifest.json") for _ in range(100)]
    finally:
        stop.set()
        thread.join()
    assert all(len(m["pad"]) == m["n"] for m in seen) and seen[-1]["n"] > seen[0]["n"]


def test_notebook_analyze_and_save_on_s3_match_the_local_folder(tiny_moe, ids, tmp_path, s3):
    from moescope.trace.storage import download

    saved = []
    for trace_at, results_at in ((tmp_path / "t", tmp_path / "res"), (f"{s3}/t", f"{s3}/res")):
        _capture(tiny_moe, ids, trace_at)
        results = moescope.analyze(moescope.open_trace(trace_at), only=["load", "coactivation"], model=tiny_moe)
        assert results.save(results_at) == results_at
        saved.append(download(results_at))
    local, remote = saved
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir()) and "summary.json" in names
    for name in names:
        a, b = (local / name).read_bytes(), (remote / name).read_bytes()
        if name == "summary.json":
            a, b = (json.loads(x)["analyses"] for x in (a, b))
        assert a == b, name
