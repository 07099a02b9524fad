"""The commands past capture and analysis on s3:// (a moto S3 server on loopback): compare, replay-check, saturation,
quant, importance, export --out and import from a URL — each against the same run on a local folder: the same
files, the same bytes (tables compared as tables; JSON with each run's own paths written as a placeholder)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

import moescope
from moescope.cli.main import main
from moescope.trace.storage import download, location

_spec = importlib.util.spec_from_file_location("moescope_tests_conftest_s3", Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_conftest)

TEXT = "\n\n".join(f"def f{i}(a, b):\n    return a * {i} + b\n\nThe fox {i} jumps over the dog." for i in range(4))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_both(capsys, *argv, local: Path, remote: str) -> str:
    """`moescope ARGV --out LOCAL`, then `--out REMOTE`: both succeed and print the same lines but for the out path;
    returns what the remote run printed."""
    code, out_local, err = run(capsys, *argv, "--out", local)
    assert code == 0, err
    code, out_remote, err = run(capsys, *argv, "--out", remote)
    assert code == 0, err
    assert out_local.replace(str(local), "OUT") == out_remote.replace(remote, "OUT")
    return out_remote


def _normalised_json(data: bytes, paths: list[str]) -> object:
    text = data.decode()
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, "PATH")
    return json.loads(text)


def same_files(local: Path, url: str, *, paths: tuple[list[str], list[str]] = ([], []), skip: tuple[str, ...] = ()) -> list[str]:
    """The files under `local` and under the prefix `url` are the same names with the same contents; returns the names.
    `paths`: (the local run's, the remote run's) paths, which JSON files may record; `skip`: folders not compared
    byte for byte (traces: their part names carry a writer token on a URL)."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
    remote = sorted(name for name in location(url).list() if not name.startswith("_lease/") and "/_lease/" not in name)
    kept = lambda listing: [n for n in listing if not n.startswith(skip)] if skip else listing
    assert kept(remote) == kept(names)
    fetched = download(url)
    for name in kept(names):
        a, b = (local / name).read_bytes(), (fetched / name).read_bytes()
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(local / name), pd.read_parquet(fetched / name))
        elif name.endswith((".json", ".jsonl")) and (paths[0] or paths[1]):
            if name.endswith(".jsonl"):
                assert [_normalised_json(x, paths[0]) for x in a.splitlines()] == \
                       [_normalised_json(x, paths[1]) for x in b.splitlines()], name
            else:
                assert _normalised_json(a, paths[0]) == _normalised_json(b, paths[1]), name
        else:
            assert a == b, name
    return names


def _capture(model_dir: Path, texts: list[str], out):
    return moescope.capture(str(model_dir), texts, out=out, progress=False,
                            options=moescope.CaptureOptions(seq_len=16, shard_tokens=40, device="cpu"))


@pytest.fixture
def traces(tiny_model_dir, tmp_path, s3):
    """Two traces of the tiny model (one text; another text and the same one), each on a local folder and on s3."""
    texts = {"a": [TEXT], "b": ["What is 12 plus 30? It is 42.", TEXT]}
    local = {name: _capture(tiny_model_dir, text, tmp_path / name).folder for name, text in texts.items()}
    remote = {name: str(_capture(tiny_model_dir, text, f"{s3}/{name}").folder) for name, text in texts.items()}
    return local, remote


def test_compare_reads_and_writes_urls_as_folders(capsys, traces, tmp_path, s3):
    local, remote = traces
    code, out_local, err = run(capsys, "compare", local["a"], local["b"], "--out", tmp_path / "cmp")
    assert code == 0, err
    code, out_remote, err = run(capsys, "compare", remote["a"], remote["b"], "--out", f"{s3}/cmp")
    assert code == 0, err
    assert out_local.replace(str(tmp_path / "cmp"), "OUT") == out_remote.replace(f"{s3}/cmp", "OUT")
    names = same_files(tmp_path / "cmp", f"{s3}/cmp", paths=([str(local["a"]), str(local["b"])], [remote["a"], remote["b"]]))
    assert "token_agreement.csv" in names and names[-1] == "token_agreement.parquet"
    # a local trace against one on the store: the same comparison again
    code, _, err = run(capsys, "compare", local["a"], remote["b"], "--out", f"{s3}/mixed")
    assert code == 0, err
    same_files(tmp_path / "cmp", f"{s3}/mixed", paths=([str(local["a"]), str(local["b"])], [str(local["a"]), remote["b"]]))
    # a prefix holding something else is refused in one line, before anything is written
    location(f"{s3}/mine").write_bytes("notes.txt", b"keep")
    code, _, err = run(capsys, "compare", remote["a"], remote["b"], "--out", f"{s3}/mine")
    assert code == 2 and err.startswith("error: ") and "not empty" in err and err.count("\n") == 1
    assert location(f"{s3}/mine").list() == {"notes.txt": 4}


