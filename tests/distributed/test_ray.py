"""Capture and analysis on a real local Ray cluster (loopback), against the in-process paths.

The in-process capture of the same corpus is the independent reference: Ray traces must export the same
rows in the same order (expert ids and positions exactly, gate weights up to float rounding), list every
part file once, and give the same analysis tables.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

import moescope
from moescope.cli.main import main
from moescope.trace.manifest import MANIFEST

pytest.importorskip("ray", reason="Ray is not installed (pip install 'moescope[ray]')")
pytestmark = pytest.mark.ray

MODEL, DATA = "moescope:tiny-moe", "humaneval,wiki"
CORPUS = dict(max_tokens=3000, seq_len=128, shard_tokens=700, dtype="float32")
CLI_CORPUS = ["--data", DATA, "--max-tokens", "3000", "--seq-len", "128", "--shard-tokens", "700", "--dtype", "float32",
              "--no-progress"]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    return moescope.capture(MODEL, DATA, out=tmp_path_factory.mktemp("ip") / "t", progress=False, **CORPUS)


def _export(folder: Path) -> list[dict]:
    out = folder.parent / f"{folder.name}.jsonl"
    assert main(["export", str(folder), "--format", "jsonl", "--out", str(out), "--overwrite"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _table(folder: Path, name: str, order: str) -> list[tuple]:
    return duckdb.sql(f"select * from read_parquet('{folder}/{name}/*.parquet') order by {order}").fetchall()


def assert_same_trace(got: Path, want: Path) -> None:
    """The trace at `got` is the one at `want`: rows, their reading order, tables, and a clean manifest."""
    a, b = _export(got), _export(want)
    assert len(a) == len(b)
    key = lambda row: (row["problem_id"], row["token_id"], row["layer"], row["expert_ids"])  # noqa: E731
    assert [key(r) for r in a] == [key(r) for r in b]  # same rows in the same order: none lost or duplicated
    np.testing.assert_allclose([r["weights"] for r in a], [r["weights"] for r in b], rtol=0, atol=1e-3)
    for name, order in (("tokens", "seq_id, pos"), ("sequences", "seq_id")):
        assert _table(got, name, order) == _table(want, name, order), name
    shards = json.loads((got / MANIFEST).read_text())["shards"]
    ranges = [(s["seq_id_min"], s["seq_id_max"]) for s in shards]
    assert all(lo <= hi < nxt for (lo, hi), (nxt, _) in zip(ranges, ranges[1:] + [(10**9, 0)]))  # ordered, disjoint
    listed = {f["path"] for s in shards for f in s["files"].values()}
    assert {str(p.relative_to(got)) for p in got.rglob("*.parquet")} == listed  # no stray or temporary parts
    assert not [p for p in got.rglob(".*") if p.name != ".moescope.lock"]


@pytest.fixture(scope="module")
def on_ray(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "t"
    assert main(["capture", MODEL, "--out", str(out), "--ray", "--workers", "2", *CLI_CORPUS]) == 0
    return out


def test_cli_capture_with_two_ray_workers_equals_the_in_process_capture(on_ray, in_process):
    trace = moescope.open_trace(on_ray)
    assert trace.complete and trace.manifest["stats"]["ray_workers"] == 2 and len(trace.manifest["shards"]) >= 5
    assert_same_trace(on_ray, in_process.folder)
    for key in ("model", "layers", "corpus", "capture"):
        assert trace.manifest[key] == in_process.manifest[key], key


def test_a_worker_killed_mid_unit_is_retried_and_nothing_is_duplicated(ray_cluster, in_process, tmp_path):
    from moescope.corpora import describe_corpus, iter_corpus
    from moescope.distributed.capture import run_ray_capture
    from moescope.recording.batches import sequences_from_documents
    from moescope.recording.loading import load_tokenizer
    from moescope.recording.options import CaptureSettings

    forward, written = tmp_path / "killed-in-forward", tmp_path / "killed-after-writing"
    opts = CaptureSettings(seq_len=128, shard_tokens=700, max_tokens=3000)
    seqs = sequences_from_documents(iter_corpus(DATA), load_tokenizer(MODEL), seq_len=128, max_tokens=3000)
    run_ray_capture(MODEL, seqs, tmp_path / "t", opts=opts, model_info={"id": MODEL},
                    corpus_info={**describe_corpus(DATA, split="all"), "split": "all"},
                    load_kwargs={"device": "cpu", "dtype": "float32"}, workers=2, progress=False,
                    _die_once={1: (str(written), "written"), 3: (str(forward), "forward")})
    assert forward.exists() and written.exists()  # worker processes did die (os._exit) mid-unit, and with parts on disk
    assert_same_trace(tmp_path / "t", in_process.folder)


def _forget(out: Path, positions: list[int]) -> None:
    """Rewrite the manifest as if the run had been killed before the shards at `positions` were committed."""
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(complete=False, shards=[s for i, s in enumerate(manifest["shards"]) if i not in positions])
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_reruns_resume_on_ray_and_in_process_after_out_of_order_commits(on_ray, in_process, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(on_ray, out)
    _forget(out, [1, 4])  # workers finish out of order: a later unit can be committed before an earlier one
    trace = moescope.capture(MODEL, DATA, out=out, ray="local", workers=2, progress=False, **CORPUS)
    assert trace.complete and 0 < trace.manifest["stats"]["tokens_this_run"] < 3000
    assert_same_trace(out, in_process.folder)
    _forget(out, [1, 3])  # and an in-process rerun fills the gaps the same way (its batches and shards stop at them)
    trace = moescope.capture(MODEL, DATA, out=out, progress=False, **CORPUS)
    assert trace.complete and 0 < trace.manifest["stats"]["tokens_this_run"] < 3000
    assert_same_trace(out, in_process.folder)


def test_more_workers_than_the_cluster_has_slots_is_one_line(ray_cluster, tmp_path, capsys):
    assert main(["capture", MODEL, "--out", str(tmp_path / "t"), "--ray", "--workers", "3", *CLI_CORPUS]) == 2
    assert capsys.readouterr().err.strip() == "error: --workers 3, but the Ray cluster has 2 CPU slot(s): one worker each"
    assert not (tmp_path / "t").exists()


def _results(folder: Path) -> tuple[dict, dict]:
    summary = json.loads((folder / "summary.json").read_text())
    summary["trace"].pop("path")
    return summary, {p.name: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}


def test_cli_analyze_on_ray_writes_the_in_process_results(ray_cluster, in_process, tmp_path):
    assert main(["analyze", str(in_process.folder), "--out", str(tmp_path / "local")]) == 0
    assert main(["analyze", str(in_process.folder), "--out", str(tmp_path / "ray"), "--ray"]) == 0
    (summary, tables), (ray_summary, ray_tables) = _results(tmp_path / "local"), _results(tmp_path / "ray")
    assert len(in_process.manifest["shards"]) == 3  # an odd merge tree: one state is carried up a level
    assert summary == ray_summary and tables.keys() == ray_tables.keys() and len(tables) > 10
    for name, frame in tables.items():
        pd.testing.assert_frame_equal(frame, ray_tables[name], check_exact=True, obj=name)


def test_ray_pass_reduces_like_in_process_to_the_bit_over_many_shards_with_float_sums(ray_cluster, tmp_path):
    from moescope.analysis import ANALYSES, run_analyses
    from moescope.analysis.runner import folds_in_place
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.distributed.analyze import ray_pass
    from moescope.pipeline.analyze import analysis_context

    spec = SyntheticSpec(n_layers=3, n_experts=16, top_k=2, seq_len=(4, 30), sequences_per_document=2, vocab_size=64)
    write_synthetic_trace(tmp_path / "t", spec, 1400, 200, seed=8)  # 7 shards: an odd tree, float router sums
    trace = moescope.open_trace(tmp_path / "t")
    ctx = analysis_context(trace)
    local = run_analyses(trace.shards, ctx)
    remote = run_analyses(trace.shards, ctx, run_pass=ray_pass(trace.folder, None))
    assert len(trace.manifest["shards"]) == 7 and {n for n in ANALYSES if folds_in_place(ANALYSES[n], ctx)} and ctx.router_output_kind == "logits"
    for name in ANALYSES:
        frames, ray_frames = local[name].to_pandas(), remote[name].to_pandas()
        frames, ray_frames = (f if isinstance(f, dict) else {"": f} for f in (frames, ray_frames))
        for table, frame in frames.items():
            pd.testing.assert_frame_equal(frame, ray_frames[table], check_exact=True, obj=f"{name}/{table}")
        assert json.dumps(local[name].summary()) == json.dumps(remote[name].summary()), name
    assert np.isfinite(local["aux_losses"].load_balancing_loss).all()


def test_capture_and_analyze_on_ray_with_the_trace_on_s3_and_no_shared_folder(ray_cluster, in_process, on_ray, s3,
                                                                               s3_server, tmp_path):
    """Workers PUT their parts to the S3 server (moto, loopback) with the storage options the driver was given
    (the cluster's processes were started without any AWS variable), a worker killed after its PUTs is retried
    under the same names, the driver commits; `analyze --ray` workers read the shards from the store. The trace
    and the results are those of the same Ray capture into a local folder (shard for shard, checksum for
    checksum) and of the in-process capture (row for row)."""
    from moescope.corpora import describe_corpus, iter_corpus
    from moescope.distributed.capture import run_ray_capture
    from moescope.recording.batches import sequences_from_documents
    from moescope.recording.loading import load_tokenizer
    from moescope.recording.options import CaptureSettings
    from moescope.trace.storage import download, location

    options = {"endpoint_url": s3_server.endpoint, "access_key": "k", "secret_key": "s"}
    where = location(f"{s3}/t", options)
    written = tmp_path / "killed-after-writing"
    seqs = sequences_from_documents(iter_corpus(DATA), load_tokenizer(MODEL), seq_len=128, max_tokens=3000)
    run_ray_capture(MODEL, seqs, where, opts=CaptureSettings(seq_len=128, shard_tokens=700, max_tokens=3000),
                    model_info={"id": MODEL}, corpus_info={**describe_corpus(DATA, split="all"), "split": "all"},
                    load_kwargs={"device": "cpu", "dtype": "float32"}, workers=2, progress=False,
                    _die_once={2: (str(written), "written")})
    assert written.exists()  # a worker did die with its parts in the store
    trace = moescope.open_trace(where)
    assert trace.complete and trace.manifest["stats"]["ray_workers"] == 2
    shards = lambda t: [(s["seq_id_min"], s["seq_id_max"], {k: f["sha256"] for k, f in s["files"].items()})  # noqa: E731
                        for s in t.manifest["shards"]]
    assert shards(trace) == shards(moescope.open_trace(on_ray))
    key = lambda t: t.duckdb().execute("SELECT seq_id, pos, layer, topk_ids FROM routing ORDER BY ALL").fetchall()  # noqa: E731
    assert key(trace) == key(in_process)
    listed = {f["path"] for s in trace.manifest["shards"] for f in s["files"].values()}
    assert set(where.list()) == listed | {"manifest.json"}  # no stray part of the killed attempt, no lease left

    flags = [f"--storage-option={k}={v}" for k, v in options.items()]
    assert main(["analyze", str(on_ray), "--out", str(tmp_path / "local"), "--no-model"]) == 0  # the same shards
    assert main(["analyze", str(where), "--out", f"{s3}/res", "--ray", "--no-model", *flags]) == 0
    local_summary, local_tables = _results(tmp_path / "local")
    ray_summary, ray_tables = _results(download(location(f"{s3}/res", options)))
    assert local_summary == ray_summary and local_tables.keys() == ray_tables.keys()
    for name, frame in local_tables.items():
        pd.testing.assert_frame_equal(frame, ray_tables[name], check_exact=True, obj=name)
