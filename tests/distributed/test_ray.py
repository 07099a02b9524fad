"""Capture and analysis on a real local Ray cluster (loopback), against the in-process paths.

The cluster is started once for the module (2 CPU slots, small object store) and shut down after.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

import moescope
from moescope.analysis import run_analyses
from moescope.pipeline.analyze import analysis_context
from moescope.trace.manifest import MANIFEST

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'moescope[ray]')")
pytestmark = pytest.mark.ray

CORPUS = dict(data="humaneval,wiki", max_tokens=3000, seq_len=128, shard_tokens=700, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    return moescope.capture("moescope:tiny-moe", out=tmp_path_factory.mktemp("ip") / "t", **CORPUS)


def _rows(folder: Path) -> dict:
    con = duckdb.connect()
    routing = con.sql(f"select seq_id, pos, layer, topk_ids, topk_weights from read_parquet('{folder}/routing/*.parquet') "
                      "order by layer, seq_id, pos").fetchnumpy()
    tokens = con.sql(f"select * from read_parquet('{folder}/tokens/*.parquet') order by seq_id, pos").fetchall()
    sequences = con.sql(f"select * from read_parquet('{folder}/sequences/*.parquet') order by seq_id").fetchall()
    return {"routing": routing, "tokens": tokens, "sequences": sequences}


def assert_same_trace(got: Path, want: Path) -> None:
    a, b = _rows(got), _rows(want)
    assert a["tokens"] == b["tokens"] and a["sequences"] == b["sequences"]
    for key in ("seq_id", "pos", "layer"):
        np.testing.assert_array_equal(a["routing"][key], b["routing"][key])  # same rows, none lost or duplicated
    np.testing.assert_array_equal(np.stack(a["routing"]["topk_ids"]), np.stack(b["routing"]["topk_ids"]))
    np.testing.assert_allclose(np.stack(a["routing"]["topk_weights"]), np.stack(b["routing"]["topk_weights"]), atol=1e-3)
    listed = {f["path"] for s in json.loads((got / MANIFEST).read_text())["shards"] for f in s["files"].values()}
    on_disk = {str(p.relative_to(got)) for p in got.rglob("*.parquet")}
    assert on_disk == listed  # no stray or temporary part files


def test_ray_capture_with_two_workers_equals_in_process_capture(cluster, in_process, tmp_path):
    trace = moescope.capture("moescope:tiny-moe", out=tmp_path / "t", ray="local", workers=2, **CORPUS)
    assert trace.complete and trace.manifest["stats"]["ray_workers"] == 2 and len(trace.manifest["shards"]) >= 4
    assert_same_trace(tmp_path / "t", in_process.folder)
    assert trace.manifest["layers"] == in_process.manifest["layers"]


def test_a_worker_killed_mid_shard_is_retried_and_nothing_is_duplicated(cluster, in_process, tmp_path):
    from moescope.distributed.capture import run_ray_capture
    from moescope.record.batches import sequences_from_documents
    from moescope.record.loading import load_tokenizer
    from moescope.record.runner import CaptureOptions
    from moescope.corpora import describe_corpus, iter_corpus

    marker = tmp_path / "killed-once"
    opts = CaptureOptions(seq_len=128, shard_tokens=700)
    seqs = sequences_from_documents(iter_corpus("humaneval,wiki"), load_tokenizer("moescope:tiny-moe"), seq_len=128, max_tokens=3000)
    run_ray_capture("moescope:tiny-moe", seqs, tmp_path / "t", opts=opts, model_info={"id": "moescope:tiny-moe"},
                    corpus_info={**describe_corpus("humaneval,wiki", split="all"), "split": "all"},
                    load_kwargs={"device": "cpu", "dtype": "float32"}, workers=2, progress=False, _die_once=(2, str(marker)))
    assert marker.exists()  # the worker did die mid-unit
    assert_same_trace(tmp_path / "t", in_process.folder)


def test_rerun_after_an_interruption_resumes_and_completes_the_same_trace(cluster, in_process, tmp_path):
    out = tmp_path / "t"
    moescope.capture("moescope:tiny-moe", out=out, ray="local", workers=2, **CORPUS)
    manifest = json.loads((out / MANIFEST).read_text())  # as if killed before the last two shards were committed
    manifest.update(complete=False, shards=manifest["shards"][:-2])
    (out / MANIFEST).write_text(json.dumps(manifest))
    trace = moescope.capture("moescope:tiny-moe", out=out, ray="local", workers=2, **CORPUS)
    assert trace.complete and trace.manifest["stats"]["tokens_this_run"] < 3000
    assert_same_trace(out, in_process.folder)


def test_ray_analysis_equals_in_process_analysis(cluster, in_process):
    from moescope.distributed.analyze import ray_pass

    ctx = analysis_context(in_process)
    local = run_analyses(in_process.shards, ctx)
    remote = run_analyses(in_process.shards, ctx, run_pass=ray_pass(in_process.folder, None))
    assert local.keys() == remote.keys() and len(in_process.manifest["shards"]) >= 3  # an odd tree: one state carried up
    for name in local:
        assert json.dumps(local[name].summary(), sort_keys=True, default=str) == \
            json.dumps(remote[name].summary(), sort_keys=True, default=str), name
        for table, frame in local[name].to_pandas().items():
            frame.equals(remote[name].to_pandas()[table]) or pytest.fail(f"{name}.{table} differs")
