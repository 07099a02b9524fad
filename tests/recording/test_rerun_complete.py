"""Rerunning a finished capture (a retry loop, a scheduler re-running a job) succeeds and writes nothing;
different options on a finished trace are still refused."""

from __future__ import annotations

import pytest
import torch

import moescope
from moescope.cli.main import main
from moescope.errors import TraceError


def _state(folder) -> dict[str, tuple[bytes, int]]:
    """Every path below `folder` (the folder itself included) -> (bytes, mtime in ns)."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {str(p.relative_to(folder)): (b"dir" if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_same_command_on_a_complete_trace_says_so_writes_nothing_and_exits_0(capsys, tiny_model_dir, tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n")
    out = tmp_path / "t"
    argv = ["capture", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--no-progress", "--seq-len", "16"]
    assert main(argv) == 0
    capsys.readouterr()
    before = _state(out)
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    assert "already complete" in printed and "nothing written" in printed and err == ""
    assert _state(out) == before  # byte-identical, mtimes unchanged, no file added or removed

    assert main([*argv, "--seq-len", "8"]) == 2  # other options: refused, nothing touched
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and "complete trace" in err and "capture" in err and "--overwrite" in err
    assert _state(out) == before


def test_api_returns_the_existing_trace(tiny_moe, tmp_path):
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    first = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False)
    before = _state(tmp_path / "t")
    again = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False)
    assert again.complete and again.manifest == first.manifest and again.n_tokens == 18
    assert _state(tmp_path / "t") == before
    with pytest.raises(TraceError, match="complete trace with different capture"):
        moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False,
                         options=moescope.CaptureOptions(weights_dtype="float32"))
