"""manifest.json: what a trace holds and which shards are committed.

A shard exists only once the manifest lists it (with row counts and SHA-256 checksums); the manifest
is replaced atomically (write to a temporary file, fsync, rename), so a reader never sees a shard
that is listed but incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moescope.errors import TraceError
from moescope.trace.schema import SCHEMA_VERSION

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).exists():
        raise TraceError(f"{folder}: no such trace folder; capture one with `moescope capture`")
    if not path.is_file():
        raise TraceError(f"{folder}: not a moescope trace (no {MANIFEST}); capture one with `moescope capture`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError(f"{path}: manifest is corrupt ({err.__class__.__name__}); recapture the trace") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise TraceError(f"{path}: not a moescope manifest (no schema_version)")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: trace schema version {manifest['schema_version']} is not supported by this moescope "
            f"(reads version {SCHEMA_VERSION}); use a matching moescope release or recapture"
        )
    return manifest
