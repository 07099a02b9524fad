"""Health check of a trace without loading it: every listed part exists, has its size and checksum,
and its Parquet footer agrees with the manifest's row count. Reads one file at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.reader import Trace


@dataclass
class VerifyReport:
    folder: str
    complete: bool
    n_parts: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"{self.folder}: {self.n_parts} part files checked, {'complete' if self.complete else 'INCOMPLETE (capture did not finish; rerun it to resume)'}"
        if self.ok:
            return [head, "ok: every part matches the manifest"]
        return [head, *[f"problem: {p}" for p in self.problems], "recapture the trace (or rerun the capture to resume)"]


def verify_trace(folder: str | os.PathLike) -> VerifyReport:
    trace = Trace(folder)
    report = VerifyReport(str(folder), trace.complete)
    for shard in trace.manifest["shards"]:
        for entry in shard["files"].values():
            report.n_parts += 1
            try:
                path = trace.check_part(entry, verify=True)
                rows = pq.ParquetFile(path).metadata.num_rows
                if rows != entry["rows"]:
                    report.problems.append(f"{path}: {rows} rows, manifest says {entry['rows']}")
            except TraceError as err:
                report.problems.append(str(err))
    return report
