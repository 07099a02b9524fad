"""Reading traces: `open_trace(path)` -> Trace, which streams committed shards as ShardData.

Every part file is checked against the manifest (existence, size, row count; the SHA-256 with
`verify=True`) before it is used, so a truncated or swapped file is reported by name instead of being
read as data. Memory is bounded by one shard. Schema-1 traces are read with each row's slots put in
gate-weight order (trace/slots.py), in `shards()` and in the DuckDB views alike.

A trace on an object store (`open_trace("s3://bucket/prefix")`, trace/storage.py) is read the same way, each
part through pyarrow.fs; its DuckDB views are Arrow datasets over the listed parts, registered on the
connection, so `sql` gives the rows a local copy gives.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.manifest import read_manifest, sha256_file
from moescope.trace.schema import TABLES, schema_problem
from moescope.trace.storage import is_url, location, with_options
from moescope.trace.shard import ShardData, document_key
from moescope.trace.slots import order_slots, v1_ordered_routing_sql


def fixed_list_to_numpy(column: pa.ChunkedArray, width: int, dtype) -> np.ndarray:
    values = pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else pa.array([])
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)


ROUTING_BATCH_ROWS = 1 << 16  # rows per batch of a routing part read by `Trace.read_shard`
ROUTING_LISTS = {"topk_ids": np.int16, "topk_weights": np.float32, "router_output": np.float32,
                 "next_layer_prediction": np.int16, "expert_norms": np.float32}  # list columns -> numpy dtypes


def _rows_in_order(batch: pa.RecordBatch, start: int, seq_id: np.ndarray, pos: np.ndarray) -> bool:
    """Whether routing rows start..start+len(batch) are, in order, each token of the shard (seq_id, pos [T]) at layer
    0, then each at layer 1, ...: row r is token r % T at layer r // T. Compared a layer's span at a time, slices
    against slices (no per-row index arrays)."""
    layer, seqs, positions = (batch.column(name).to_numpy() for name in ("layer", "seq_id", "pos"))
    n_tokens, at = len(seq_id), 0
    if not n_tokens:
        return batch.num_rows == 0
    while at < batch.num_rows:
        l, t = divmod(start + at, n_tokens)
        span = min(n_tokens - t, batch.num_rows - at)
        if not (np.all(layer[at : at + span] == l) and np.array_equal(seqs[at : at + span], seq_id[t : t + span])
                and np.array_equal(positions[at : at + span], pos[t : t + span])):
            return False
        at += span
    return True


class Trace:
    """A trace folder opened for reading. Use `shards()`, `table(name)` or `sql(query)`."""

    remote = False  # True when the trace is on an object store (self.folder is then a storage.Location)

    def __init__(self, folder):
        self.remote = is_url(folder)
        self.folder = location(folder) if self.remote else Path(folder)  # a storage.Location on an object store
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

    def check_part(self, entry: dict, *, verify: bool = False):
        """The part's path (an open input file on an object store), after checking its size (and checksum)."""
        path = self.folder / entry["path"]
        size = self.folder.size(entry["path"]) if self.remote else (path.stat().st_size if path.is_file() else None)
        if size is None:
            raise TraceError(f"{path}: shard listed in the manifest is missing; recapture (rerun the capture command)")
        if size != entry["bytes"]:
            raise TraceError(f"{path}: size {size} != {entry['bytes']} in manifest (truncated?); recapture")
        if self.remote:
            if verify:
                data = self.folder.read_bytes(entry["path"])
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise TraceError(f"{path}: checksum does not match the manifest (corrupted); recapture")
                return pa.BufferReader(data)
            return self.folder.open_input(entry["path"])
        if verify and sha256_file(path) != entry["sha256"]:
            raise TraceError(f"{path}: checksum does not match the manifest (corrupted); recapture")
        return path

    def _read(self, entry: dict, *, verify: bool = False, columns=None) -> pa.Table:
        source = self.check_part(entry, verify=verify)
        path = self.folder / entry["path"]
        try:
            table = pq.read_table(source, columns=columns)
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

    def _part_batches(self, entry: dict, *, verify: bool = False,
                      columns: list[str] | None = None) -> tuple[pa.Schema, int, Iterator[pa.RecordBatch]]:
        """(schema, rows, batches of at most ROUTING_BATCH_ROWS rows of those of `columns` it has (default all)) of
        one part, read as the batches are taken."""
        part = pq.ParquetFile(self.check_part(entry, verify=verify))
        schema = part.schema_arrow
        columns = None if columns is None else [c for c in columns if c in schema.names]
        return schema, part.metadata.num_rows, part.iter_batches(batch_size=ROUTING_BATCH_ROWS, columns=columns)

    def _read_routing(self, shard: dict, seq_id: np.ndarray, pos: np.ndarray, n_layers: int, *,
                      verify: bool = False, lists: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{list column: [L, T, width] array} of a shard's routing part (only the `lists` named, when given), read in
        batches of ROUTING_BATCH_ROWS rows into arrays of their final shape (no whole Arrow table beside them: about
        half the peak memory of a read); checks that its rows are one per token and layer in (layer, seq_id, pos)
        order."""
        entry = shard["files"]["routing"]
        path = entry["path"] if self.folder is None else self.folder / entry["path"]  # a MemoryTrace has no folder
        n_tokens = len(seq_id)
        try:
            columns = None if lists is None else ["seq_id", "pos", "layer", *lists]
            schema, rows, batches = self._part_batches(entry, verify=verify, columns=columns)
            problem = schema_problem("routing", schema)
        except (pa.ArrowException, OSError, KeyError, ValueError) as err:  # ArrowException: every pyarrow error
            raise TraceError(f"{path}: unreadable Parquet ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             "recapture") from None
        if rows != entry["rows"]:
            raise TraceError(f"{path}: {rows} rows but the manifest says {entry['rows']}; recapture")
        if problem:
            raise TraceError(f"{path}: {problem}; not a part this moescope wrote, recapture")
        if rows != n_tokens * n_layers:
            raise TraceError(f"{self.folder}: shard {shard['index']} has {rows} routing rows, expected {n_tokens}x{n_layers}")
        arrays = {name: np.empty((rows, schema.field(name).type.list_size), dtype)
                  for name, dtype in ROUTING_LISTS.items() if name in schema.names and (lists is None or name in lists)}
        start, in_order = 0, True
        try:
            for batch in batches:
                # rows are (layer, seq_id, pos)-ordered and every layer covers the shard's tokens: the dense reshape needs it
                in_order = in_order and _rows_in_order(batch, start, seq_id, pos)
                for name, out in arrays.items():
                    values = batch.column(name).flatten()
                    out[start : start + batch.num_rows] = values.to_numpy(zero_copy_only=False).reshape(-1, out.shape[1])
                start += batch.num_rows
        except (pa.ArrowException, OSError, ValueError) as err:
            raise TraceError(f"{path}: unreadable Parquet ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             "recapture") from None
        if not in_order or start != rows:
            raise TraceError(f"{self.folder}: shard {shard['index']}'s routing rows are not one row per token and layer in "
                             "(layer, seq_id, pos) order; recapture")
        return {name: out.reshape(n_layers, n_tokens, -1) for name, out in arrays.items()}

    def check_schema(self, entry: dict) -> None:
        """The part's columns and their types (from the footer alone) are those of its table."""
        path = self.folder / entry["path"]
        try:
            source = self.folder.open_input(entry["path"]) if self.remote else path
            problem = schema_problem(entry["path"].split("/")[0], pq.read_schema(source))
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

    def shards(self, *, verify: bool = False, ids_only: bool = False) -> Iterator[ShardData]:
        """Committed shards in order, as dense ShardData blocks (see `read_shard` for `ids_only`)."""
        for shard in self.manifest["shards"]:
            yield self.read_shard(shard, verify=verify, ids_only=ids_only)

    def read_shard(self, shard: dict, *, verify: bool = False, ids_only: bool = False) -> ShardData:
        """One committed shard. `ids_only`: of the routing part's lists, only the expert ids and next-layer predictions
        are decoded (gate weights, router outputs and expert norms are left out, None): what analyses that never read
        them need, at about half the decoding (a trace's slots stay in gate-weight order: trace/slots.py)."""
        tokens = self._read(shard["files"]["tokens"], verify=verify)
        sequences = self._read(shard["files"]["sequences"], verify=verify)
        n_layers = len(self.layers)
        seq_id = tokens.column("seq_id").to_numpy()
        pos = tokens.column("pos").to_numpy()
        ids_only = ids_only and self.schema_version != 1  # slots stored in the experts' order: the weights order them
        lists = ("topk_ids", "next_layer_prediction") if ids_only else None
        routing = self._read_routing(shard, seq_id, pos, n_layers, verify=verify, lists=lists)  # {column: [L, T, width]}
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
        router_output = routing.get("router_output")
        predicted = routing.get("next_layer_prediction")
        norms = routing.get("expert_norms")
        entropy = tokens.column("output_entropy").to_numpy(zero_copy_only=False).astype(np.float32)
        topk_ids, topk_weights = routing["topk_ids"], routing.get("topk_weights")
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
        self.register_views(con)
        return con

    def register_views(self, con, prefix: str = "") -> None:
        """Views `{prefix}routing`, `{prefix}tokens`, `{prefix}sequences` on the DuckDB connection `con`."""
        for name in TABLES:
            source = self.table_sql(name, con=con, prefix=prefix)
            if source:
                con.execute(f"CREATE VIEW {prefix}{name} AS {source}")

    def table_sql(self, name: str, *, con=None, prefix: str = "") -> str | None:
        """A DuckDB SELECT over the committed parts of table `name` (None when there are none); for a
        schema-1 routing table, with each row's slots in gate-weight order. On an object store the parts are
        an Arrow dataset registered on `con` as `_{prefix}{name}_parts` (so `con` is needed there)."""
        entries = [shard["files"][name]["path"] for shard in self.manifest["shards"]]
        if not entries:
            return None
        if self.remote:
            import pyarrow.dataset as ds

            if con is None:
                raise TraceError(f"{self.folder}: SQL over an object-store trace needs its connection (Trace.duckdb())")
            dataset = ds.dataset([self.folder.key(rel) for rel in entries], filesystem=self.folder.fs, format="parquet")
            parts = f"_{prefix}{name}_parts"
            con.register(parts, dataset)
            source = f"(SELECT {_as_lists(con, parts)} FROM {parts})"
            schema = dataset.schema
        else:
            paths = [str(self.folder / rel) for rel in entries]
            source = f"read_parquet({paths!r})"
            schema = pq.read_schema(paths[0]) if name == "routing" and self.schema_version == 1 else None
        if name == "routing" and self.schema_version == 1:
            return v1_ordered_routing_sql(source, schema.names, schema.field("topk_ids").type.list_size)
        return f"SELECT * FROM {source}"

    def sql(self, query: str):
        """Run `query` against the trace's tables; returns a pandas DataFrame."""
        return self.duckdb().execute(query).fetchdf()


def _as_lists(con, source: str) -> str:
    """A select list over `source` with DuckDB ARRAY columns (how it reads Arrow fixed-size lists) cast to LIST
    (how `read_parquet` reads the same Parquet columns), so an object-store trace's rows equal a local one's."""
    items = []
    for column, kind, *_ in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall():
        array = re.fullmatch(r"(.*)\[\d+\]", kind)
        items.append(f'CAST("{column}" AS {array.group(1)}[]) AS "{column}"' if array else f'"{column}"')
    return ", ".join(items)


def open_trace(path: str | os.PathLike, *, storage_options: dict | None = None) -> Trace:
    """Open a trace folder (or an object-store URL such as s3://bucket/prefix) written by `moescope capture` or
    `moescope import`. `storage_options`: for a URL, the settings `--storage-option` takes (endpoint_url, profile,
    access_key, ...), instead of the process's defaults."""
    return Trace(with_options(path, storage_options))
