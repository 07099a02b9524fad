"""TraceWriter: commits shards atomically and lets an interrupted capture resume.

Protocol for one shard: write each table's part to a hidden temporary file and rename it to its final name,
fsync the parts and their folders (together: one round), then rewrite the manifest (atomically, durably)
with the parts' rows and checksums: the commit point. Part files that the manifest does not list are
leftovers of an interrupted run and are deleted when a writer opens the folder, so a part is never read
before it is durable. A lock file (flock, released by the OS even on SIGKILL) keeps two captures out of one
folder.

Which fsyncs are needed: a listed part must be on disk before the manifest that lists it is (parts and
folders, fsynced before the manifest is renamed), and a commit must survive a crash once made (the
manifest's folder, fsynced after the rename). Not needed: a manifest before the first commit (a folder with
no manifest holds nothing committed; a crash there leaves only unlisted parts, deleted by the rerun, which
starts afresh), and a separate commit of the last shard when `finish` follows at once
(`write_shard(..., commit=False)`: its parts are fsynced together with the finishing manifest's data, which
then commits it, in one durable write instead of two). `--overwrite` removes the old manifest, durably,
before it deletes any part, so no manifest ever lists a deleted part.
Opening a complete trace with the same settings writes nothing (`already_complete`): rerunning a finished job
succeeds without redoing it.

On an object store (s3://bucket/prefix; trace/storage.py) there is no rename, fsync or flock, so the same
commit point is reached another way: each part is one PUT under a name no other writer uses
(`part-<index>-<writer token>.parquet`), the manifest is one PUT (an object store shows the old or the new
object, never a part), a lease (trace/lease.py) keeps a second writer out and is checked before every commit,
and unlisted parts are deleted when a writer opens the prefix, as on a local folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from concurrent.futures import wait as futures_wait
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.lease import LEASE_DIR, Lease
from moescope.trace.manifest import MANIFEST, fsync_all, io_pool, manifest_text, read_manifest, write_manifest
from moescope.trace.schema import SCHEMA_VERSION, TABLES
from moescope.trace.storage import Location, is_url, location

LOCK = ".moescope.lock"
# settings that must match for a capture to resume an incomplete trace (or to find a complete one already done)
RESUME_KEYS = ("model", "corpus", "capture")


# zstd's default level. Against level 9 at top-8 (65,536 rows): 35 -> 19 ms of encoding for 1-3 % more bytes (a
# trained top-2 model's routing 2.83 -> 2.92 B/row, a trained DeepSeek-V3-style one 6.11 -> 6.28); most of what is
# left is Parquet's list encoding, not zstd (13 ms uncompressed): one core encodes ~3.4 M rows/s at top-8.
ZSTD_LEVEL = 3


def _parquet_options(table: str) -> dict:
    """zstd with encodings picked per column (measured in bench/capture.py: ~0.5 B/row less than defaults)."""
    options = dict(compression="zstd", compression_level=ZSTD_LEVEL, write_statistics=False)
    if table == "routing":
        # expert ids: few distinct values -> dictionary; gate weights: floats compress far better split
        # into byte planes (the exponent plane is nearly constant)
        options.update(use_dictionary=["topk_ids.list.element"],
                       column_encoding={"topk_weights.list.element": "BYTE_STREAM_SPLIT",
                                        "router_output.list.element": "BYTE_STREAM_SPLIT"})
    elif table == "tokens":
        options.update(use_dictionary=False)  # token ids are too many distinct values for a dictionary to pay
    return options


def _is_manifest_tmp(name: str) -> bool:
    """The temporary name `atomic_write_bytes` writes a manifest under before renaming it."""
    return name.startswith(f".{MANIFEST}.tmp-")


def _encode(name: str, table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **_parquet_options(name))
    return sink.getvalue()


def _entry(rel: str, table: pa.Table, data: pa.Buffer) -> dict:
    return {"path": rel, "rows": table.num_rows, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}


def _write_part(folder: Path, name: str, table: pa.Table, index: int) -> tuple[Path, dict]:
    """Encode one table's part in memory, write it under a temporary name and rename it (not yet fsynced):
    (its path, its manifest entry). The checksum is taken from the bytes written, not read back."""
    rel = f"{name}/part-{index:05d}.parquet"
    final = Path(folder) / rel
    tmp = final.with_name(f".{final.name}.tmp")
    data = _encode(name, table)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, final)
    return final, _entry(rel, table, data)


def _put_part(where: Location, name: str, table: pa.Table, index: int, tag: str) -> dict:
    """Encode one table's part and PUT it under a name only this writer uses: its manifest entry."""
    rel = f"{name}/part-{index:05d}-{tag}.parquet"
    data = _encode(name, table)
    where.write_bytes(rel, data)
    return _entry(rel, table, data)


