"""Bad command lines, for every subcommand that writes: unknown models, conflicting options, paths that exist as
files, folders that are not ours, read-only folders. Each ends in one line `error: ...`, exit status 2, and
nothing on disk changed — no file of the user's overwritten, no half-written output left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from moescope.cli.main import main
from moescope.pipeline.analyze import analyze_trace
from moescope.trace.exchange import import_jsonl


def _main(argv) -> int:
    """The console script's exit status (argparse's usage errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _snapshot(root) -> dict[str, str]:
    """Every path below `root` -> content hash ('dir' for folders)."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A trace, its analysis results, a file and a folder of the user's, a corpus and a model folder."""
    root = tmp_path_factory.mktemp("world")
    lines = [json.dumps({"problem_id": s, "layer": layer, "token_id": p, "expert_ids": [(s + p + layer) % 4, 4],
                         "weights": [0.6, 0.4]}) for s in range(4) for p in range(5) for layer in range(2)]
    (root / "routing.jsonl").write_text("\n".join(lines))
    import_jsonl(root / "routing.jsonl", root / "trace")
    analyze_trace(root / "trace", root / "results", use_model=False)
    (root / "mine.txt").write_text("keep me\n\nand me too\n")
    (root / "mydir").mkdir()
    (root / "mydir" / "notes.md").write_text("keep me")
    shutil.copytree(tiny_model_dir, root / "model")
    return root