def test_replay_check_of_a_trace_on_s3_into_s3(capsys, traces, tiny_model_dir, tmp_path, s3):
    local, remote = traces
    outputs = []
    for trace, out in ((local["a"], tmp_path / "rc"), (remote["a"], f"{s3}/rc")):
        code, printed, err = run(capsys, "replay-check", trace, "--model", tiny_model_dir, "--out", out, "--device", "cpu")
        assert code == 0, err
        outputs.append(printed.replace(str(out), "OUT").replace(str(trace), "TRACE"))
    assert outputs[0] == outputs[1]
    names = same_files(tmp_path / "rc", f"{s3}/rc", paths=([str(local["a"])], [remote["a"]]))
    assert names == ["flagged_rows.parquet", "replay_check.csv", "replay_check.json", "replay_check.parquet"]


@pytest.fixture
def checkpoint(tmp_path, tiny_model_dir):
    """Another tiny model of the same shape (another seed), saved as checkpoint-1."""
    folder = tmp_path / "checkpoint-1"
    _root_conftest.make_tiny_qwen3_moe(seed=1).save_pretrained(folder)
    _root_conftest.make_byte_tokenizer().save_pretrained(folder)
    return folder


def test_saturation_into_s3(capsys, checkpoint, tiny_model_dir, tmp_path, s3):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    args = [checkpoint, "--final", tiny_model_dir, "--data", data, "--max-tokens", "64", "--seq-len", "32", "--device", "cpu"]
    out_remote = run_both(capsys, "saturation", *args, local=tmp_path / "sat", remote=f"{s3}/sat")
    names = same_files(tmp_path / "sat", f"{s3}/sat", skip=("traces/",))
    assert "saturation__per_layer.parquet" in names
    for label in ("final", "checkpoint-1"):  # the traces are written to the store, and read as the local ones
        a, b = moescope.open_trace(tmp_path / "sat" / "traces" / label), moescope.open_trace(f"{s3}/sat/traces/{label}")
        assert a.table("routing").equals(b.table("routing"))
    # a rerun reuses the traces on the store and writes the same results
    before = location(f"{s3}/sat/traces/final").read_bytes("manifest.json")
    code, again, err = run(capsys, "saturation", *args, "--out", f"{s3}/sat")
    assert code == 0 and again == out_remote, err
    assert location(f"{s3}/sat/traces/final").read_bytes("manifest.json") == before
    same_files(tmp_path / "sat", f"{s3}/sat", skip=("traces/",))


def test_export_to_a_url_and_import_from_one(capsys, traces, tmp_path, s3):
    local, remote = traces
    for fmt, suffix in (("jsonl", "jsonl"), ("csv", "csv"), ("replay", "npz")):
        code, printed_local, err = run(capsys, "export", local["a"], "--format", fmt, "--out", tmp_path / f"a.{suffix}")
        assert code == 0, err
        code, printed_remote, err = run(capsys, "export", remote["a"], "--format", fmt, "--out", f"{s3}/exports/a.{suffix}")
        assert code == 0, err
        assert printed_local.replace(str(tmp_path / f"a.{suffix}"), "OUT") == printed_remote.replace(f"{s3}/exports/a.{suffix}", "OUT")
        assert location(f"{s3}/exports").read_bytes(f"a.{suffix}") == (tmp_path / f"a.{suffix}").read_bytes(), fmt
    # an existing object is refused without --overwrite, as a file is
    code, _, err = run(capsys, "export", remote["a"], "--format", "jsonl", "--out", f"{s3}/exports/a.jsonl")
    assert code == 2 and "exists" in err and err.count("\n") == 1
    assert run(capsys, "export", remote["a"], "--format", "jsonl", "--out", f"{s3}/exports/a.jsonl", "--overwrite")[0] == 0
    # import reads its input from the store: the same trace as from the local file
    code, _, err = run(capsys, "import", tmp_path / "a.jsonl", "--out", tmp_path / "back", "--n-experts", "8")
    assert code == 0, err
    code, _, err = run(capsys, "import", f"{s3}/exports/a.jsonl", "--out", tmp_path / "back-from-s3", "--n-experts", "8")
    assert code == 0, err
    a, b = moescope.open_trace(tmp_path / "back"), moescope.open_trace(tmp_path / "back-from-s3")
    assert [s["files"]["routing"]["sha256"] for s in a.manifest["shards"]] == \
           [s["files"]["routing"]["sha256"] for s in b.manifest["shards"]]
    code, _, err = run(capsys, "import", f"{s3}/exports/a.npz", "--format", "vllm", "--out", f"{s3}/replayed")
    assert code == 0, err
    code, _, err = run(capsys, "import", tmp_path / "a.npz", "--format", "vllm", "--out", tmp_path / "replayed")
    assert code == 0, err
    a, b = moescope.open_trace(f"{s3}/replayed"), moescope.open_trace(tmp_path / "replayed")  # no weights: NaN
    assert [s["files"]["routing"]["sha256"] for s in a.manifest["shards"]] == \
           [s["files"]["routing"]["sha256"] for s in b.manifest["shards"]]
    assert a.manifest["capture"]["imported_from"] == f"{s3}/exports/a.npz"
    code, _, err = run(capsys, "import", f"{s3}/exports/missing.jsonl", "--out", tmp_path / "nothing")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "nothing").exists()
    location(f"{s3}/exports").write_bytes("bad.jsonl", b"not json\n")
    code, _, err = run(capsys, "import", f"{s3}/exports/bad.jsonl", "--out", tmp_path / "nothing")
    assert code == 2 and err == f"error: {s3}/exports/bad.jsonl:1: not valid JSON (or a number too long to read)\n"