def write_parts(folder, tables: dict[str, pa.Table], index: int, *, tag: str | None = None) -> dict:
    """Write shard `index`'s part files (the tables encoded concurrently, each to a temporary name and renamed;
    then the parts and their folders fsynced together) and return their manifest entries: on disk, durably,
    when this returns. On an object store (`folder` a URL or Location) each part is one PUT named with the
    committing writer's `tag` (TraceWriter.part_tag).

    Safe to repeat: a retried shard overwrites its own files. Not yet part of the trace until
    `TraceWriter.commit_shard` lists them (an unlisted part is deleted when a writer next opens the folder).
    """
    if is_url(folder):
        where = location(folder)
        pending = {name: io_pool().submit(_put_part, where, name, tables[name], index, tag) for name in TABLES}
        futures_wait(pending.values())
        return {name: done.result() for name, done in pending.items()}
    files, unsynced = write_parts_unsynced(folder, tables, index)
    fsync_all(unsynced)
    return files


def write_parts_unsynced(folder: Path, tables: dict[str, pa.Table], index: int) -> tuple[dict, list[Path]]:
    """`write_parts` without its fsync round: (manifest entries, the paths to fsync before they are listed)."""
    pending = {name: io_pool().submit(_write_part, folder, name, tables[name], index) for name in TABLES}
    futures_wait(pending.values())  # all ended, so a failed part's error is raised with no write still running
    written = {name: done.result() for name, done in pending.items()}  # table order, whatever order they finished in
    unsynced = [*(path for path, _ in written.values()), *(Path(folder) / name for name in TABLES)]
    return {name: entry for name, (_, entry) in written.items()}, unsynced


