"""The commit protocol's fsyncs, recorded as they happen: a listed part is durable before the manifest that lists it,
and each commit's manifest rename is made durable (its folder fsynced) before the next step."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import moescope


def test_parts_are_fsynced_before_the_manifest_lists_them(tiny_moe, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def tracking_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def tracking_replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", tracking_fsync)
    monkeypatch.setattr(os, "replace", tracking_replace)
    ids = torch.randint(3, 256, (6, 8), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "t"
    # batches of 16 tokens: shard 0 holds two (committed when full), shard 1 the last (committed by the finish)
    moescope.capture(tiny_moe, input_ids=ids, out=out, progress=False,
                     options=moescope.CaptureOptions(batch_size=2, shard_tokens=24))
    monkeypatch.undo()
    manifest = str(out / "manifest.json")
    commits = [i for i, e in enumerate(events) if e == ("replace", manifest)]
    assert len(commits) == 2  # shard 0's commit, then the finish that also commits shard 1 (no manifest before)
    for n, part in enumerate(("part-00000", "part-00001")):
        for table in ("routing", "tokens", "sequences"):
            synced = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and path.endswith(f"{table}/{part}.parquet")]
            folder = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and path == str(out / table)]
            assert synced and synced[0] < commits[n], (table, part)  # data on disk before it is listed
            assert any(i < commits[n] for i in folder), (table, part)  # and its name too
    for commit in commits:  # a commit survives a crash: the manifest's folder is fsynced right after its rename
        assert events[commit + 1] == ("fsync", str(out))
    manifest_tmp = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and ".manifest.json.tmp-" in path]
    # each manifest's data is fsynced before its rename (the last one's in one round with shard 1's parts)
    assert len(manifest_tmp) == 2 and all(t < c for t, c in zip(manifest_tmp, commits)) and manifest_tmp[1] > commits[0]


def test_a_forked_child_can_commit_after_its_parent_did(tmp_path):
    """The warm CLI forks its commands from one process: fsyncs must not wait on threads only the parent has."""
    from moescope.trace.manifest import fsync_all

    (tmp_path / "a").write_text("x")
    fsync_all([tmp_path / "a", tmp_path])  # the parent's fsync threads exist now
    pid = os.fork()
    if pid == 0:
        import signal

        signal.alarm(20)  # a hang ends the child with SIGALRM, not the test run
        fsync_all([tmp_path / "a", tmp_path])
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_a_shard_held_for_finish_is_fsynced_by_whichever_commit_lists_it(tmp_path, monkeypatch):
    """write_shard(commit=False) defers its parts' fsync to the next manifest write, even when that is a commit."""
    import pyarrow as pa

    from moescope.trace.schema import SEQUENCES_SCHEMA, TOKENS_SCHEMA, routing_schema
    from moescope.trace.writer import TraceWriter

    def tables(seq: int) -> dict:
        routing = pa.table({"seq_id": pa.array([seq], pa.int32()), "pos": pa.array([0], pa.int32()),
                            "layer": pa.array([0], pa.int16()),
                            "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array([1], pa.int16()), 1),
                            "topk_weights": pa.FixedSizeListArray.from_arrays(pa.array([1.0], pa.float32()), 1)},
                           schema=routing_schema(1, 0, 0, 0))
        tokens = pa.table({"seq_id": pa.array([seq], pa.int32()), "pos": pa.array([0], pa.int32()),
                           "token_id": pa.array([5], pa.int32()), "generated": pa.array([False]),
                           "output_entropy": pa.array([None], pa.float32())}, schema=TOKENS_SCHEMA)
        sequences = pa.Table.from_pylist([dict(seq_id=seq, source="s", domain="d", doc_id="x", n_tokens=1,
                                               text_sha1="0" * 40)], schema=SEQUENCES_SCHEMA)
        return {"routing": routing, "tokens": tokens, "sequences": sequences}

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))), real_replace(src, dst))[1])
    out = tmp_path / "t"
    with TraceWriter(out, {"model": {"id": "x"}, "corpus": {}, "capture": {}, "layers": []}) as writer:
        writer.write_shard(tables(0), seq_id_min=0, seq_id_max=0, commit=False)
        writer.write_shard(tables(1), seq_id_min=1, seq_id_max=1)  # this commit lists shard 0 too
    monkeypatch.undo()
    first_commit = events.index(("replace", str(out / "manifest.json")))
    for table in ("routing", "tokens", "sequences"):
        synced = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and path.endswith(f"{table}/part-00000.parquet")]
        assert synced and synced[0] < first_commit, table
