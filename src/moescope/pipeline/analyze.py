"""Analyse a trace into files: one Parquet + CSV table per result table, and summary.json.

    trace ──run_analyses──▶ {name: result} ──▶ out/<name>[__<table>].{parquet,csv} + summary.json

Analyses that need the model (router weight structure; token text for token tables) load the manifest's model
from this machine only (a folder or the Hugging Face cache, never the network); when it is not here they are
skipped with a note and one warning line (`--model PATH` supplies it, and may name a hub id to download).
"""

from __future__ import annotations

import contextlib
import csv as _csv
import functools
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute
import pyarrow.parquet as pq

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import jsonable
from moescope.analysis.result import TABLE_PIECE_ROWS, ChunkedTable
from moescope.analysis.router_structure import analyze_router_weights
from moescope.analysis.runner import ANALYSES, run_analyses
from moescope.errors import ModelLoadError, MoescopeError, NoRouterFoundError
from moescope.pipeline.output import check_output_folder, prepare_output_folder, publish
from moescope.trace.manifest import atomic_write_bytes
from moescope.trace.reader import Trace, open_trace

ROUTER_STRUCTURE = "router_structure"


def analysis_context(trace: Trace, **overrides) -> AnalysisContext:
    """The AnalysisContext of a trace (expert sizes only when the capture knew them)."""
    layers = [{k: v for k, v in layer.items() if not (k == "expert_sizes" and v is None)} for layer in trace.layers]
    manifest = {**trace.manifest, "layers": layers}
    overrides.setdefault("hidden_size", trace.manifest["model"].get("hidden_size"))
    return AnalysisContext.from_manifest(manifest, **overrides)


def model_for(trace: Trace, model: str | None):
    """(model, tokenizer, reason, warning) for what needs the model (router weights, token text).

    `model` given: loaded as asked (a folder, a shipped model, or a hub id, which may be downloaded). Not given:
    the manifest's model is loaded from this machine only (a folder or the Hugging Face cache), never the
    network; when it is not here, model and tokenizer are None, `reason` says why for the notes and `warning`
    is the one line the CLI prints on stderr.
    """
    from moescope.recording.loading import ModelNotHereError, load_model

    name = model or trace.manifest["model"].get("id", "")
    if not name or name.startswith("imported:"):
        return None, None, "no model recorded in the trace (imported from JSONL)", None
    try:
        loaded, tokenizer = load_model(name, device="cpu", local_only=model is None)
    except ModelNotHereError:
        return None, None, f"the trace's model {name!r} is not on this machine; pass --model PATH", (
            f"the trace's model {name} is not on this machine (the network is not tried): skipped router weight "
            "structure and token text; pass --model PATH (a model folder, or a hub id to download) to include them")
    except ModelLoadError as err:
        return None, None, f"model not available ({err}); pass --model", None
    return loaded, tokenizer, None, None


def router_weights(model, trace: Trace) -> dict[int, np.ndarray]:
    """{moe_layer: router weight [E, H]} read from the modules the manifest names."""
    weights = {}
    for layer in trace.layers:
        module = model.get_submodule(layer["module"])
        spec = layer.get("spec") or {}
        router = getattr(module, spec.get("router_attr") or "", None) or module  # custom: the module is the router
        weight = getattr(router, "weight", None)
        if weight is None and hasattr(router, "layer"):  # e.g. DBRX keeps a Linear inside the router
            weight = router.layer.weight
        if weight is None or weight.dim() != 2:
            raise NoRouterFoundError(f"router of MoE layer {layer['moe_layer']} has no [experts, hidden] weight")
        weights[layer["moe_layer"]] = weight.detach().float().cpu().numpy()
    return weights


CSV_MAX_ROWS = 1 << 20  # 1,048,576, a spreadsheet's row limit: larger tables are written as Parquet only
ROW_GROUP_ROWS = TABLE_PIECE_ROWS  # rows per Parquet row group, however the table was held


def result_tables(name: str, result, *, chunked: bool = False) -> dict[str, pd.DataFrame | ChunkedTable]:
    """{file stem: table} of one analysis result, as `analyze` writes them (`<name>` or `<name>__<table>`).

    `chunked`: a result's largest tables as ChunkedTable (built piece by piece when written), where it offers them."""
    tables = result.chunked_tables() if chunked and hasattr(result, "chunked_tables") else result.to_pandas()
    frames = tables if isinstance(tables, dict) else {"": tables}
    return {(f"{name}__{table}" if table else name): frame if isinstance(frame, ChunkedTable) else frame.reset_index(drop=True)
            for table, frame in frames.items() if isinstance(frame, (pd.DataFrame, ChunkedTable))}


