"""manifest.json: what a trace holds and which shards are committed.

A shard exists only once the manifest lists it (with row counts and SHA-256 checksums); the manifest
is replaced atomically (local: write to a temporary file, fsync, rename; object store: one PUT), so a reader
never sees a shard that is listed but incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from moescope.errors import TraceError
from moescope.trace.schema import READABLE_VERSIONS, TABLES
from moescope.trace.storage import is_url, location

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, *, sync_first: list[Path] = ()) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one, even after a crash
    (the data is fsynced before the rename, the folder after it, so the rename itself survives a crash).
    `sync_first`: files and folders that must be durable before the rename, fsynced in the same round as the data."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    fsync_all([tmp, *sync_first])
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fsync_path(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_IO_POOLS: dict[int, ThreadPoolExecutor] = {}  # per process: a forked child must not inherit the parent's threads


def io_pool() -> ThreadPoolExecutor:
    """This process's threads for file work that releases the GIL (fsyncs, Parquet encoding)."""
    pool = _IO_POOLS.get(os.getpid())
    if pool is None:
        pool = _IO_POOLS[os.getpid()] = ThreadPoolExecutor(max_workers=8, thread_name_prefix="moescope-io")
    return pool


def fsync_all(paths: list[Path]) -> None:
    """fsync files and folders concurrently: the filesystem commits them together (ext4 here: 3 parts and their
    3 folders in about one fsync's time instead of six), and each is durable on return."""
    if len(paths) == 1:  # no thread to hand it to
        fsync_path(paths[0])
        return
    for done in [io_pool().submit(fsync_path, p) for p in paths]:
        done.result()


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON, one top-level key per line and one layer or shard per line: readable, and written by
    the C encoder (`indent=` makes json use its pure-Python encoder, 3-4 ms per write of a small manifest)."""
    lines = []
    for key, value in manifest.items():
        if isinstance(value, list) and value:
            items = ",\n  ".join(json.dumps(item) for item in value)
            lines.append(f"{json.dumps(key)}: [\n  {items}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def write_manifest(folder: Path, manifest: dict, *, sync_first: list[Path] = ()) -> None:
    """Replace the manifest atomically and durably; `sync_first`: what it lists that is not yet fsynced."""
    atomic_write_bytes(folder / MANIFEST, manifest_text(manifest).encode(), sync_first=sync_first)


def read_manifest(folder) -> dict:
    """The manifest of a trace folder or object-store prefix (a path, URL or storage.Location), checked."""
    if is_url(folder):
        where = location(folder)
        path = where / MANIFEST
        try:
            manifest = where.read_json(MANIFEST)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TraceError(f"{path}: manifest is corrupt ({err.__class__.__name__}); recapture the trace") from None
        except FileNotFoundError:
            if not where.bucket_exists():
                raise TraceError(f"{where}: no such bucket; check the URL and the storage options") from None
            if not where.list():
                raise TraceError(f"{where}: no such trace; capture one with `moescope capture`") from None
            raise TraceError(f"{where}: not a moescope trace (no {MANIFEST}); capture one with `moescope capture`") from None
    else:
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.exists():
            raise TraceError(f"{folder}: no such trace folder; capture one with `moescope capture`")
        if not path.is_file():
            raise TraceError(f"{folder}: not a moescope trace (no {MANIFEST}); capture one with `moescope capture`")
        try:
            manifest = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TraceError(f"{path}: manifest is corrupt ({err.__class__.__name__}); recapture the trace") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise TraceError(f"{path}: not a moescope manifest (no schema_version)")
    if manifest["schema_version"] not in READABLE_VERSIONS or isinstance(manifest["schema_version"], bool):
        raise TraceError(
            f"{path}: trace schema version {manifest['schema_version']!r} is not supported by this moescope "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); use a matching moescope release or recapture"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise TraceError(f"{path}: manifest is damaged ({problem}); recapture the trace (or rerun the capture)")
    return manifest


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _part_problem(where: str, table: str, entry) -> str | None:
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    path = entry.get("path")
    parts = PurePosixPath(path).parts if isinstance(path, str) else ()
    if len(parts) < 2 or parts[0] != table or ".." in parts or "\\" in path or not path.endswith(".parquet") \
            or parts[-1].startswith("."):
        return f"{where}.path {path!r} is not a {table}/...parquet part inside this trace"
    if not (_count(entry.get("rows")) and _count(entry.get("bytes"))):
        return f"{where} rows/bytes are not non-negative integers"
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return f"{where}.sha256 is not a SHA-256 hex digest"
    return None


def manifest_problem(manifest: dict) -> str | None:
    """What is structurally wrong with a manifest that readers rely on, or None.

    Checked: model.id, the layers (n_experts, top_k), every shard's index, sequence range and its three
    part entries (a path inside the trace's own table folder, row and byte counts, a checksum).
    """
    model = manifest.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("id"), str):
        return "model.id is missing"
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        return "layers is not a list"
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not all(_count(layer.get(k)) and layer[k] > 0 for k in ("n_experts", "top_k")):
            return f"layers[{i}] lacks positive n_experts/top_k"
    if not isinstance(manifest.get("complete", False), bool):
        return "complete is not true/false"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "shards is not a list"
    paths = set()
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not _count(shard.get("index")):
            return f"shards[{i}] has no shard index"
        if not (_count(shard.get("seq_id_min")) and _count(shard.get("seq_id_max"))) or shard["seq_id_min"] > shard["seq_id_max"]:
            return f"shards[{i}] has no valid seq_id_min..seq_id_max"
        files = shard.get("files")
        if not isinstance(files, dict) or set(files) != set(TABLES):
            return f"shards[{i}].files does not list exactly {', '.join(TABLES)}"
        for table in TABLES:
            problem = _part_problem(f"shards[{i}].files.{table}", table, files[table])
            if problem:
                return problem
            paths.add(files[table]["path"])
    if len(paths) != len(shards) * len(TABLES):
        return "two shards list the same part file"
    return None


def library_versions() -> dict:
    """The versions of what wrote a trace, for its manifest."""
    import platform

    import numpy as np
    import pyarrow
    import torch
    import transformers

    from moescope.version import __version__

    return {
        "moescope": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
