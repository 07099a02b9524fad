"""The sweep's out folder: an append-only log of finished configurations, then tables and a summary.

    out/
      sweep.json        what is being swept (model, data and option fingerprint); checked on resume
      results.jsonl     one line per finished configuration, appended and fsync'ed as it finishes
      configs.parquet / configs.csv       one row per configuration
      per_layer.parquet / per_layer.csv   one row per configuration x MoE layer x mode (local / e2e)
      summary.json      the router-vs-experts answer per bit width, and the dense control

A run killed at any moment (even SIGKILL) leaves at most a torn last line in results.jsonl; it is cut
off on the next open and that configuration runs again. Tables and summary are written to a temporary
name and renamed, so they are either the previous complete version or the new one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moescope.quant.formats import QuantConfigError

RESULTS = "results.jsonl"
SWEEP = "sweep.json"


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


class ResultStore:
    """Opens (or resumes) a sweep folder. `done` holds the ids of configurations already finished."""

    def __init__(self, out: str | os.PathLike, sweep_info: dict, *, overwrite: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / RESULTS
        info_path = self.out / SWEEP
        if overwrite:
            for name in (RESULTS, SWEEP):
                (self.out / name).unlink(missing_ok=True)
        if info_path.exists():
            existing = json.loads(info_path.read_text())
            if existing.get("fingerprint") != sweep_info["fingerprint"]:
                raise QuantConfigError(
                    f"{self.out} holds a sweep of another model, corpus, batching or measurement mode "
                    f"({existing.get('fingerprint')} != {sweep_info['fingerprint']}); "
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
        for line in data[:keep].splitlines():
            if line.strip():
                records.append(_restore_floats(json.loads(line)))
        if keep != len(data):
            with open(self.log, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
        return records

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

    def write_tables(self, configs, per_layer, summary: dict) -> None:
        """configs / per_layer: pandas DataFrames."""
        import io

        for name, frame in (("configs", configs), ("per_layer", per_layer)):
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            atomic_write_bytes(self.out / f"{name}.parquet", buf.getvalue())
            atomic_write_bytes(self.out / f"{name}.csv", frame.to_csv(index=False).encode())
        atomic_write_bytes(self.out / "summary.json", dumps(summary).encode())
