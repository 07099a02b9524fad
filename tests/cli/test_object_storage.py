"""Every command that reads or writes a trace or a results folder, on an s3:// URL (a moto S3 server on
loopback) against the same command on a local folder: the same printed output (paths aside) and the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import moescope
from moescope.cli.main import main
from moescope.trace.storage import download, location


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def same_output(capsys, local: dict, remote: dict, *argv) -> str:
    """Run `argv` with {name} placeholders filled from `local`, then from `remote`; the outputs must agree once
    each run's paths are written as {name}."""
    outputs = []
    for places in (local, remote):
        code, out, err = run(capsys, *[a.format(**places) for a in argv])
        assert code == 0, (argv, out, err)
        for name, value in sorted(places.items(), key=lambda kv: -len(str(kv[1]))):
            out = out.replace(str(value), "{" + name + "}")
        outputs.append(out)
    assert outputs[0] == outputs[1], argv
    return outputs[0]


def same_results(local: Path, remote_url: str, places_local: dict, places_remote: dict) -> None:
    fetched = download(remote_url)
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert sorted(location(remote_url).list()) == names
    for name in names:
        a, b = (local / name).read_bytes(), (fetched / name).read_bytes()
        if name.endswith(".json"):  # summary.json records where the trace was
            a, b = (json.loads(x.decode().replace(str(p["trace"]), "TRACE")) for x, p in ((a, places_local), (b, places_remote)))
        elif name.endswith(".parquet"):  # the same table (pandas' Parquet metadata may differ in nothing else)
            a, b = pd.read_parquet(local / name), pd.read_parquet(fetched / name)
            pd.testing.assert_frame_equal(a, b)
            continue
        assert a == b, name


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"def f{i}(a, b):\n    return a * {i} + b\n\nThe fox {i} jumps over the dog." for i in range(6)))
    return path


def test_commands_on_s3_give_what_they_give_on_a_local_folder(capsys, tiny_model_dir, corpus, tmp_path, s3):
    local = {"trace": tmp_path / "t", "res": tmp_path / "res", "place": tmp_path / "place", "off": tmp_path / "off",
             "html": tmp_path / "local.html", "jsonl": tmp_path / "local.jsonl", "back": tmp_path / "back"}
    remote = {"trace": f"{s3}/t", "res": f"{s3}/res", "place": f"{s3}/place", "off": f"{s3}/off",
              "html": tmp_path / "remote.html", "jsonl": tmp_path / "remote.jsonl", "back": f"{s3}/back"}
    capture = ["capture", str(tiny_model_dir), "--data", str(corpus), "--out", "{trace}", "--no-progress",
               "--seq-len", "16", "--shard-tokens", "40", "--device", "cpu"]
    for places in (local, remote):
        code, out, err = run(capsys, *[a.format(**places) for a in capture])
        assert code == 0 and "MoE layers" in out, err
    a, b = moescope.open_trace(local["trace"]), moescope.open_trace(remote["trace"])
    assert len(a.manifest["shards"]) >= 3
    assert [s["files"]["routing"]["sha256"] for s in a.manifest["shards"]] == \
           [s["files"]["routing"]["sha256"] for s in b.manifest["shards"]]
    same_output(capsys, local, remote, *capture)  # complete: nothing written, said the same way

    same_output(capsys, local, remote, "sql", "{trace}", "SELECT layer, topk_ids[1] AS first, count(*) AS n FROM routing "
                "GROUP BY ALL ORDER BY ALL")
    same_output(capsys, local, remote, "sql", "{trace}", "SELECT * FROM routing ORDER BY seq_id, pos, layer", "--csv")
    assert same_output(capsys, local, remote, "verify", "{trace}").endswith("ok: every part matches the manifest\n")

    same_output(capsys, local, remote, "analyze", "{trace}", "--out", "{res}", "--no-model")
    same_results(local["res"], remote["res"], local, remote)
    same_output(capsys, local, remote, "placement", "{trace}", "--gpus", "2", "--out", "{place}")
    same_results(local["place"], remote["place"], local, remote)
    same_output(capsys, local, remote, "offload", "{trace}", "--capacity", "2,4", "--expert-bytes", "1e6",
                "--out", "{off}")
    same_results(local["off"], remote["off"], local, remote)
    same_output(capsys, local, remote, "report", "{res}", "{place}", "{off}", "--out", "{html}")
    html = [p.read_text().replace(str(tmp_path), "TMP").replace(s3, "TMP") for p in (local["html"], remote["html"])]
    assert html[0] == html[1]

    same_output(capsys, local, remote, "export", "{trace}", "--format", "jsonl", "--out", "{jsonl}")
    assert local["jsonl"].read_bytes() == remote["jsonl"].read_bytes()
    same_output(capsys, local, remote, "import", str(local["jsonl"]), "--out", "{back}")
    assert same_output(capsys, local, remote, "verify", "{back}").endswith("ok: every part matches the manifest\n")
    assert [s["files"]["routing"]["sha256"] for s in moescope.open_trace(local["back"]).manifest["shards"]] == \
           [s["files"]["routing"]["sha256"] for s in moescope.open_trace(remote["back"]).manifest["shards"]]

    # results prefixes are refused like results folders: one line, before anything is written
    location(f"{s3}/mine").write_bytes("notes.txt", b"keep")
    code, _, err = run(capsys, "analyze", remote["trace"], "--out", f"{s3}/mine", "--no-model")
    assert code == 2 and err.startswith("error: ") and "not empty" in err and err.count("\n") == 1
    assert location(f"{s3}/mine").list() == {"notes.txt": 4}
    code, _, err = run(capsys, "sql", "s3://no-such-bucket-x/t", "SELECT 1")
    assert code == 2 and "no such bucket" in err
    code, _, err = run(capsys, "verify", remote["trace"], "--storage-option", "colour=red")
    assert code == 2 and "unknown option" in err
