"""`moescope capture` SIGKILLed at random points, again and again: rerunning the same command ends in exactly
the trace an uninterrupted capture writes — no row lost, none duplicated, committed shards always valid.

The kills land on the real command line in its own process (tests/warm_cli.py), at random moments chosen
by a seeded generator: before any shard, mid-forward, mid-Parquet-write, mid-manifest-replace.
"""

from __future__ import annotations

import json
import random

import pytest

import moescope
from moescope.trace.exchange import export_trace
from moescope.trace.verify import verify_trace
from warm_cli import WarmCli, wait_until


def _corpus(path, n_docs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the of and to in is was for on that with as by at from his her an it are were which this be".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n_docs)))
    return str(path)


def _committed(out) -> int:
    """Shards the manifest lists (the manifest is replaced atomically, so it is always whole)."""
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except FileNotFoundError:
        return 0


def _tables(trace) -> dict[str, list]:
    con = trace.duckdb()
    return {
        "routing": con.execute("SELECT * FROM routing ORDER BY seq_id, pos, layer").fetchall(),
        "tokens": con.execute("SELECT * FROM tokens ORDER BY seq_id, pos").fetchall(),
        "sequences": con.execute("SELECT * FROM sequences ORDER BY seq_id").fetchall(),
    }


def kill_loop(cli: WarmCli, argv: list[str], out, *, kills: int, seed: int, max_extra_shards: int = 3) -> list[str]:
    """SIGKILL `argv` `kills` times at random points, then rerun it to the end; returns what happened."""
    rng = random.Random(seed)
    history = []
    for attempt in range(kills):
        before = _committed(out)
        target = before + rng.randint(0, max_extra_shards)  # 0: killed before its first commit
        run = cli.start(argv)
        reached = wait_until(lambda: _committed(out) >= target, run)
        if reached:
            delay = rng.uniform(0, 0.04)
            run.finished(delay)  # sleeps `delay` unless the command ends first
            run.kill()
        status = run.wait()
        history.append(f"kill {attempt}: shards {before}->{_committed(out)}, exit {status}")
        assert status in (-9, 0), (history, run.log.read_text()[-3000:])
        assert _committed(out) >= before, history  # a kill never takes back a committed shard
        if _committed(out):
            report = verify_trace(out)
            assert report.ok, (history, report.lines())  # what is committed stays valid after every kill
        if status == 0:
            break
    else:
        status, log = cli.run(argv)
        history.append(f"final run: exit {status}")
        assert status == 0, (history, log[-3000:])
    return history


def check_same_trace(reference_dir, resumed_dir, history) -> None:
    reference, resumed = moescope.open_trace(reference_dir), moescope.open_trace(resumed_dir)
    assert resumed.complete, history
    n_layers = reference.n_layers
    tables = _tables(resumed)
    keys = [(r[0], r[1], r[2]) for r in tables["routing"]]
    assert len(keys) == len(set(keys)) == reference.n_tokens * n_layers, history  # none lost, none duplicated
    assert tables == _tables(reference), history
    export_trace(reference, reference_dir.parent / "reference.jsonl", fmt="jsonl")
    export_trace(resumed, resumed_dir.parent / "resumed.jsonl", fmt="jsonl")
    assert (reference_dir.parent / "reference.jsonl").read_bytes() == (resumed_dir.parent / "resumed.jsonl").read_bytes()
    # shard by shard, byte for byte: the resumed run cut the same shards and wrote the same Parquet
    files = lambda t: [(s["seq_id_min"], s["seq_id_max"], {k: f["sha256"] for k, f in s["files"].items()})  # noqa: E731
                       for s in t.manifest["shards"]]
    assert files(resumed) == files(reference), history
    leftovers = [p.name for p in resumed_dir.rglob(".*") if p.name != ".moescope.lock"]
    assert leftovers == [], (leftovers, history)
    assert verify_trace(resumed_dir).ok


def test_capture_killed_three_times_resumes_to_the_uninterrupted_trace(warm_cli, tiny_model_dir, tmp_path):
    corpus = _corpus(tmp_path / "docs.txt", 40)
    args = ["--data", corpus, "--seq-len", "16", "--batch-size", "2", "--shard-tokens", "48", "--device", "cpu",
            "--no-progress"]
    status, log = warm_cli.run(["capture", tiny_model_dir, *args, "--out", tmp_path / "reference"])
    assert status == 0, log
    assert len(moescope.open_trace(tmp_path / "reference").manifest["shards"]) >= 10  # room to kill between commits
    history = kill_loop(warm_cli, ["capture", tiny_model_dir, *args, "--out", tmp_path / "killed"], tmp_path / "killed",
                        kills=3, seed=8)
    print("\n".join(history))  # pytest -s shows where each kill landed
    assert sum("exit -9" in h for h in history) >= 2, history  # the kills did land
    assert any(h.endswith("exit -9") and not h.split("->")[1].startswith("0,") for h in history), history  # mid-capture
    check_same_trace(tmp_path / "reference", tmp_path / "killed", history)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_shipped_model_capture_survives_many_kills(warm_cli, tmp_path, seed):
    args = ["--data", "wiki", "--max-tokens", "3000", "--seq-len", "32", "--batch-size", "4", "--shard-tokens", "96",
            "--device", "cpu", "--no-progress", "--save-logits", "--output-entropy"]
    status, log = warm_cli.run(["capture", "moescope:tiny-moe", *args, "--out", tmp_path / "reference"])
    assert status == 0, log
    history = kill_loop(warm_cli, ["capture", "moescope:tiny-moe", *args, "--out", tmp_path / "killed"],
                        tmp_path / "killed", kills=12, seed=seed, max_extra_shards=2)
    print("\n".join(history))
    assert sum("exit -9" in h for h in history) >= 8, history
    assert sum(h.endswith("exit -9") and not h.split("->")[1].startswith("0,") for h in history) >= 4, history
    check_same_trace(tmp_path / "reference", tmp_path / "killed", history)
