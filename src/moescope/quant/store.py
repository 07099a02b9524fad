"""A sweep's out folder: an append-only log of finished configurations, then tables and a summary.

Shared by the quantization sweep (`moescope quant`) and the importance sweep (`moescope importance`):

    out/
      sweep.json        what is being swept (model, data and option fingerprint); checked on resume
      results.jsonl     one line per finished configuration, appended and fsync'ed as it finishes
      NAME.parquet / NAME.csv             the sweep's tables (quant: configs, per_layer)
      summary.json      what the sweep found (quant: the router-vs-experts answer per bit width)

A run killed at any moment (even SIGKILL) leaves at most a torn last line in results.jsonl; it is cut
off on the next open and that configuration runs again. Tables and summary are written to a temporary
name and renamed, so they are either the previous complete version or the new one. A lock file (flock,
released by the OS even on SIGKILL) keeps a second sweep out of a folder that one is writing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import weakref
from pathlib import Path

from moescope.quant.formats import QuantConfigError
from moescope.trace.storage import is_url

RESULTS = "results.jsonl"
SWEEP = "sweep.json"
LOCK = ".moescope-sweep.lock"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _restore_floats(value):
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, dict):
        return {k: _restore_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_floats(v) for v in value]
    return math.nan if value is None else value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dumps(obj) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False)


def _lock(out: Path, command: str, error: type[Exception]) -> int:
    """An exclusive flock on out/LOCK, or `error` when another sweep holds it."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise error(f"{out} is being written by another {command} sweep; "
                        "wait for it to finish or choose another --out") from None
        raise
    return fd


def _read_json(path: Path, error: type[Exception]):
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise error(f"{path} is corrupt; pass --overwrite to start the sweep afresh") from None


def _parse_line(line: bytes) -> dict | None:
    """One results.jsonl record, or None if the line is not one."""
    try:
        record = _restore_floats(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("config"), dict) and isinstance(record["config"].get("config_id"), str)
    return record if ok else None


class ResultStore:
    """Opens (or resumes) a sweep folder and holds its lock until `close()` (or the end of a `with`).

    `done` holds the ids of configurations already finished. `command` and `what` name the sweep in messages
    ("moescope quant", "quantization sweep"); `error` is the MoescopeError subclass they are raised as.
    """

    def __init__(self, out: str | os.PathLike, sweep_info: dict, *, overwrite: bool = False,
                 command: str = "moescope quant", what: str = "quantization sweep",
                 error: type[Exception] = QuantConfigError):
        if is_url(out):  # Path() would make a local folder named 's3:' of it
            raise error(f"{out}: a {what} is written to a local folder here; `{command} --out {out}` runs it in a "
                        "local copy and publishes it to the store")
        self.out, self.error = Path(out), error
        if self.out.exists() and not self.out.is_dir():
            raise error(f"--out {self.out} is a file; give a folder path")
        if self.out.is_dir() and any(self.out.iterdir()) and not any((self.out / n).exists() for n in (SWEEP, RESULTS, LOCK)):
            raise error(f"--out {self.out} is not empty and holds no {what}; choose a new or empty folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = _lock(self.out, command, error)
        except OSError as err:
            raise error(f"cannot write sweep folder {self.out}: {err.strerror}; choose a writable --out") from None
        self._release = weakref.finalize(self, os.close, fd)  # closing the descriptor releases the flock
        try:
            self._open(sweep_info, overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, sweep_info: dict, overwrite: bool) -> None:
        self.log = self.out / RESULTS
        info_path = self.out / SWEEP
        if overwrite:
            for name in (RESULTS, SWEEP):
                (self.out / name).unlink(missing_ok=True)
        if info_path.exists():
            existing = _read_json(info_path, self.error)
            if not isinstance(existing, dict) or existing.get("fingerprint") != sweep_info["fingerprint"]:
                raise self.error(
                    f"{self.out} holds a sweep of another model, corpus, batching or measurement mode "
                    f"({existing.get('fingerprint') if isinstance(existing, dict) else '?'} != {sweep_info['fingerprint']}); "
                    "choose another out folder or pass overwrite=True (--overwrite) to start afresh"
                )
        else:
            atomic_write_bytes(info_path, dumps(sweep_info).encode())
        self.records = self._read_log()
        self.done = {r["config"]["config_id"] for r in self.records}

    def _read_log(self) -> list[dict]:
        if not self.log.exists():
            return []
        data = self.log.read_bytes()
        keep = data.rfind(b"\n") + 1  # a line without its newline was torn by a kill: drop it
        records = []
        for number, line in enumerate(data[:keep].splitlines(), 1):
            if line.strip():
                record = _parse_line(line)
                if record is None:
                    raise self.error(f"{self.log}:{number} is not a finished configuration (corrupt); "
                                           "delete that line to rerun it, or pass --overwrite to start afresh")
                records.append(record)
        if keep != len(data):
            with open(self.log, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
        return records

    def close(self) -> None:
        """Release the folder's lock (idempotent)."""
        self._release()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, record: dict) -> None:
        """Commit one finished configuration: a single write of one line, then fsync."""
        line = (json.dumps(_jsonable(record), separators=(",", ":")) + "\n").encode()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)
        self.done.add(record["config"]["config_id"])

    def write_tables(self, tables: dict, summary: dict) -> None:
        """tables: {name: pandas DataFrame}, each written as NAME.parquet and NAME.csv; then summary.json."""
        import io

        for name, frame in tables.items():
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            atomic_write_bytes(self.out / f"{name}.parquet", buf.getvalue())
            atomic_write_bytes(self.out / f"{name}.csv", frame.to_csv(index=False).encode())
        atomic_write_bytes(self.out / "summary.json", dumps(summary).encode())
