"""JSONL and CSV exchange formats.

JSONL rows follow the format routing profilers around vLLM write, one line per token and layer:

    {"problem_id": 0, "layer": 3, "token_id": 17, "expert_ids": [5, 1], "weights": [0.61, 0.39]}

where `problem_id` is the sequence and `token_id` the *position* in it (not the vocabulary id).
Export runs in DuckDB straight from the Parquet parts; import validates every line and writes a
regular trace (token vocabulary ids are unknown there and stored as -1). The rows cannot show experts
that were never chosen, so the expert count is given (`n_experts`, one value for every layer) or
inferred as the largest id seen + 1, which the manifest records per layer (`n_experts_inferred`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moescope.errors import ImportFormatError, MoescopeError, TraceError
from moescope.trace.reader import Trace
from moescope.trace.storage import fetch, is_url, source_of, write_through_local

FORMATS = ("jsonl", "csv")
FLOAT16_MAX = 65504.0  # imported weights are stored as float16: anything larger would become inf


def export_trace(trace: Trace, path: str | os.PathLike, *, fmt: str) -> int:
    """Write the trace's routing to `path` as JSONL or CSV; returns the number of rows written."""
    if fmt not in FORMATS:
        raise MoescopeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if is_url(path):  # s3://: written to a local file, then uploaded in one piece
        return write_through_local(path, lambda local: export_trace(trace, local, fmt=fmt))
    path = Path(path)
    if path.is_dir():
        raise MoescopeError(f"--out {path} is a folder; give a file name")
    if not path.parent.exists():
        raise MoescopeError(f"folder {path.parent} does not exist; create it first")
    if fmt == "jsonl":
        query = ("SELECT r.seq_id AS problem_id, r.layer, r.pos AS token_id, r.topk_ids AS expert_ids, "
                 "r.topk_weights AS weights FROM routing r ORDER BY r.seq_id, r.pos, r.layer")
        options = "FORMAT JSON"
    else:
        query = ("SELECT r.seq_id, r.pos, t.token_id, r.layer, r.topk_ids AS expert_ids, r.topk_weights AS weights "
                 "FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY r.seq_id, r.pos, r.layer")
        options = "FORMAT CSV, HEADER"
    import duckdb

    for shard in trace.manifest["shards"]:  # a damaged part is named here, before DuckDB reads it
        for name in shard["files"]:
            trace._read(shard["files"][name], verify=True, columns=[])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        con = trace.duckdb()
        con.execute(f"COPY ({query}) TO '{tmp}' ({options})")
        rows = int(con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0])
        os.replace(tmp, path)
    except duckdb.Error as err:
        raise TraceError(f"{trace.folder}: export failed ({str(err).splitlines()[0]}); check it with `moescope verify`") from None
    finally:
        tmp.unlink(missing_ok=True)  # nothing is left there after a successful rename
    return rows


def _check_row(row, line_no: int, source: str) -> tuple[int, int, int, list, list]:
    where = f"{source}:{line_no}"
    if not isinstance(row, dict):
        raise ImportFormatError(f"{where}: expected a JSON object per line")
    missing = [k for k in ("problem_id", "layer", "token_id", "expert_ids", "weights") if k not in row]
    if missing:
        raise ImportFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    ints = []
    for key, limit in (("problem_id", 2**31 - 1), ("layer", 2**15 - 1), ("token_id", 2**31 - 1)):
        value = row[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise ImportFormatError(f"{where}: {key} must be an integer in [0, {limit}], got {value!r}")
        ints.append(value)
    ids, weights = row["expert_ids"], row["weights"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**15 for i in ids):
        raise ImportFormatError(f"{where}: expert_ids must be a non-empty list of expert indices in [0, 32767]")
    if not isinstance(weights, list) or len(weights) != len(ids) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and abs(w) <= FLOAT16_MAX for w in weights  # NaN fails too
    ):
        raise ImportFormatError(f"{where}: weights must be a list of finite numbers within ±{FLOAT16_MAX:g} "
                                "(traces store float16), one per expert id")
    if len(set(ids)) != len(ids):
        raise ImportFormatError(f"{where}: expert_ids repeats an expert")
    return ints[0], ints[1], ints[2], ids, weights