class TraceWriter:
    """Writes a trace folder; use as a context manager so the lock is always released."""

    def __init__(self, folder, manifest: dict, *, overwrite: bool = False):
        self.remote = is_url(folder)
        self.folder = location(folder) if self.remote else Path(folder)  # a Location for an object-store prefix
        self._lease: Lease | None = None
        self._lock_fd: int | None = None
        self._unwritten = False  # a shard is listed in self.manifest but not yet on disk
        self._unsynced: list[Path] = []  # its parts and folders, fsynced with the manifest that lists them
        self._prepare_folder()
        self._lock()
        self.already_complete = False  # True: the folder holds this very trace, finished; nothing is written
        try:
            self.manifest = self._start_or_resume(manifest, overwrite)
        except BaseException:  # a refused resume must not leave the folder locked in this process
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------------
    @property
    def part_tag(self) -> str | None:
        """What this writer's part names carry on an object store (None on a local folder)."""
        return self._lease.token if self._lease else None

    def _prepare_folder(self) -> None:
        if self.remote:
            return self._prepare_prefix()
        if self.folder.exists() and not self.folder.is_dir():
            raise TraceError(f"--out {self.folder} is a file; give a folder path")
        ours = {MANIFEST, LOCK, *TABLES}
        if self.folder.is_dir() and not (self.folder / MANIFEST).exists():
            # a run killed while writing its first manifest leaves only ours and a manifest temp file
            if any(p.name not in ours and not _is_manifest_tmp(p.name) for p in self.folder.iterdir()):
                raise TraceError(f"{self.folder} is not empty and is not a moescope trace; choose another --out")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for table in TABLES:
                (self.folder / table).mkdir(exist_ok=True)
        except OSError as err:
            raise TraceError(f"cannot create trace folder {self.folder}: {err.strerror}; choose a writable --out") from None
        if not os.access(self.folder, os.W_OK):
            raise TraceError(f"trace folder {self.folder} is not writable; choose a writable --out")

    def _prepare_prefix(self) -> None:
        if not self.folder.bucket_exists():
            raise TraceError(f"--out {self.folder}: no such bucket (or no access to it); create it or check the storage options")
        names = self.folder.list()
        if MANIFEST not in names and any(rel.split("/")[0] not in (LEASE_DIR, *TABLES) for rel in names):
            raise TraceError(f"{self.folder} is not empty and is not a moescope trace; choose another --out")

    def _lock(self) -> None:
        if self.remote:
            self._lease = Lease(self.folder)
            self._lease.acquire()
            return
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TraceError(f"{self.folder} is being written by another moescope process; wait or use another --out") from None
            raise
        self._lock_fd = fd

    def _has_manifest(self) -> bool:
        return self.folder.size(MANIFEST) is not None if self.remote else (self.folder / MANIFEST).exists()

    def _start_or_resume(self, manifest: dict, overwrite: bool) -> dict:
        if not self.remote:
            for path in self.folder.iterdir():  # manifests half-written by a killed run (we hold the lock now)
                if _is_manifest_tmp(path.name):
                    path.unlink()
        if self._has_manifest():
            old = read_manifest(self.folder)
            differs = [key for key in RESUME_KEYS if old.get(key) != manifest.get(key)]
            if overwrite and self.remote:
                self.folder.delete(MANIFEST)  # before any part goes: never a manifest listing a deleted part
            elif overwrite:
                (self.folder / MANIFEST).unlink()  # before any part goes: never a manifest listing a deleted part
                fsync_all([self.folder])
            elif old.get("complete") and not differs:
                self.already_complete = True
                return old
            elif old["schema_version"] != SCHEMA_VERSION and not old.get("complete"):  # shards of two layouts
                raise TraceError(f"{self.folder} holds an unfinished capture of trace schema {old['schema_version']} "
                                 f"(this moescope writes {SCHEMA_VERSION}); pass --overwrite to start it afresh")
            elif old.get("complete"):
                raise TraceError(f"{self.folder} already holds a complete trace with different {'/'.join(differs)} "
                                 "settings; rerun with its options, pass --overwrite, or choose another --out")
            elif differs:
                raise TraceError(
                    f"{self.folder} holds an unfinished capture with different {'/'.join(differs)} settings; "
                    "rerun with the same options to resume, or pass --overwrite"
                )
            else:
                manifest = {**manifest, "shards": old["shards"]}
        manifest = {**manifest, "schema_version": SCHEMA_VERSION, "complete": False}
        manifest.setdefault("shards", [])
        self._delete_parts(keep={f["path"] for s in manifest["shards"] for f in s["files"].values()})
        return manifest  # written at the first commit (see the module docstring)

    def _delete_parts(self, keep: set[str]) -> None:
        if self.remote:
            for table in TABLES:
                for rel in self.folder.list(table):
                    if rel not in keep:
                        self.folder.delete(rel, missing_ok=True)
            return
        for table in TABLES:
            for path in (self.folder / table).iterdir():
                if f"{table}/{path.name}" not in keep:
                    path.unlink()

    # -- writing -------------------------------------------------------------------------------
    @property
    def committed_seq_ids(self) -> set[int]:
        return {i for shard in self.manifest["shards"] for i in range(shard["seq_id_min"], shard["seq_id_max"] + 1)}

    def next_index(self) -> int:
        """A shard index no committed shard uses (part files are named by it)."""
        return 1 + max((shard["index"] for shard in self.manifest["shards"]), default=-1)

    def write_shard(self, tables: dict[str, pa.Table], *, seq_id_min: int, seq_id_max: int, commit: bool = True) -> None:
        """Commit one shard made of one table per name in TABLES; all-or-nothing.

        `commit=False`: the parts are written and listed, but the manifest is written by the next `finish`
        (or `update`, or `close`): for the last shard of a capture, which `finish` follows at once."""
        index = self.next_index()
        if self.remote:  # no fsync to defer: the parts are PUT now, committed by the next manifest PUT
            files = write_parts(self.folder, tables, index, tag=self.part_tag)
            self.commit_shard(index, files, seq_id_min=seq_id_min, seq_id_max=seq_id_max, write=commit)
            return
        files, unsynced = write_parts_unsynced(self.folder, tables, index)
        if commit:
            fsync_all(unsynced)
        else:
            self._unsynced = unsynced
        self.commit_shard(index, files, seq_id_min=seq_id_min, seq_id_max=seq_id_max, write=commit)

    def commit_shard(self, index: int, files: dict, *, seq_id_min: int, seq_id_max: int, write: bool = True) -> None:
        """List parts already written by `write_parts` (here or by a worker) in the manifest: the commit point.

        Shards are kept in sequence order, whatever order they were finished in, so readers see the trace
        an in-process capture would have written."""
        shard = {"index": index, "seq_id_min": seq_id_min, "seq_id_max": seq_id_max, "files": files}
        shards = sorted([*self.manifest["shards"], shard], key=lambda s: s["seq_id_min"])
        self.manifest = {**self.manifest, "shards": shards}
        if write:
            self.update()  # with any shard held for `finish` and not yet fsynced
        else:
            self._unwritten = True

    def finish(self, **fields) -> dict:
        """Mark the trace complete; `fields` (e.g. detected router output kind) are added to the manifest."""
        self.update(**fields, complete=True)
        return self.manifest

    def update(self, **fields) -> None:
        self.manifest = {**self.manifest, **fields}
        if self.remote:
            self._lease.check()  # a writer that lost its lease must not commit over the new holder
            self.folder.write_bytes(MANIFEST, manifest_text(self.manifest).encode())
        else:
            write_manifest(self.folder, self.manifest, sync_first=self._unsynced)
        self._unwritten, self._unsynced = False, []

    def close(self) -> None:
        try:
            if self._unwritten and (self._lock_fd is not None or self._lease is not None):  # listed for `finish`, which never came
                self.update()
        finally:
            if self._lease is not None:
                self._lease.release()
                self._lease = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
