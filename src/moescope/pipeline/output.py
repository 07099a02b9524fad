"""Output folders of the pipeline steps: refuse what is not ours before anything is written.

Every step that writes a folder (`analyze`, `compare`, `demo`, ...) calls `prepare_output_folder`
first, so a path that is a file, a non-empty folder that some other program (or the user) owns, or a
folder that cannot be written is one clear error, and nothing of the user's is ever overwritten.

Results on an object store (`--out s3://bucket/results`, for the steps that pass `remote=True`: all of them)
are written into a local staging folder and published by `publish` (called by
`write_results` once summary.json, the last file of every results folder, is written): the old summary.json
object is deleted, every other file uploaded, then summary.json, so a prefix with a summary.json holds a
whole set of results, as a local folder does. Results folders are small (tables and a summary); traces,
which are not, are written to the store directly (trace/writer.py). `storage.download` fetches one for reading.

Resumable sweeps (`quant`, `importance`) on a prefix run in a local copy of it (`sweep_folder`), under the
prefix's lease (trace/lease.py), their log copied up while they run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.trace.lease import LEASE_DIR, Lease
from moescope.trace.storage import Location, is_url, location

SUMMARY = "summary.json"
_STAGED: dict[Path, Location] = {}  # staging folder -> the object-store prefix it is published to


def _check_remote(out: str, *, markers: tuple[str, ...], what: str, remote: bool) -> Location:
    if not remote:
        raise MoescopeError(f"--out {out}: {what} cannot be written to object storage yet; give a local folder")
    where = location(out)
    if not where.bucket_exists():
        raise MoescopeError(f"--out {out}: no such bucket (or no access to it); create it or check the storage options")
    names = where.list()
    if names and not any(name == marker or name.startswith(f"{marker}/") for name in names for marker in markers):
        raise MoescopeError(f"--out {out} is not empty and holds no {what}; choose a new or empty prefix")
    return where


def check_output_folder(out: str | os.PathLike, *, markers: tuple[str, ...], what: str, remote: bool = False) -> Path:
    """`out` as a Path, after refusing a file and a non-empty folder holding none of `markers` (names of
    entries this kind of output writes, by which a previous run's folder is recognised). Creates nothing.
    `remote=True`: the step publishes through `write_results`, so an object-store URL is taken (and returned as is)."""
    if is_url(out):
        _check_remote(out, markers=markers, what=what, remote=remote)
        return out
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in markers):
        raise MoescopeError(f"--out {out} is not empty and holds no {what}; choose a new or empty folder")
    return out


def prepare_output_folder(out: str | os.PathLike, *, markers: tuple[str, ...], what: str, remote: bool = False) -> Path:
    """`check_output_folder`, then create the folder and prove it writable (root ignores permission bits,
    so a probe file is the only reliable test). For an object-store URL: a local staging folder that
    `publish` uploads."""
    if is_url(out):
        where = _check_remote(out, markers=markers, what=what, remote=remote)
        staging = Path(tempfile.mkdtemp(prefix="moescope-results-"))
        _STAGED[staging] = where
        return staging
    out = check_output_folder(out, markers=markers, what=what)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise MoescopeError(f"cannot write into {out}: {err.strerror}; choose a writable --out") from None
    return out


def publish(folder: Path, *, last: str = SUMMARY) -> None:
    """Upload a staging folder to its object-store prefix, `last` (the file that says the results are whole:
    summary.json, or replay_check.json) last; nothing for a local folder."""
    where = _STAGED.pop(Path(folder), None)
    if where is None:
        return
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    where.delete(last, missing_ok=True)  # until the new one lands, the prefix does not claim to be complete
    for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix() == last):
        where.write_bytes(path.relative_to(folder).as_posix(), path.read_bytes())
    shutil.rmtree(folder)


SWEEP_LOG = ("sweep.json", "results.jsonl")  # what a resumable sweep (quant/store.py) resumes from
SYNC_S = 5.0  # how often a sweep's log is copied to its prefix while it runs


def _sweep_files(folder: Path) -> dict[str, Path]:
    """{relative name: path} of what a sweep folder holds, without lock files (names starting with '.')."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _upload_changed(where: Location, folder: Path, names, seen: dict[str, tuple[int, int]]) -> None:
    for name in names:
        path = folder / name
        if path.is_file() and seen.get(name) != ((stat := path.stat()).st_size, stat.st_mtime_ns):
            where.upload(name, path)
            seen[name] = (stat.st_size, stat.st_mtime_ns)


@contextmanager
def sweep_folder(out, *, markers: tuple[str, ...], what: str) -> Iterator[Path]:
    """The folder a resumable sweep (`quant`, `importance`: quant/store.py) runs in: `out` itself when local. For an
    object-store prefix: a local copy of what the prefix holds (so a rerun resumes from its results.jsonl), with a
    lease on the prefix (one sweep per prefix, as the folder's flock does locally); the log (sweep.json,
    results.jsonl) is copied to the prefix every few seconds while the sweep runs and when it stops, and at the end
    every file is published, summary.json last. Checked before anything is written or loaded."""
    if not is_url(out):
        yield Path(out)
        return
    where = _check_remote(out, markers=markers, what=what, remote=True)
    lease = Lease(where)
    lease.acquire()
    staging = Path(tempfile.mkdtemp(prefix="moescope-sweep-"))
    stop, seen = threading.Event(), {}
    try:
        for rel in where.list():
            if not rel.startswith(f"{LEASE_DIR}/"):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                where.download_to(rel, staging / rel)
                seen[rel] = ((staging / rel).stat().st_size, (staging / rel).stat().st_mtime_ns)

        def sync() -> None:  # a sweep killed on the way loses at most the last SYNC_S seconds of its log
            while not stop.wait(SYNC_S):
                try:
                    _upload_changed(where, staging, SWEEP_LOG, seen)
                except MoescopeError:  # the store is unreachable: the copy when the sweep stops raises it
                    return

        thread = threading.Thread(target=sync, name="moescope-sweep-sync", daemon=True)
        thread.start()
        try:
            yield staging
        finally:
            stop.set()
            thread.join()
            _upload_changed(where, staging, SWEEP_LOG, seen)
        files = _sweep_files(staging)
        lease.check()  # a sweep that lost the prefix to another (paused past the lease) does not publish over it
        where.delete(SUMMARY, missing_ok=True)  # until the new one lands, the prefix does not claim to be complete
        _upload_changed(where, staging, sorted(files, key=lambda name: name == SUMMARY), seen)
    finally:
        lease.release()
        shutil.rmtree(staging, ignore_errors=True)


@atexit.register
def _remove_unpublished() -> None:  # a step that failed before its summary: nothing of it is uploaded
    for folder in list(_STAGED):
        shutil.rmtree(folder, ignore_errors=True)
