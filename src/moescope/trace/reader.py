"""Reading traces: `open_trace(path)` -> Trace, which streams committed shards as ShardData.

Every part file is checked against the manifest (existence, size, row count; the SHA-256 with
`verify=True`) before it is used, so a truncated or swapped file is reported by name instead of being
read as data. Memory is bounded by one shard. Schema-1 traces are read with each row's slots put in
gate-weight order (trace/slots.py), in `shards()` and in the DuckDB views alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.manifest import read_manifest, sha256_file
from moescope.trace.schema import TABLES, schema_problem
from moescope.trace.shard import ShardData, document_key
from moescope.trace.slots import order_slots, v1_ordered_routing_sql


def fixed_list_to_numpy(column: pa.ChunkedArray, width: int, dtype) -> np.ndarray:
    values = pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else pa.array([])
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)


class Trace:
    """A trace folder opened for reading. Use `shards()`, `table(name)` or `sql(query)`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._domain_names: tuple[str, ...] | None = None

    # -- facts ---------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]

    @property
    def n_tokens(self) -> int:
        return sum(s["files"]["tokens"]["rows"] for s in self.manifest["shards"])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.folder)!r}, model={self.manifest['model']['id']!r}, tokens={self.n_tokens}, "
            f"moe_layers={self.n_layers}, shards={len(self.manifest['shards'])}, complete={self.complete})"
        )

    def _repr_html_(self) -> str:  # a notebook cell
        from moescope.trace.html import trace_html

        return trace_html(self)

    # -- integrity -----------------------------------------------------------------------------
    def part_paths(self, table: str) -> list[Path]:
        return [self.folder / shard["files"][table]["path"] for shard in self.manifest["shards"]]

    def check_part(self, entry: dict, *, verify: bool = False) -> Path:
        path = self.folder / entry["path"]
        if not path.is_file():
            raise TraceError(f"{path}: shard listed in the manifest is missing; recapture (rerun the capture command)")
        if path.stat().st_size != entry["bytes"]:
            raise TraceError(f"{path}: size {path.stat().st_size} != {entry['bytes']} in manifest (truncated?); recapture")
        if verify and sha256_file(path) != entry["sha256"]:
            raise TraceError(f"{path}: checksum does not match the manifest (corrupted); recapture")
        return path

    def _read(self, entry: dict, *, verify: bool = False, columns=None) -> pa.Table:
        path = self.check_part(entry, verify=verify)
        try:
            table = pq.read_table(path, columns=columns)
            # names are decoded lazily: a damaged footer can fail here too (UnicodeDecodeError)
            problem = schema_problem(entry["path"].split("/")[0], table.schema, some_columns=columns is not None)
        except (pa.ArrowException, OSError, KeyError, ValueError) as err:  # ArrowException: every pyarrow error
            raise TraceError(f"{path}: unreadable Parquet ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             "recapture") from None
        if table.num_rows != entry["rows"]:
            raise TraceError(f"{path}: {table.num_rows} rows but the manifest says {entry['rows']}; recapture")
        if problem:
            raise TraceError(f"{path}: {problem}; not a part this moescope wrote, recapture")
        return table

    def check_schema(self, entry: dict) -> None:
        """The part's columns and their types (from the footer alone) are those of its table."""
        path = self.folder / entry["path"]
        try:
            problem = schema_problem(entry["path"].split("/")[0], pq.read_schema(path))
        except (pa.ArrowException, OSError, KeyError, ValueError) as err:
            raise TraceError(f"{path}: unreadable Parquet footer ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             "recapture") from None
        if problem:
            raise TraceError(f"{path}: {problem}; not a part this moescope wrote, recapture")

    # -- tables --------------------------------------------------------------------------------
    def table(self, name: str, *, columns: list[str] | None = None) -> pa.Table:
        """One whole table (`routing`, `tokens` or `sequences`) as Arrow; fine for small traces."""
        if name not in TABLES:
            raise TraceError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")
        parts = [self._read(shard["files"][name], columns=columns) for shard in self.manifest["shards"]]
        return pa.concat_tables(parts) if parts else pa.table({})

    @property
    def domain_names(self) -> tuple[str, ...]:
        if self._domain_names is None:
            domains = self.table("sequences", columns=["domain"]).column("domain") if self.manifest["shards"] else []
            self._domain_names = tuple(sorted(set(pa.array(domains).to_pylist()))) if len(domains) else ()
        return self._domain_names

    def shards(self, *, verify: bool = False) -> Iterator[ShardData]:
        """Committed shards in order, as dense ShardData blocks."""
        for shard in self.manifest["shards"]:
            yield self.read_shard(shard, verify=verify)

    def read_shard(self, shard: dict, *, verify: bool = False) -> ShardData:
        routing = self._read(shard["files"]["routing"], verify=verify)
        tokens = self._read(shard["files"]["tokens"], verify=verify)
        sequences = self._read(shard["files"]["sequences"], verify=verify)
        n_tokens, n_layers = tokens.num_rows, len(self.layers)
        if routing.num_rows != n_tokens * n_layers:
            raise TraceError(f"{self.folder}: shard {shard['index']} has {routing.num_rows} routing rows, expected {n_tokens}x{n_layers}")
        k = routing.schema.field("topk_ids").type.list_size
        seq_id = tokens.column("seq_id").to_numpy()
        pos = tokens.column("pos").to_numpy()
        # rows are (layer, seq_id, pos)-ordered and every layer covers the shard's tokens: the dense [L, T, k] reshape needs it
        if not (np.array_equal(routing.column("layer").to_numpy(), np.repeat(np.arange(n_layers), n_tokens))
                and np.array_equal(routing.column("seq_id").to_numpy(), np.tile(seq_id, n_layers))
                and np.array_equal(routing.column("pos").to_numpy(), np.tile(pos, n_layers))):
            raise TraceError(f"{self.folder}: shard {shard['index']}'s routing rows are not one row per token and layer in "
                             "(layer, seq_id, pos) order; recapture")
        domain_of_seq = dict(zip(sequences.column("seq_id").to_pylist(), sequences.column("domain").to_pylist()))
        names = self.domain_names
        seq_ids, inverse = np.unique(seq_id, return_inverse=True)
        if not all(int(s) in domain_of_seq and domain_of_seq[int(s)] in names for s in seq_ids):
            raise TraceError(f"{self.folder}: shard {shard['index']} has tokens of sequences its sequences part does not "
                             "list; recapture")
        domain_codes = np.array([names.index(domain_of_seq[int(s)]) for s in seq_ids], dtype=np.int16)
        document_of_seq = {int(s): document_key(src, doc) for s, src, doc in zip(
            *(sequences.column(c).to_pylist() for c in ("seq_id", "source", "doc_id")))}
        documents = np.array([document_of_seq[int(s)] for s in seq_ids], dtype=np.int64)  # one per sequence
        router_output = None
        if "router_output" in routing.column_names:
            width = routing.schema.field("router_output").type.list_size
            router_output = fixed_list_to_numpy(routing.column("router_output"), width, np.float32).reshape(n_layers, n_tokens, width)
        predicted = None
        if "next_layer_prediction" in routing.column_names:
            width = routing.schema.field("next_layer_prediction").type.list_size
            predicted = fixed_list_to_numpy(routing.column("next_layer_prediction"), width, np.int16).reshape(n_layers, n_tokens, width)
        norms = None
        if "expert_norms" in routing.column_names:
            width = routing.schema.field("expert_norms").type.list_size
            norms = fixed_list_to_numpy(routing.column("expert_norms"), width, np.float32).reshape(n_layers, n_tokens, width)
        entropy = tokens.column("output_entropy").to_numpy(zero_copy_only=False).astype(np.float32)
        topk_ids = fixed_list_to_numpy(routing.column("topk_ids"), k, np.int16).reshape(n_layers, n_tokens, k)
        topk_weights = fixed_list_to_numpy(routing.column("topk_weights"), k, np.float32).reshape(n_layers, n_tokens, k)
        if self.schema_version == 1:  # stored in the experts' order
            topk_ids, topk_weights = order_slots(topk_ids, topk_weights)
        return ShardData(
            layers=np.arange(n_layers, dtype=np.int16),
            seq_id=seq_id.astype(np.int32, copy=False),
            pos=pos.astype(np.int32, copy=False),
            token_id=tokens.column("token_id").to_numpy().astype(np.int32, copy=False),
            generated=tokens.column("generated").to_numpy(zero_copy_only=False),
            domain=domain_codes[inverse],
            domain_names=names,
            topk_ids=topk_ids,
            topk_weights=topk_weights,
            router_output=router_output,
            output_entropy=None if np.isnan(entropy).all() else entropy,
            predicted_next_ids=predicted,
            document=documents[inverse],
            expert_norms=norms,
        )

    # -- SQL -----------------------------------------------------------------------------------
    def duckdb(self):
        """A DuckDB connection with views `routing`, `tokens`, `sequences` over the committed parts."""
        import duckdb

        con = duckdb.connect()
        for name in TABLES:
            source = self.table_sql(name)
            if source:
                con.execute(f"CREATE VIEW {name} AS {source}")
        return con

    def table_sql(self, name: str) -> str | None:
        """A DuckDB SELECT over the committed parts of table `name` (None when there are none); for a
        schema-1 routing table, with each row's slots in gate-weight order."""
        paths = [str(p) for p in self.part_paths(name)]
        if not paths:
            return None
        source = f"read_parquet({paths!r})"
        if name == "routing" and self.schema_version == 1:
            schema = pq.read_schema(paths[0])
            return v1_ordered_routing_sql(source, schema.names, schema.field("topk_ids").type.list_size)
        return f"SELECT * FROM {source}"

    def sql(self, query: str):
        """Run `query` against the trace's tables; returns a pandas DataFrame."""
        return self.duckdb().execute(query).fetchdf()


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a trace folder written by `moescope capture` or `moescope import`."""
    return Trace(path)
