"""The load table: expert token counts per window, the load matrix expert-placement balancers take.

One Parquet table (a file, or a folder of `*.parquet` files read together), one row per (window, layer, expert):

    window  int32   index of the window (consecutive time windows of a server; iterations of TensorRT-LLM)
    layer   int16   MoE-layer index 0..L-1 (not the decoder-layer index)
    expert  int32   routed expert id 0..E-1
    tokens  int64   tokens that selected the expert in that window (one per token and top-k slot)

A (window, layer, expert) that is absent counted 0 tokens. Summed over windows it is the [layers, experts]
load matrix DeepSeek's EPLB, vLLM's `--enable-eplb` and SGLang take. `moescope serve`'s vLLM plugin writes one
file per window (`load-000123.parquet`); `moescope import --format trtllm` writes one from TensorRT-LLM's
expert statistics; `moescope analyze LOAD_TABLE` runs the load analysis on it, and `moescope placement
LOAD_TABLE` places it (its windows are the staleness windows).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.trace.manifest import atomic_write_bytes
from moescope.trace.storage import fetch, is_url, location

SCHEMA = pa.schema([
    pa.field("window", pa.int32(), nullable=False),
    pa.field("layer", pa.int16(), nullable=False),
    pa.field("expert", pa.int32(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
])


@dataclass(frozen=True, eq=False)
class LoadTable:
    windows: np.ndarray  # int32 [W], ascending
    tokens: np.ndarray  # int64 [W, L, E]

    @property
    def matrix(self) -> np.ndarray:
        """int64 [L, E]: the load matrix over all windows."""
        return self.tokens.sum(axis=0)


def load_table(windows: np.ndarray, tokens: np.ndarray) -> pa.Table:
    """The table of dense counts tokens [W, L, E] for the window indices windows [W]."""
    W, L, E = tokens.shape
    return pa.table({
        "window": np.repeat(np.asarray(windows, np.int32), L * E),
        "layer": np.tile(np.repeat(np.arange(L, dtype=np.int16), E), W),
        "expert": np.tile(np.arange(E, dtype=np.int32), W * L),
        "tokens": np.asarray(tokens, np.int64).reshape(-1),
    }, schema=SCHEMA)


def write_load_table(path: str | os.PathLike, windows: np.ndarray, tokens: np.ndarray) -> Path:
    """Write tokens [W, L, E] as one Parquet file, atomically (the file is absent or complete)."""
    path = Path(path)
    buffer = io.BytesIO()
    pq.write_table(load_table(windows, tokens), buffer, compression="zstd")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_load_table(path: str | os.PathLike) -> LoadTable:
    """A load table file, or a folder of them (or an object-store URL of either), as dense counts; a malformed table
    is one TraceError."""
    path = fetch(path)  # s3://: a local copy (a table of counts per window: small)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise TraceError(f"{path}: no load table here (a .parquet file or a folder of them)")
    parts = []
    for file in files:
        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowException) as err:
            raise TraceError(f"{file}: not a Parquet load table ({str(err).splitlines()[0]})") from None
        if table.schema.names != SCHEMA.names or any(
                not pa.types.is_integer(table.schema.field(n).type) for n in SCHEMA.names):
            raise TraceError(f"{file}: a load table has integer columns {', '.join(SCHEMA.names)}; "
                             f"found {', '.join(f'{f.name} {f.type}' for f in table.schema)}")
        if table.num_rows and any(table.column(n).null_count for n in SCHEMA.names):
            raise TraceError(f"{file}: a load table has no empty cells")
        parts.append({n: table.column(n).to_numpy().astype(np.int64) for n in SCHEMA.names})
    col = {n: np.concatenate([p[n] for p in parts]) for n in SCHEMA.names}
    if not len(col["window"]):
        raise TraceError(f"{path}: the load table has no rows")
    bad = [n for n in SCHEMA.names if col[n].min() < 0]
    if bad:
        raise TraceError(f"{path}: negative {bad[0]} in the load table")
    windows, w_index = np.unique(col["window"], return_inverse=True)
    L, E = int(col["layer"].max()) + 1, int(col["expert"].max()) + 1
    cell = (w_index * L + col["layer"]) * E + col["expert"]
    if len(np.unique(cell)) != len(cell):
        raise TraceError(f"{path}: a (window, layer, expert) appears more than once in the load table")
    tokens = np.zeros(len(windows) * L * E, np.int64)
    tokens[cell] = col["tokens"]
    return LoadTable(windows.astype(np.int32), tokens.reshape(len(windows), L, E))


def is_load_table(path: str | os.PathLike) -> bool:
    """A .parquet file, or a folder of them without a trace's manifest.json (on a local disk or an object store)."""
    if is_url(path):
        where = location(path)
        if where.size("") is not None:
            return str(path).endswith(".parquet")
        top = [name for name in where.list() if "/" not in name]
        return "manifest.json" not in top and any(name.endswith(".parquet") for name in top)
    path = Path(path)
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and not (path / "manifest.json").exists() and any(path.glob("*.parquet"))
