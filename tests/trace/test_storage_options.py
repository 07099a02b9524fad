"""`storage_options=` in the Python API: a URL opened with the settings given in the call (the `--storage-option`
keys, as a dict), with no AWS variable pointing at the server and a wrong process default, against a real S3
server on loopback (moto): the same traces and results as a local folder."""

from __future__ import annotations

import pytest
import torch

import moescope
from moescope.errors import MoescopeError
from moescope.trace.storage import default_options, location, set_default_options


@pytest.fixture
def store(s3_server, monkeypatch):
    """(s3://BUCKET, the options that reach it): nothing in the environment names the server or its keys, and the
    process default (what --storage-option sets) points at a closed port."""
    from s3_server import CREDENTIALS

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up for credentials
    before = default_options()
    set_default_options({"endpoint_url": "http://127.0.0.1:9", "connect_timeout": "0.5"})
    yield f"s3://{s3_server.new_bucket()}", {"endpoint_url": s3_server.endpoint, "region": "us-east-1",
                                            "access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                            "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    set_default_options(before)


@pytest.fixture
def ids():
    return torch.randint(3, 256, (6, 16), generator=torch.Generator().manual_seed(7))


def _checksums(trace) -> list[str]:
    return [s["files"][table]["sha256"] for s in trace.manifest["shards"] for table in ("routing", "tokens", "sequences")]


def test_capture_open_analyze_and_save_with_storage_options(tiny_moe, ids, tmp_path, store):
    bucket, options = store
    opts = moescope.CaptureOptions(batch_size=2, shard_tokens=40)
    local = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False, options=opts)
    remote = moescope.capture(tiny_moe, input_ids=ids, out=f"{bucket}/t", progress=False, options=opts,
                              storage_options=options)
    assert remote.remote and _checksums(remote) == _checksums(local)
    opened = moescope.open_trace(f"{bucket}/t", storage_options=options)
    assert _checksums(opened) == _checksums(local)
    assert opened.sql("SELECT count(*) AS n FROM routing")["n"][0] == local.n_tokens * local.n_layers

    results = moescope.analyze(f"{bucket}/t", only=["load", "coactivation"], model=tiny_moe, storage_options=options)
    expected = moescope.analyze(local, only=["load", "coactivation"], model=tiny_moe)
    assert results.summary["analyses"] == expected.summary["analyses"]
    assert results.save(f"{bucket}/res", storage_options=options) == f"{bucket}/res"
    expected.save(tmp_path / "res")
    stored = location(f"{bucket}/res", options)
    assert sorted(stored.list()) == sorted(p.name for p in (tmp_path / "res").iterdir())
    for name in stored.list():
        if name.endswith(".csv"):
            assert stored.read_bytes(name) == (tmp_path / "res" / name).read_bytes(), name


def test_record_with_storage_options(tiny_moe, ids, tmp_path, store):
    bucket, options = store
    traces = []
    for out, extra in ((tmp_path / "rec", {}), (f"{bucket}/rec", {"storage_options": options})):
        with moescope.record(tiny_moe, out=out, **extra) as rec:
            for row in range(0, 6, 2):
                tiny_moe(input_ids=ids[row:row + 2])
        traces.append(rec.trace)
    assert traces[1].remote and _checksums(traces[1]) == _checksums(traces[0])


def test_bad_storage_options_are_one_line_errors(tiny_moe, tmp_path, store):
    bucket, options = store
    with pytest.raises(MoescopeError, match="unknown option"):
        moescope.open_trace(f"{bucket}/t", storage_options={"colour": "red"})
    with pytest.raises(MoescopeError, match="is a local path"):
        moescope.open_trace(tmp_path / "t", storage_options=options)
    with pytest.raises(MoescopeError, match="must be a dict"):
        moescope.capture(tiny_moe, ["text"], out=f"{bucket}/t", storage_options=["endpoint_url=x"])
    assert location(bucket, options).list() == {}
