"""MemoryTrace: a trace held in memory (what `moescope.record(model)` gives without `out`), read like a folder.

It has the manifest and the three tables per shard that a trace folder has, and `Trace`'s readers work on
it unchanged (`shards()`, `table()`, `sql()`, the analyses): only where a part's table comes from differs.
`save(folder)` writes it as an ordinary trace folder (atomic shards, checksums), the same bytes a capture
of the same tables writes.
"""

from __future__ import annotations

import os

import pyarrow as pa

from moescope.errors import TraceError
from moescope.trace.reader import ROUTING_BATCH_ROWS, Trace
from moescope.trace.schema import SCHEMA_VERSION, TABLES


def memory_part(table: str, index: int, data: pa.Table) -> dict:
    """The manifest entry of an in-memory part (no file, so no checksum)."""
    return {"path": f"{table}/part-{index:05d}.parquet", "rows": data.num_rows, "bytes": data.nbytes, "sha256": None}


class MemoryTrace(Trace):
    """A trace whose shards are Arrow tables in memory: {table name: pa.Table} per shard."""

    def __init__(self, manifest: dict, shards: list[dict[str, pa.Table]]):
        self.folder = None
        self._parts = {}
        listed = []
        for index, tables in enumerate(shards):
            files = {name: memory_part(name, index, tables[name]) for name in TABLES}
            self._parts.update({files[name]["path"]: tables[name] for name in TABLES})
            seq_ids = tables["sequences"].column("seq_id").to_pylist()
            listed.append({"index": index, "seq_id_min": min(seq_ids), "seq_id_max": max(seq_ids), "files": files})
        self.manifest = {**manifest, "schema_version": SCHEMA_VERSION, "shards": listed, "in_memory": True}
        self._domain_names = None

    def __repr__(self) -> str:
        return (f"MemoryTrace(model={self.manifest['model']['id']!r}, tokens={self.n_tokens}, moe_layers={self.n_layers}, "
                f"shards={len(self.manifest['shards'])}, complete={self.complete})")

    def part_paths(self, table: str):
        raise TraceError("an in-memory trace has no part files; save it first: trace.save('traces/name')")

    def check_part(self, entry: dict, *, verify: bool = False):
        return None

    def _read(self, entry: dict, *, verify: bool = False, columns=None) -> pa.Table:
        table = self._parts[entry["path"]]
        return table.select(columns) if columns is not None else table

    def _part_batches(self, entry: dict, *, verify: bool = False, columns=None):
        whole = self._parts[entry["path"]]
        table = whole if columns is None else whole.select([c for c in columns if c in whole.schema.names])
        return whole.schema, table.num_rows, iter(table.to_batches(max_chunksize=ROUTING_BATCH_ROWS))

    def duckdb(self):
        """A DuckDB connection with views `routing`, `tokens`, `sequences` over the in-memory tables."""
        import duckdb

        con = duckdb.connect()
        for name in TABLES:
            parts = [self._parts[s["files"][name]["path"]] for s in self.manifest["shards"]]
            if parts:
                con.register(name, pa.concat_tables(parts))
        return con

    def save(self, folder: str | os.PathLike) -> Trace:
        """Write this trace as a trace folder (refused if `folder` already holds one) and open it."""
        from moescope.trace.writer import TraceWriter

        manifest = {k: v for k, v in self.manifest.items() if k not in ("shards", "in_memory", "complete")}
        if (os.path.isdir(folder) and os.listdir(folder)):
            raise TraceError(f"{folder} is not empty; save an in-memory trace into a new folder")
        with TraceWriter(folder, manifest) as writer:
            for shard in self.manifest["shards"]:
                tables = {name: self._parts[shard["files"][name]["path"]] for name in TABLES}
                writer.write_shard(tables, seq_id_min=shard["seq_id_min"], seq_id_max=shard["seq_id_max"])
            if self.complete:
                writer.finish()
        return Trace(folder)
