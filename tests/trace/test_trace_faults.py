"""Leftovers of a process killed while replacing the manifest never block the rerun that resumes it."""

from __future__ import annotations

import torch

import moescope
from moescope.trace.writer import TraceWriter

MANIFEST = {"model": {"id": "x"}, "corpus": {}, "capture": {}, "layers": []}


def test_killed_while_writing_the_first_manifest_resumes(tiny_moe, tmp_path):
    out = tmp_path / "t"
    for table in ("routing", "tokens", "sequences"):
        (out / table).mkdir(parents=True)
    (out / ".manifest.json.tmp-4242").write_text('{"schema_ver')  # the kill came before the rename
    ids = torch.randint(3, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    trace = moescope.capture(tiny_moe, input_ids=ids, out=out, progress=False)
    assert trace.complete and trace.n_tokens == 32
    assert sorted(p.name for p in out.iterdir()) == [".moescope.lock", "manifest.json", "routing", "sequences", "tokens"]


def test_stale_manifest_temp_files_are_removed_on_resume(tmp_path):
    with TraceWriter(tmp_path / "t", MANIFEST):
        pass
    (tmp_path / "t" / ".manifest.json.tmp-77").write_text("{")
    with TraceWriter(tmp_path / "t", MANIFEST):
        assert not (tmp_path / "t" / ".manifest.json.tmp-77").exists()