def read_jsonl_rows(path: Path):
    """Validated rows as NumPy arrays: seq [R], layer [R], pos [R], ids [R, k], weights [R, k]."""
    name = source_of(path)  # an s3:// input is read from a local copy: messages name the URL
    seqs, layers, positions, all_ids, all_weights = [], [], [], [], []
    top_k = None
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError, or an integer of over 4300 digits
                    raise ImportFormatError(f"{name}:{line_no}: not valid JSON (or a number too long to read)") from None
                seq, layer, pos, ids, weights = _check_row(row, line_no, name)
                if top_k is None:
                    top_k = len(ids)
                elif len(ids) != top_k:
                    raise ImportFormatError(f"{name}:{line_no}: {len(ids)} experts but earlier lines have {top_k}")
                seqs.append(seq), layers.append(layer), positions.append(pos), all_ids.append(ids), all_weights.append(weights)
    except UnicodeDecodeError:
        raise ImportFormatError(f"{name}: not UTF-8 text; JSONL must be UTF-8") from None
    except FileNotFoundError:
        raise ImportFormatError(f"{name}: no such file") from None
    if not seqs:
        raise ImportFormatError(f"{name}: no rows; nothing to import")
    return (np.array(seqs, np.int64), np.array(layers, np.int64), np.array(positions, np.int64),
            np.array(all_ids, np.int16), np.array(all_weights, np.float32))


def import_jsonl(path: str | os.PathLike, out: str | os.PathLike, *, n_experts: int | None = None,
                 overwrite: bool = False, shard_tokens: int = 65536) -> Trace:
    """Write the routing JSONL at `path` as a trace in `out`; `n_experts`: experts per MoE layer (inferred if None).

    Importing the same file with the same options into a complete trace writes nothing and returns it.
    """
    from moescope.trace.formats.dense import Imported, token_block, write_imported

    path = fetch(path)  # s3://: a local copy (the manifest names the URL)
    name = source_of(path)
    if n_experts is not None and not 0 < n_experts <= 2**15:
        raise ImportFormatError(f"--n-experts must be between 1 and {2**15}, not {n_experts}")
    seq, layer, pos, ids, weights = read_jsonl_rows(path)
    layer_values = np.unique(layer)
    n_layers = len(layer_values)
    if not np.array_equal(layer_values, np.arange(n_layers)):
        raise ImportFormatError(f"{name}: layers must be numbered 0..L-1 without gaps; found {layer_values[:10].tolist()}")
    tokens, token_index = np.unique(np.stack([seq, pos], 1), axis=0, return_inverse=True)  # tokens sorted by (seq, pos)
    token_index = token_index.reshape(-1)
    cell = token_index * n_layers + layer
    if len(np.unique(cell)) != len(cell):
        raise ImportFormatError(f"{name}: a (problem_id, token_id, layer) appears more than once")
    if len(cell) != len(tokens) * n_layers:
        raise ImportFormatError(f"{name}: every (problem_id, token_id) needs a line for each of the {n_layers} layers")
    order = np.argsort(layer * len(tokens) + token_index, kind="stable")  # -> (layer, seq, pos)
    k = ids.shape[1]
    T = len(tokens)
    block = token_block(tokens[:, 0], tokens[:, 1], np.full(T, -1), np.zeros(T, bool),
                        ids[order].reshape(n_layers, T, k), weights[order].reshape(n_layers, T, k).astype(np.float16))
    imported = Imported(block, str(path), "jsonl", gate_weights=True)
    return write_imported(imported, out, n_experts=n_experts, overwrite=overwrite, shard_tokens=shard_tokens)