def _read_only(path) -> None:
    """Make `path` a folder nobody can write into, root included (permission bits do not stop root)."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root and cannot set the immutable attribute (chattr +i) here: no read-only folder to test")


def _writable_again(path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


CASES = {
    # unknown models
    "capture unknown shipped model": (["capture", "moescope:no-such-model", "--data", "{w}/mine.txt", "--out", "{w}/new"], "no-such-model"),
    "quant unknown shipped model": (["quant", "moescope:no-such-model", "--data", "{w}/mine.txt", "--out", "{w}/new"], "no-such-model"),
    "capture missing model folder": (["capture", "{w}/no-model", "--data", "{w}/mine.txt", "--out", "{w}/new"], "does not exist"),
    "capture folder that is not a model": (["capture", "{w}/mydir", "--data", "{w}/mine.txt", "--out", "{w}/new"], "config.json"),
    # conflicting or invalid options
    "capture generate + next-layer": (["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--generate", "2",
                                       "--predict-next-layer"], "--predict-next-layer"),
    "capture router pattern without top-k": (["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new",
                                              "--router-pattern", "x.*"], "--top-k"),
    "capture zero seq-len": (["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--seq-len", "0"], "--seq-len"),
    "capture negative generate": (["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--generate", "-1"], "--generate"),
    "quant nf4 at 2 bits": (["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--scheme", "nf4", "--bits", "2"], "nf4"),
    "quant unknown target": (["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--targets", "gates"], "gates"),
    "quant unknown scheme": (["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--scheme", "int3"], "int3"),
    "quant bits not a number": (["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/new", "--bits", "four"], "four"),
    "analyze unknown analysis": (["analyze", "{w}/trace", "--out", "{w}/new", "--only", "vibes"], "vibes"),
    "analyze model and no-model": (["analyze", "{w}/trace", "--out", "{w}/new", "--model", "{w}/model", "--no-model"], "--no-model"),
    "demo unknown step": (["demo", "--out", "{w}/new", "--steps", "capture,bake"], "bake"),
    "export unknown format": (["export", "{w}/trace", "--out", "{w}/new.x", "--format", "xml"], "xml"),
    "missing required option": (["analyze", "{w}/trace"], "--out"),
    # inputs that are not what they should be
    "import missing file": (["import", "{w}/nothing.jsonl", "--out", "{w}/new"], "no such file"),
    "import a text file": (["import", "{w}/mine.txt", "--out", "{w}/new"], "not valid JSON"),
    "analyze a folder that is not a trace": (["analyze", "{w}/mydir", "--out", "{w}/new"], "not a moescope trace"),
    "compare with a missing trace": (["compare", "{w}/trace", "{w}/nothing", "--out", "{w}/new"], "no such trace"),
    "export a folder that is not a trace": (["export", "{w}/mydir", "--out", "{w}/new.jsonl", "--format", "jsonl"], "not a moescope trace"),
    "report a folder that is not results": (["report", "{w}/mydir", "--out", "{w}/new.html"], "mydir"),
    # outputs that exist as files, or as folders of the user's
    "capture out is a file": (["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/mine.txt"], "is a file"),
    "capture out is the user's folder": (["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/mydir"], "not empty"),
    "import out is a file": (["import", "{w}/routing.jsonl", "--out", "{w}/mine.txt"], "is a file"),
    "import out is the user's folder": (["import", "{w}/routing.jsonl", "--out", "{w}/mydir"], "not empty"),
    "export out exists": (["export", "{w}/trace", "--out", "{w}/mine.txt", "--format", "jsonl"], "exists"),
    "export out is a folder": (["export", "{w}/trace", "--out", "{w}/mydir", "--format", "csv"], "mydir"),
    "analyze out is a file": (["analyze", "{w}/trace", "--out", "{w}/mine.txt", "--no-model"], "is a file"),
    "analyze out is the user's folder": (["analyze", "{w}/trace", "--out", "{w}/mydir", "--no-model"], "not empty"),
    "compare out is a file": (["compare", "{w}/trace", "{w}/trace", "--out", "{w}/mine.txt"], "is a file"),
    "compare out is the user's folder": (["compare", "{w}/trace", "{w}/trace", "--out", "{w}/mydir"], "not empty"),
    "quant out is a file": (["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/mine.txt"], "is a file"),
    "quant out is the user's folder": (["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{w}/mydir"], "not empty"),
    "report out is a folder": (["report", "{w}/results", "--out", "{w}/mydir"], "mydir"),
    "report figures is a file": (["report", "{w}/results", "--out", "{w}/new.html", "--figures", "{w}/mine.txt"], "is a file"),
    "demo out is a file": (["demo", "--out", "{w}/mine.txt"], "is a file"),
    "demo out is the user's folder": (["demo", "--out", "{w}/mydir", "--steps", "analyze"], "not empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line(world, capsys, case):
    argv, message = CASES[case]
    argv = [a.format(w=world) for a in argv]
    before = _snapshot(world)
    code = _main(argv)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _snapshot(world) == before  # nothing written, nothing of the user's touched


READ_ONLY = {
    "capture": ["capture", "{w}/model", "--data", "{w}/mine.txt", "--out", "{ro}/t"],
    "import": ["import", "{w}/routing.jsonl", "--out", "{ro}/t"],
    "export": ["export", "{w}/trace", "--out", "{ro}/r.jsonl", "--format", "jsonl"],
    "analyze": ["analyze", "{w}/trace", "--out", "{ro}/r", "--no-model"],
    "compare": ["compare", "{w}/trace", "{w}/trace", "--out", "{ro}/c"],
    "quant": ["quant", "{w}/model", "--data", "{w}/mine.txt", "--out", "{ro}/q"],
    "report": ["report", "{w}/results", "--out", "{ro}/r.html"],
    "report figures": ["report", "{w}/results", "--out", "{w}/report.html", "--figures", "{ro}/figs"],
    "demo": ["demo", "--out", "{ro}/d", "--steps", "analyze"],
}


@pytest.mark.parametrize("case", list(READ_ONLY))
def test_read_only_output_folder(world, capsys, case, tmp_path):
    ro = tmp_path / "read-only"
    _read_only(ro)
    try:
        argv = [a.format(w=world, ro=ro) for a in READ_ONLY[case]]
        before = _snapshot(world)
        code = _main(argv)
        err = capsys.readouterr().err
        assert code == 2, (code, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert str(ro) in err and ("writable" in err or "ermission" in err or "not permitted" in err), err
        assert list(ro.iterdir()) == []
        assert _snapshot(world) == before
    finally:
        _writable_again(ro)
