"""Health check of a trace without loading it: every listed part exists, has its size and checksum,
its Parquet footer agrees with the manifest's row count and the table's column types, and (schema 2) every
routing row's slots are in gate-weight order (trace/slots.py). Reads one file at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from moescope.errors import TraceError
from moescope.trace.reader import Trace, fixed_list_to_numpy
from moescope.trace.slots import slot_order_problem


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
                if entry is shard["files"]["routing"] and trace.schema_version >= 2:
                    problem = _slot_order(trace, entry)
                    if problem:
                        report.problems.append(f"{trace.folder / entry['path']}: {problem}")
            except TraceError as err:
                report.problems.append(str(err))
    return report


def _slot_order(trace: Trace, entry: dict) -> str | None:
    routing = trace._read(entry, columns=["topk_ids", "topk_weights"])
    k = routing.schema.field("topk_ids").type.list_size
    ids = fixed_list_to_numpy(routing.column("topk_ids"), k, "int16")  # [R, k]
    return slot_order_problem(ids, fixed_list_to_numpy(routing.column("topk_weights"), k, "float32"))
