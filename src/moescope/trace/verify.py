"""Health check of a trace without loading it: every listed part exists, has its size and checksum,
and its Parquet footer agrees with the manifest's row count and the table's column types. Reads one file at a
time, in chunks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
            try:  # size and checksum, then the footer's row count and the columns' types (no column data read)
                trace._read(entry, verify=True, columns=[])
                trace.check_schema(entry)
            except TraceError as err:
                report.problems.append(str(err))
    return report