def table_rows(table: pd.DataFrame | ChunkedTable) -> int:
    return table.n_rows if isinstance(table, ChunkedTable) else len(table)


def parquet_only_notes(tables: dict[str, pd.DataFrame | ChunkedTable]) -> list[str]:
    """The note for each table too long for a CSV copy (more than CSV_MAX_ROWS rows)."""
    return [f"{stem}: {table_rows(table):,} rows, written as Parquet only (a CSV copy is written for tables of at most "
            f"{CSV_MAX_ROWS:,} rows)" for stem, table in tables.items() if table_rows(table) > CSV_MAX_ROWS]


def write_results(out: Path, tables: dict[str, dict[str, pd.DataFrame | ChunkedTable]], summary: dict) -> None:
    """The results folder: every table as Parquet, and as CSV up to CSV_MAX_ROWS rows; then summary.json (written
    last, atomically). A ChunkedTable is written piece by piece; the files are the same as for its whole DataFrame."""
    for frames in tables.values():
        for stem, frame in frames.items():
            write_table(out, stem, frame)
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    publish(out)  # a staging folder for an s3:// --out is uploaded now (pipeline/output.py)


def write_table(out: Path, stem: str, table: pd.DataFrame | ChunkedTable) -> None:
    """`stem`.parquet in row groups of ROW_GROUP_ROWS, and `stem`.csv when the table has at most CSV_MAX_ROWS rows.
    A DataFrame is converted a row group at a time (no Arrow copy of the whole table beside it); the files are those
    of one conversion."""
    schema = None  # a ChunkedTable's pieces each convert alike; a DataFrame's slices take the whole frame's types
    if isinstance(table, ChunkedTable):
        pieces = table.pieces()
    else:
        schema = pa.Schema.from_pandas(table, preserve_index=False)
        pieces = (table.iloc[lo : lo + ROW_GROUP_ROWS] for lo in range(0, max(len(table), 1), ROW_GROUP_ROWS))
    with_csv = table_rows(table) <= CSV_MAX_ROWS
    writer, pending, written = None, None, 0  # pending: converted rows not yet written, < ROW_GROUP_ROWS
    with open(out / f"{stem}.csv", "w", newline="") if with_csv else contextlib.nullcontext() as csv:
        for n, piece in enumerate(pieces):
            arrow = pa.Table.from_pandas(piece, schema=schema, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(out / f"{stem}.parquet", arrow.schema)
            pending = arrow if pending is None else pa.concat_tables([pending, arrow])
            whole = pending.num_rows - pending.num_rows % ROW_GROUP_ROWS
            if whole:
                writer.write_table(pending.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                pending, written = pending.slice(whole), written + whole
            if csv is not None:
                write_csv(csv, piece, header=n == 0)
        if writer is None:
            raise MoescopeError(f"table {stem} has no pieces")  # a ChunkedTable yields at least one, maybe empty
        if pending.num_rows or not written:
            writer.write_table(pending, row_group_size=ROW_GROUP_ROWS)
        writer.close()


CSV_SLICE_ROWS = 1 << 17  # rows formatted at a time by the fast CSV path (bounds its Python strings)


def write_csv(csv, frame: pd.DataFrame, *, header: bool) -> None:
    """`frame.to_csv(csv, index=False, header=header)`, the same text. A table of integer, float64 and string columns
    (every long table: counts, rates, shares; the token table's formatted combinations) is formatted column by
    column instead, ~2-5x faster: Arrow writes the integers; a float64 is Python's repr, as pandas writes it, and
    NaN is empty; a string is quoted as pandas' csv writer quotes it (`_csv_field`). Other tables go to pandas."""
    if not _columnwise(frame):
        frame.to_csv(csv, index=False, header=header)
        return
    if header:
        csv.write(",".join(map(str, frame.columns)) + "\n")
    for lo in range(0, len(frame), CSV_SLICE_ROWS):
        columns = []
        for name in frame.columns:
            series = frame[name].iloc[lo : lo + CSV_SLICE_ROWS]
            values = series.to_numpy()
            if values.dtype.kind in "iu":
                columns.append(pa_compute.cast(pa.array(values), pa.string()))
            elif values.dtype == np.float64:
                text = pa.array(list(map(repr, values.tolist())), pa.string())
                columns.append(pa_compute.if_else(pa.array(np.isnan(values)), "", text))
            else:
                text = pa.array(series, pa.string(), from_pandas=True)  # an Arrow-backed str column: maybe chunked
                columns.append(_csv_field(text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text))
        lines = pa_compute.binary_join_element_wise(*columns, ",")  # [rows] one CSV line each
        csv.write(pa_compute.binary_join(pa.ListArray.from_arrays([0, len(lines)], lines), "\n")[0].as_py() + "\n")


def _columnwise(frame: pd.DataFrame) -> bool:
    """Whether write_csv can format `frame` column by column: identifier column names; integer, float64 or string
    columns (str, or object holding str and missing values only), strings beside at least one other column (csv
    quotes a row's only field when it is empty)."""
    if not all(str(c).isidentifier() for c in frame.columns):
        return False
    strings = 0
    for name, kind in frame.dtypes.items():
        if isinstance(kind, np.dtype) and (kind.kind in "iu" or kind == np.float64):
            continue
        if not (isinstance(kind, pd.StringDtype) or (kind == object and pd.api.types.infer_dtype(frame[name], skipna=True)
                                                       in ("string", "empty"))):
            return False
        strings += 1
    return not strings or len(frame.columns) > 1


@functools.cache
def _csv_quoted_characters() -> str:
    """A regex class of the characters that make Python's csv writer quote a field, as pandas' to_csv calls it
    (QUOTE_MINIMAL, '"' doubled, line terminator "\n"; a carriage return is quoted by some Python versions only)."""
    def quoted(character: str) -> bool:
        line = io.StringIO()
        _csv.writer(line, lineterminator="\n").writerow(["", f"x{character}y"])
        return '"' in line.getvalue()

    return "[" + "".join(re.escape(c) for c in ',"\n\r' if quoted(c)) + "]"


def _csv_field(text: pa.Array) -> pa.Array:
    """CSV fields of strings as pandas writes them: quoted (inner quotes doubled) where csv would, missing = empty."""
    quoted = pa_compute.binary_join_element_wise('"', pa_compute.replace_substring(text, '"', '""'), '"', "")
    return pa_compute.fill_null(pa_compute.if_else(pa_compute.match_substring_regex(text, _csv_quoted_characters()),
                                                   quoted, text), "")


def check_analyses(only: list[str] | None) -> list[str]:
    names = list(ANALYSES) + [ROUTER_STRUCTURE] if only is None else list(only)
    unknown = [n for n in names if n not in ANALYSES and n != ROUTER_STRUCTURE]
    if unknown:
        raise MoescopeError(f"unknown analyses {', '.join(unknown)}; choose from {', '.join([*ANALYSES, ROUTER_STRUCTURE])}")
    return names


def run_trace_analyses(trace: Trace, names: list[str], *, trace_label: str, loaded=None, tokenizer=None,
                       skipped_reason: str = "not requested (--no-model)", run_pass=None,
                       warnings: tuple[str, ...] = (), chunked: bool = False) -> tuple[dict, dict, dict]:
    """(results {name: result}, summary dict, tables {name: {stem: DataFrame}}): everything `analyze` writes, in memory.

    `warnings`: lines to show the user besides the analyses' own (e.g. that the model is not on this machine).
    `chunked`: the largest tables as ChunkedTable, built when written (what `analyze` writes, in bounded memory)."""
    if not trace.manifest["shards"]:
        raise MoescopeError(f"{trace_label} has no committed shards; nothing to analyse")
    overrides = {}
    if tokenizer is not None:
        overrides["token_text"] = lambda token_id: tokenizer.decode([int(token_id)])
        overrides["vocab_size"] = len(tokenizer)
    ctx = analysis_context(trace, **overrides)
    results = run_analyses(trace.shards, ctx, only=[n for n in names if n in ANALYSES], run_pass=run_pass)
    notes = {name: list(result.notes) for name, result in results.items()}
    if ROUTER_STRUCTURE in names:
        if loaded is None:
            notes[ROUTER_STRUCTURE] = [f"skipped: router weights need the model, {skipped_reason}"]
        else:
            results[ROUTER_STRUCTURE] = analyze_router_weights(router_weights(loaded, trace))
            notes[ROUTER_STRUCTURE] = list(results[ROUTER_STRUCTURE].notes)
    tables = {name: result_tables(name, result, chunked=chunked) for name, result in results.items()}
    for name, frames in tables.items():
        notes[name] += parquet_only_notes(frames)
    summary = {
        "trace": {"path": trace_label, "model": trace.manifest["model"].get("id"), "tokens": trace.n_tokens,
                  "moe_layers": trace.n_layers, "complete": trace.complete, "corpus": trace.manifest.get("corpus")},
        "analyses": {name: jsonable(result.summary()) for name, result in results.items()},
        "tables": {name: list(frames) for name, frames in tables.items()},
        "notes": notes,
        "warnings": list(dict.fromkeys([*warnings, *(w for result in results.values() for w in getattr(result, "warnings", ()))])),
    }
    return results, summary, tables


def analyze_trace(trace_path: str | os.PathLike, out: str | os.PathLike, *, only: list[str] | None = None,
                  model: str | None = None, use_model: bool = True, ray: str | None = None) -> dict:
    """Run the analyses on a trace and write their tables and `summary.json` into `out`; returns the summary
    (what `run_analyze` returns, without the results and tables)."""
    return run_analyze(trace_path, out, only=only, model=model, use_model=use_model, ray=ray)[1]


def run_analyze(trace, out: str | os.PathLike | None = None, *, only: list[str] | None = None, model=None, tokenizer=None,
                use_model: bool = True, ray: str | None = None) -> tuple[dict, dict, dict, dict]:
    """Run the analyses on a trace (a Trace, a folder or a URL) and, with `out`, write their tables and `summary.json`.

    `model`: a loaded module, a name to load as asked, or None for the manifest's model from this machine only;
    `use_model=False`: no model at all. `ray`: a Ray cluster address, "auto" or "local" to accumulate the shards
    on Ray workers. Returns (results {name: result}, summary, tables {name: {stem: DataFrame}}, the trace's
    manifest); the summary is
    {"trace": ..., "analyses": {name: summary}, "notes": {name: [...]}, "warnings": [...]} (each warning once,
    however many analyses raised it; the CLI prints them on stderr).
    """
    label = str(trace) if not isinstance(trace, Trace) else str(trace.folder) if trace.folder is not None else "in memory"
    trace = trace if isinstance(trace, Trace) else open_trace(trace)
    if not trace.manifest["shards"]:
        raise MoescopeError(f"{label} has no committed shards; nothing to analyse")
    names = check_analyses(only)
    if out is not None:
        check_output_folder(out, markers=("summary.json",), what="analysis results", remote=True)  # refused before the work
    run_pass = None
    if ray is not None:  # per-shard accumulation on Ray workers, tree merge: the same results
        from moescope.distributed.analyze import ray_pass

        run_pass = ray_pass(trace.folder.resolve(), None if ray == "local" else ray)  # connects: fails before the work
    loaded = loaded_tokenizer = None
    skipped_reason, warning = "not requested (--no-model)", None
    if _is_module(model):
        loaded, skipped_reason = model, None
    elif use_model:
        loaded, loaded_tokenizer, skipped_reason, warning = model_for(trace, model)
    results, summary, tables = run_trace_analyses(
        trace, names, trace_label=label, loaded=loaded, tokenizer=tokenizer if tokenizer is not None else loaded_tokenizer,
        skipped_reason=skipped_reason or "", run_pass=run_pass, warnings=() if warning is None else (warning,),
        chunked=True)
    if out is not None:
        write_results(prepare_output_folder(out, markers=("summary.json",), what="analysis results", remote=True), tables, summary)
    return results, summary, tables, trace.manifest


def _is_module(model) -> bool:
    """Whether `model` is a loaded torch module; torch is not imported for it (a module passed in means torch is
    imported already): `analyze --no-model` runs without torch, 180 MiB less at its peak."""
    torch_nn = sys.modules.get("torch.nn")
    return torch_nn is not None and isinstance(model, torch_nn.Module)


def analyze_load_table(path: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[dict, dict, dict]:
    """The load analysis of a load table (trace/load_table.py: token counts per window, layer and expert),
    summed over its windows; the same tables and summary.json as `run_analyze` writes for `load`, and the same
    (results, summary, tables)."""
    from moescope.analysis import load
    from moescope.trace.load_table import read_load_table

    table = read_load_table(path)
    if out is not None:
        check_output_folder(out, markers=("summary.json",), what="analysis results", remote=True)
    counts = table.matrix  # [L, E]
    L, E = counts.shape
    ctx = AnalysisContext(n_experts=E, top_k=1, n_layers=L)  # slots are counted; tokens and k are unknown
    result = load.finalize(load.LoadState(tuple(range(L)), counts, np.zeros(L, np.int64), 0, np.zeros(L, np.int64)), ctx)
    tables = result_tables("load", result)
    note = f"a load table of {len(table.windows)} windows: slot counts per expert; tokens and top-k are not known"
    summary = {
        "trace": {"path": str(path), "model": "load table", "tokens": None, "moe_layers": L, "windows": len(table.windows)},
        "analyses": {"load": {**jsonable(result.summary()), "n_tokens": None, "top_k": None}},
        "tables": {"load": list(tables)},
        "notes": {"load": [note]},
    }
    if out is not None:
        write_results(prepare_output_folder(out, markers=("summary.json",), what="analysis results", remote=True), {"load": tables}, summary)
    return {"load": result}, summary, {"load": tables}