def _sweep_files_agree(local: Path, url: str) -> list[str]:
    """A sweep's files on the prefix are the local run's: the same names, tables and finished configurations."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert sorted(location(url).list()) == names  # no lease or staging leftovers
    fetched = download(url)
    for name in names:
        assert b"moescope-sweep-" not in (fetched / name).read_bytes(), f"{name} names the local staging folder"
        if name.endswith(".parquet") and not name.startswith("trace/"):
            a, b = pd.read_parquet(local / name), pd.read_parquet(fetched / name)
            timing = [c for c in a.columns if "second" in c or c.endswith("_s")]
            pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
        elif name == "results.jsonl":
            ids = lambda path: [json.loads(line)["config"]["config_id"] for line in path.read_text().splitlines()]
            assert ids(local / name) == ids(fetched / name)
    return names


def test_quant_sweep_into_s3_and_resumed_from_it(capsys, tmp_path, s3):
    args = ["quant", "moescope:tiny-moe", "--data", "wiki", "--bits", "4,8", "--targets", "router", "--max-tokens", "128",
            "--seq-len", "64", "--no-progress"]
    out_remote = run_both(capsys, *args, local=tmp_path / "q", remote=f"{s3}/q")
    names = _sweep_files_agree(tmp_path / "q", f"{s3}/q")
    assert {"sweep.json", "results.jsonl", "summary.json", "configs.parquet"} <= set(names)
    # a rerun finds every configuration finished on the prefix (resumed from its results.jsonl): nothing runs again
    log = location(f"{s3}/q").read_bytes("results.jsonl")
    code, again, err = run(capsys, *args, "--out", f"{s3}/q")
    assert code == 0 and again == out_remote, err
    assert location(f"{s3}/q").read_bytes("results.jsonl") == log
    # a report reads the prefix as it reads the folder, and writes its page and figures to the store
    code, _, err = run(capsys, "report", tmp_path / "q", "--out", tmp_path / "q.html", "--figures", tmp_path / "figs")
    assert code == 0, err
    code, printed, err = run(capsys, "report", f"{s3}/q", "--out", f"{s3}/pages/q.html", "--figures", f"{s3}/figs")
    assert code == 0 and printed == f"wrote {s3}/pages/q.html\n", err
    page = location(f"{s3}/pages").read_bytes("q.html").decode()
    assert page.replace(f"{s3}/q", "Q") == (tmp_path / "q.html").read_text().replace(str(tmp_path / "q"), "Q")
    figures = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert figures and sorted(location(f"{s3}/figs").list()) == figures
    assert all(location(f"{s3}/figs").read_bytes(name) == (tmp_path / "figs" / name).read_bytes()
               for name in figures if name.endswith(".svg"))


def test_importance_sweep_into_s3(capsys, tmp_path, s3):
    args = ["importance", "moescope:tiny-moe", "--data", "wiki", "--layers", "3", "--max-tokens", "80", "--seq-len", "40",
            "--no-prune", "--no-progress"]
    run_both(capsys, *args, local=tmp_path / "imp", remote=f"{s3}/imp")
    names = _sweep_files_agree(tmp_path / "imp", f"{s3}/imp")
    assert "experts.parquet" in names and "trace/manifest.json" in names
    a, b = moescope.open_trace(tmp_path / "imp" / "trace"), moescope.open_trace(f"{s3}/imp/trace")  # its trace reads back
    assert a.table("routing").equals(b.table("routing"))
    code, _, err = run(capsys, "importance", "moescope:tiny-moe", "--data", "wiki", "--layers", "9", "--out", f"{s3}/bad")
    assert code == 2 and "unknown MoE layer 9" in err and err.count("\n") == 1 and location(f"{s3}/bad").list() == {}


@pytest.mark.slow  # two demos (capture, analyze, report of three models): ~95 s on two cores
def test_demo_into_s3(capsys, tmp_path, s3):
    args = ["demo", "--max-tokens", "200", "--steps", "capture,analyze,report", "--no-progress"]
    code, out_local, err = run(capsys, *args, "--out", tmp_path / "demo")
    assert code == 0, err
    code, out_remote, err = run(capsys, *args, "--out", f"{s3}/demo")
    assert code == 0, err
    strip = lambda text, root: "\n".join(line for line in text.replace(root, "OUT").splitlines() if "done in" not in line)
    assert strip(out_local, str(tmp_path / "demo")) == strip(out_remote, f"{s3}/demo")
    for name in ("tiny-moe", "tiny-varmoe", "tiny-dsv3"):
        same_files(tmp_path / "demo" / "results" / name, f"{s3}/demo/results/{name}",
                   paths=([str(tmp_path / "demo")], [f"{s3}/demo"]))
        a, b = moescope.open_trace(tmp_path / "demo" / "traces" / name), moescope.open_trace(f"{s3}/demo/traces/{name}")
        assert [s["files"]["routing"]["sha256"] for s in a.manifest["shards"]] == \
               [s["files"]["routing"]["sha256"] for s in b.manifest["shards"]]
    html = [text.replace(str(tmp_path / "demo"), "OUT").replace(f"{s3}/demo", "OUT")
            for text in ((tmp_path / "demo" / "report.html").read_text(), location(f"{s3}/demo").read_bytes("report.html").decode())]
    assert html[0] == html[1]
    # a rerun reuses the traces on the store
    code, again, err = run(capsys, "demo", "--max-tokens", "200", "--steps", "capture", "--no-progress", "--out", f"{s3}/demo")
    assert code == 0 and again.count("reusing") == 3, err


def test_a_sweep_resumes_from_the_log_on_its_prefix(capsys, tmp_path, s3):
    """A prefix holding a sweep's first configurations (what a killed sweep leaves there): the rerun runs only the
    others, and ends with the uninterrupted sweep's configurations."""
    args = ["quant", "moescope:tiny-moe", "--data", "wiki", "--bits", "2,4,8", "--targets", "router", "--max-tokens", "128",
            "--seq-len", "64", "--no-progress"]
    code, _, err = run(capsys, *args, "--out", tmp_path / "ref")
    assert code == 0, err
    lines = (tmp_path / "ref" / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    prefix = location(f"{s3}/q")
    prefix.upload("sweep.json", tmp_path / "ref" / "sweep.json")
    prefix.write_bytes("results.jsonl", lines[0])
    code, _, err = run(capsys, *args, "--out", f"{s3}/q")
    assert code == 0, err
    log = prefix.read_bytes("results.jsonl").splitlines(keepends=True)
    assert log[0] == lines[0]  # kept, not run again
    ids = lambda rows: [json.loads(row)["config"]["config_id"] for row in rows]
    assert ids(log) == ids(lines)
    configs = [pd.read_parquet(path).drop(columns=["seconds"]) for path in (tmp_path / "ref" / "configs.parquet", download(f"{s3}/q") / "configs.parquet")]
    pd.testing.assert_frame_equal(*configs)


def test_a_sweep_prefix_copies_its_log_while_it_runs_and_has_one_writer(monkeypatch, s3):
    import time

    from moescope.errors import TraceError
    from moescope.pipeline import output

    monkeypatch.setattr(output, "SYNC_S", 0.05)
    markers = ("sweep.json", "results.jsonl", "summary.json")
    with output.sweep_folder(f"{s3}/sweep", markers=markers, what="quantization sweep") as folder:
        (folder / "results.jsonl").write_bytes(b'{"config": {"config_id": "a"}}\n')
        deadline = time.monotonic() + 10
        while location(f"{s3}/sweep").size("results.jsonl") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert location(f"{s3}/sweep").read_bytes("results.jsonl") == b'{"config": {"config_id": "a"}}\n'
        with pytest.raises(TraceError, match="being written by another moescope process"):
            with output.sweep_folder(f"{s3}/sweep", markers=markers, what="quantization sweep"):
                pass
        (folder / "summary.json").write_bytes(b"{}")
        (folder / ".moescope-sweep.lock").write_bytes(b"")
    assert sorted(location(f"{s3}/sweep").list()) == ["results.jsonl", "summary.json"]  # no lock file, no lease


def test_the_sweep_functions_refuse_a_url_instead_of_making_a_local_folder_of_it(tmp_path, monkeypatch):
    from moescope.quant.formats import QuantConfigError
    from moescope.quant.store import ResultStore

    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantConfigError, match="moescope quant --out s3://bucket/q` runs it in a local copy"):
        ResultStore("s3://bucket/q", {"fingerprint": "x"})
    assert list(tmp_path.iterdir()) == []


