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


def test_killed_while_overwriting_never_leaves_a_manifest_listing_deleted_parts(tiny_moe, tmp_path, monkeypatch):
    """--overwrite deletes the old parts; a kill in the middle must not leave the old manifest pointing at them."""
    from pathlib import Path

    import pytest

    from moescope.errors import TraceError
    from moescope.trace.reader import open_trace

    out = tmp_path / "t"
    ids = torch.randint(3, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    moescope.capture(tiny_moe, input_ids=ids, out=out, progress=False)
    real_unlink, deleted = Path.unlink, []

    def killed_after_one_part(self, *args, **kwargs):
        if self.suffix == ".parquet" and deleted:
            raise KeyboardInterrupt  # the kill, after the first part is gone
        real_unlink(self, *args, **kwargs)
        if self.suffix == ".parquet":
            deleted.append(self)

    monkeypatch.setattr(Path, "unlink", killed_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        moescope.capture(tiny_moe, input_ids=ids, out=out, progress=False, overwrite=True)
    monkeypatch.undo()
    assert deleted
    try:
        trace = open_trace(out)
    except TraceError:
        return  # no trace there: the rerun starts afresh
    listed = [out / f["path"] for s in trace.manifest["shards"] for f in s["files"].values()]
    assert all(p.is_file() for p in listed), "the manifest lists parts the overwrite deleted"
