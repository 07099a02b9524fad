"""The command line: the documented commands work, and bad input ends in one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moescope.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n\nWhat is 12 plus 30? It is 42.\n")
    return path


def test_inspect_capture_sql_export_import(capsys, tiny_model_dir, corpus, tmp_path):
    code, out, _ = run(capsys, "inspect", str(tiny_model_dir), "--json")
    info = json.loads(out)
    assert code == 0 and len(info["layers"]) == 4 and info["layers"][0]["n_experts"] == 8 and info["layers"][0]["top_k"] == 2
    code, out, _ = run(capsys, "capture", str(tiny_model_dir), "--data", str(corpus), "--out", str(tmp_path / "t"),
                       "--no-progress", "--seq-len", "16", "--save-logits")
    assert code == 0 and "MoE layers" in out
    code, out, _ = run(capsys, "sql", str(tmp_path / "t"), "SELECT layer, count(*) AS n FROM routing GROUP BY layer ORDER BY layer", "--csv")
    rows = out.strip().splitlines()
    assert code == 0 and rows[0] == "layer,n" and len(rows) == 5
    assert len({r.split(",")[1] for r in rows[1:]}) == 1  # every layer covers the same tokens
    code, _, _ = run(capsys, "export", str(tmp_path / "t"), "--format", "jsonl", "--out", str(tmp_path / "r.jsonl"))
    assert code == 0
    code, _, _ = run(capsys, "import", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "back"))
    assert code == 0
    code, out, _ = run(capsys, "verify", str(tmp_path / "back"))
    assert code == 0 and "ok" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["capture", "{tmp}/no-such-model", "--data", "{corpus}", "--out", "{tmp}/t"], "does not exist"),
        (["capture", "{model}", "--data", "{tmp}/missing.txt", "--out", "{tmp}/t"], "missing.txt"),
        (["capture", "{model}", "--data", "{empty}", "--out", "{tmp}/t"], "empty"),
        (["capture", "{model}", "--data", "{corpus}", "--out", "{corpus}"], "is a file"),
        (["capture", "{model}", "--data", "{corpus}", "--out", "{tmp}/t", "--device", "cuda"], "no CUDA"),
        (["sql", "{tmp}", "SELECT 1"], "not a moescope trace"),
        (["verify", "{tmp}/nothing"], "no such trace"),
        (["import", "{corpus}", "--out", "{tmp}/i"], "not valid JSON"),
        (["inspect", "{model}", "--router-pattern", "x.*"], "--top-k"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, tiny_model_dir, corpus, tmp_path, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = [a.format(tmp=tmp_path, corpus=corpus, model=tiny_model_dir, empty=empty) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_unwritable_output_folder(capsys, tiny_model_dir, corpus, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, "capture", str(tiny_model_dir), "--data", str(corpus), "--out", str(locked / "t"))
    assert code == 2 and "writable" in err or "cannot create" in err


def test_console_script_has_no_traceback_without_debug(tmp_path):
    cmd = [sys.executable, "-m", "moescope.cli.main", "sql", str(tmp_path), "SELECT 1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
