"""`moescope capture --out s3://...` SIGKILLed at random points: rerunning the same command ends in exactly the
trace an uninterrupted capture writes to a local folder (same rows, same shards, same checksums), and the
killed writers' lease and unlisted parts are gone. The S3 server is moto on loopback, reached through
--storage-option alone (the warm CLI's environment has no AWS variables)."""

from __future__ import annotations

import os
import random
import signal

import moescope
from moescope.cli.main import main
from moescope.trace.storage import location
from moescope.trace.verify import verify_trace
from warm_cli import wait_until


def _corpus(path, n_docs: int) -> str:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her an it are were which this be".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n_docs)))
    return str(path)


def _files(trace) -> list:
    return [(s["seq_id_min"], s["seq_id_max"], {k: (f["rows"], f["sha256"]) for k, f in s["files"].items()})
            for s in trace.manifest["shards"]]


def test_capture_to_s3_killed_twice_resumes_to_the_uninterrupted_trace(warm_cli, tiny_model_dir, tmp_path, s3,
                                                                       s3_server):
    corpus = _corpus(tmp_path / "docs.txt", 40)
    args = ["--data", corpus, "--seq-len", "16", "--batch-size", "2", "--shard-tokens", "48", "--device", "cpu",
            "--no-progress"]
    status, log = warm_cli.run(["capture", tiny_model_dir, *args, "--out", tmp_path / "reference"])
    assert status == 0, log
    reference = moescope.open_trace(tmp_path / "reference")
    where = location(f"{s3}/killed")
    credentials = [f"--storage-option={k}={v}" for k, v in (("endpoint_url", s3_server.endpoint), ("access_key", "k"),
                                                             ("secret_key", "s"))]
    argv = ["capture", tiny_model_dir, *args, "--out", str(where), *credentials]

    def committed() -> int:
        return len(where.read_json("manifest.json")["shards"]) if where.size("manifest.json") else 0

    rng, history = random.Random(3), []
    for attempt in range(2):
        before = committed()
        run = warm_cli.start(argv)
        if wait_until(lambda: committed() >= before + 1 + attempt, run):
            run.finished(rng.uniform(0, 0.03))
            run.kill()
        status = run.wait()
        history.append(f"kill {attempt}: shards {before}->{committed()}, exit {status}")
        assert status == -9, (history, run.log.read_text()[-2000:])
        assert where.list("_lease"), history  # a SIGKILLed writer cannot release its lease ...
        assert verify_trace(str(where)).ok, history  # ... and what it committed stays valid
    status, log = warm_cli.run(argv)  # ... which the next run on this machine takes over at once
    assert status == 0, (history, log)
    resumed = moescope.open_trace(str(where))
    assert resumed.complete and _files(resumed) == _files(reference), history
    con_a, con_b = reference.duckdb(), resumed.duckdb()
    for query in ("SELECT * FROM routing ORDER BY seq_id, pos, layer", "SELECT * FROM tokens ORDER BY seq_id, pos",
                  "SELECT * FROM sequences ORDER BY seq_id"):
        assert con_a.execute(query).fetchall() == con_b.execute(query).fetchall()
    listed = {f["path"] for s in resumed.manifest["shards"] for f in s["files"].values()}
    assert set(where.list()) == listed | {"manifest.json"}, history  # no lease, no unlisted part left


def test_a_second_capture_on_the_same_prefix_is_refused_in_one_line(warm_cli, tiny_model_dir, tmp_path, s3, s3_server,
                                                                     capsys):
    """Two `moescope capture` processes on one s3:// prefix (the warm CLI's child, and this test's own process):
    the second is refused while the first holds the lease (the first is paused meanwhile, so it is still writing
    whatever the machine's speed; a paused process on this machine is still a live holder)."""
    corpus = _corpus(tmp_path / "docs.txt", 60)
    where = location(f"{s3}/t")
    flags = [f"--storage-option=endpoint_url={s3_server.endpoint}", "--storage-option=access_key=k",
             "--storage-option=secret_key=s"]
    argv = ["capture", tiny_model_dir, "--data", corpus, "--seq-len", "16", "--batch-size", "2", "--shard-tokens", "48",
            "--device", "cpu", "--no-progress", "--out", str(where), *flags]
    first = warm_cli.start(argv)
    assert wait_until(lambda: where.size("manifest.json") is not None, first), first.log.read_text()[-2000:]  # holds it
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert not moescope.open_trace(str(where)).complete  # caught mid-capture
        status = main([str(a) for a in argv])
    finally:
        os.kill(first.pid, signal.SIGCONT)
    log = capsys.readouterr().err
    assert status == 2 and log.strip().count("\n") == 0, log
    assert log.startswith(f"error: {where} is being written by another moescope process (") and f"pid {first.pid})" in log
    assert first.wait() == 0, first.log.read_text()[-2000:]  # the first one was not disturbed
    assert moescope.open_trace(str(where)).complete and verify_trace(str(where)).ok