def test_quant_sweep_of_a_loaded_model_into_s3(tiny_model_dir, tmp_path, s3):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4)
    options = dict(bits="4,8", targets="router", max_tokens=96, seq_len=32, device="cpu")
    local = moescope.quant_sweep(model, str(data), tokenizer=tokenizer, out=tmp_path / "q", **options)
    remote = moescope.quant_sweep(model, str(data), tokenizer=tokenizer, out=f"{s3}/q", **options)
    pd.testing.assert_frame_equal(local.configs.drop(columns=["seconds"]), remote.configs.drop(columns=["seconds"]))
    assert sorted(remote._files) == sorted(local._files)
    _sweep_files_agree(tmp_path / "q", f"{s3}/q")
    assert remote.save(f"{s3}/saved") == f"{s3}/saved"  # what the sweep wrote, without its log's lock
    assert {name: location(f"{s3}/saved").read_bytes(name) for name in location(f"{s3}/saved").list()} == remote._files


@pytest.mark.slow  # a sweep long enough to outlast one log copy (5 s; ~10 s in a warm child), run three times
def test_a_sweep_killed_on_a_prefix_resumes_there(warm_cli, tmp_path, s3_server):
    """SIGKILL a quant sweep writing to a prefix once its log is on the store: the rerun keeps those
    configurations, runs the rest, and ends with the uninterrupted sweep's configurations in the same order."""
    import time

    from s3_server import CREDENTIALS

    options = {"endpoint_url": s3_server.endpoint, "access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region": "us-east-1"}
    url = f"s3://{s3_server.new_bucket()}/q"
    args = ["quant", "moescope:tiny-moe", "--data", "wiki", "--bits", "2,3,4,5,6,7,8", "--targets", "router,experts,attention",
            "--max-tokens", "1024", "--seq-len", "64", "--batch-size", "4", "--device", "cpu", "--no-progress",
            *[f"--storage-option={k}={v}" for k, v in options.items()]]
    status, log = warm_cli.run([str(a) for a in args] + ["--out", str(tmp_path / "ref")])
    assert status == 0, log
    reference = (tmp_path / "ref" / "results.jsonl").read_bytes().splitlines(keepends=True)
    prefix = location(url, options)
    run_ = warm_cli.start([str(a) for a in args] + ["--out", url])
    deadline = time.monotonic() + 120
    while not run_.finished(0.05) and time.monotonic() < deadline:
        if prefix.size("results.jsonl"):
            run_.kill()
            break
    assert run_.wait() == -9, "the sweep ended before its log reached the store; give it more configurations"
    kept = prefix.read_bytes("results.jsonl").splitlines(keepends=True)
    print(f"killed with {len(kept)} of {len(reference)} configurations on the store")  # pytest -s shows it
    assert 0 < len(kept) < len(reference) and prefix.size("summary.json") is None
    status, log = warm_cli.run([str(a) for a in args] + ["--out", url])
    assert status == 0, log
    final = prefix.read_bytes("results.jsonl").splitlines(keepends=True)
    assert final[:len(kept)] == kept  # not run again
    ids = lambda rows: [json.loads(row)["config"]["config_id"] for row in rows]
    assert ids(final) == ids(reference)
    configs = [pd.read_parquet(path).drop(columns=["seconds"])
               for path in (tmp_path / "ref" / "configs.parquet", download(prefix) / "configs.parquet")]
    pd.testing.assert_frame_equal(*configs)
    assert not [name for name in prefix.list() if name.startswith("_lease/")]
