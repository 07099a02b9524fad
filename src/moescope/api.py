"""The Python API: every command of the CLI as a function, and what notebooks and scripts call.

    trace = capture(model, data, out=..., options=CaptureOptions(...))   # moescope capture
    with record(model) as rec: model.generate(...)                        # inside your own code
    results = analyze(trace)                                              # moescope analyze (out=: write the folder)
    report(results, "report.html")                                        # moescope report
    placement(trace, out=..., gpus=8), offload(trace, out=...), compare(a, b, out=...), quant_sweep(...),
    importance(...), saturation(...), replay_check(...), verify(...), export(...), import_trace(...), sql(...),
    inspect(model), top(url), demo(out)

`moescope.NAME` is `moescope.api.NAME`. The CLI (cli/) parses arguments, calls one function here and prints what it
returns; the work is done below, in pipeline/ and the parts it is made of. Importing this module is light: each
function imports what it runs.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from moescope.recording.options import CaptureOptions
    from moescope.results import QuantSweep, Results
    from moescope.trace.reader import Trace
    from moescope.trace.verify import VerifyReport

_REEXPORTED = {  # defined where they belong, named here so there is one place to look
    "record": "moescope.recording.session",
    "open_trace": "moescope.trace.reader",
    "Trace": "moescope.trace.reader",
    "CaptureOptions": "moescope.recording.options",
    "CaptureOptionsError": "moescope.recording.options",
    "CustomRouter": "moescope.adapters.discover",
    "RouterOutput": "moescope.adapters.spec",
    "Results": "moescope.results",
    "QuantSweep": "moescope.results",
    "RoutingMonitor": "moescope.monitor",
    "intervene": "moescope.intervention",
    "print_summary": "moescope.pipeline.summary",
    "print_warnings": "moescope.pipeline.summary",
}

__all__ = ["capture", "analyze", "report", "quant_sweep", "compare", "placement", "offload", "importance", "saturation",
           "replay_check", "verify", "export", "import_trace", "sql", "inspect", "top", "demo", *_REEXPORTED]


def __getattr__(name):
    if name in _REEXPORTED:
        return getattr(importlib.import_module(_REEXPORTED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_REEXPORTED])


def capture(
    model: str | nn.Module,
    data=None,
    *,
    out: str | os.PathLike,
    options: CaptureOptions | None = None,
    tokenizer=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
    **deprecated,
) -> Trace:
    """Record, for every token and MoE layer, the experts the model chose and their gate weights.

    Parameters
    ----------
    model : a Hugging Face id, a local folder, ``moescope:NAME``, or an already-loaded ``nn.Module``.
    data : a corpus spec (``"humaneval,wiki"``, a file, a folder, ``file.jsonl:field``, ``hf:...``), a list
        of strings, or a list of ``moescope.corpora.Document``. Not needed with ``input_ids``.
    out : the trace folder, or an object-store URL (s3://bucket/prefix). An unfinished capture with the same
        settings is resumed; a finished one is returned as it is.
    options : a ``CaptureOptions`` (sequence length, what to record beside ids and weights, backend, Ray, ...);
        default ``CaptureOptions()``. The keyword arguments of earlier releases (``seq_len=``, ``max_tokens=``,
        ``save_router_output=``, ...) still work for this release, with a DeprecationWarning.
    tokenizer : the tokenizer of an already-loaded model (a model given by name brings its own).
    input_ids, attention_mask : pre-tokenised input [B, T]; sequence i is row i and positions are the
        row's real-token positions. A left-padded batch (padding before each row's tokens) is fed to the
        model left-padded, as your own forward pass would be; otherwise rows are right-padded.
    overwrite : replace a trace already in ``out``.
    progress : show a progress bar.
    storage_options : for an object-store ``out``, the settings ``--storage-option`` takes (``endpoint_url``,
        ``profile``, ``access_key``, ...), instead of the process's defaults.

    Returns
    -------
    Trace : the trace just written (``trace.sql(...)``, ``trace.shards()``).

    Examples
    --------
    >>> options = moescope.CaptureOptions(max_tokens=2048, save_logits=True)
    >>> trace = moescope.capture("moescope:tiny-moe", "humaneval", out="traces/run1", options=options)  # doctest: +SKIP
    """
    from moescope.pipeline.capture import capture_trace
    from moescope.recording.options import options_from_keywords
    from moescope.trace.storage import with_options

    options = options_from_keywords(options, deprecated, where="moescope.capture")
    out = with_options(out, storage_options)  # s3:// with its own settings: a storage.Location
    return capture_trace(model, data, out=out, options=options, tokenizer=tokenizer, input_ids=input_ids,
                         attention_mask=attention_mask, overwrite=overwrite, progress=progress)


def analyze(trace, only=None, model=None, *, tokenizer=None, out: str | os.PathLike | None = None, use_model: bool = True,
            ray: str | None = None, storage_options: dict | None = None) -> Results:
    """Run the analyses on a trace and return their tables as DataFrames; with `out`, also write them there.

    Parameters
    ----------
    trace : a ``Trace`` (``moescope.capture``, ``moescope.open_trace``, ``rec.trace`` of ``moescope.record``),
        a trace folder or URL, or a load table (``.parquet`` of expert counts: the load analysis only).
    only : analysis names (default: all, as ``moescope analyze``).
    model : a loaded model, or a name to load, for what needs it (router weight structure); by default the
        trace's model is loaded from this machine when it is there (never the network), else those analyses
        are skipped with a note.
    tokenizer : the model's tokenizer, for token text in the token tables (loaded with a model given by name).
    out : a results folder (or s3:// prefix) to write the tables and ``summary.json`` into, as ``moescope analyze``
        does; refused before any work if it holds something else.
    use_model : False: load no model at all (``--no-model``).
    ray : a Ray cluster address, ``"auto"`` or ``"local"``: accumulate the shards on Ray workers (same results).
    storage_options : for a trace or `out` given as an object-store URL, the settings ``--storage-option`` takes.

    Examples
    --------
    >>> results = moescope.analyze(rec.trace, model=model, tokenizer=tokenizer)     # doctest: +SKIP
    >>> results.load.per_layer                                                       # doctest: +SKIP
    """
    from moescope.errors import MoescopeError
    from moescope.pipeline.analyze import analyze_load_table, run_analyze
    from moescope.results import Results
    from moescope.trace.load_table import is_load_table
    from moescope.trace.reader import Trace
    from moescope.trace.storage import urls_with_options

    trace, out = urls_with_options((trace, out), storage_options)
    if not isinstance(trace, Trace) and is_load_table(trace):  # expert counts only: the load analysis
        if (only is not None and list(only) != ["load"]) or ray or model is not None:
            raise MoescopeError(f"{trace} is a load table: only the load analysis runs on it (no --only, --model, --ray)")
        results, summary, tables = analyze_load_table(trace, out)
        return Results(results, summary, tables, {})
    results, summary, tables, manifest = run_analyze(trace, out, only=list(only) if only is not None else None,
                                                     model=model, tokenizer=tokenizer, use_model=use_model, ray=ray)
    return Results(results, summary, tables, manifest)


def report(results, path: str | os.PathLike, *, figures: str | os.PathLike | None = None,
           title: str = "moescope report") -> os.PathLike:
    """Write one self-contained HTML report (``moescope report``) of in-memory results (``analyze``,
    ``quant_sweep``) and/or results folders. `results`: one of them or a list. Returns the report's path."""
    from moescope.reporting import write_report
    from moescope.results import QuantSweep, Results

    items = results if isinstance(results, (list, tuple)) else [results]
    inputs = [r.for_report() if isinstance(r, (Results, QuantSweep)) else r for r in items]
    return write_report(inputs, path, figures_dir=figures, title=title)


def quant_sweep(model, data, *, tokenizer=None, out: str | os.PathLike | None = None, dense_model=None,
                **options) -> QuantSweep:
    """A quantization sensitivity sweep (``moescope quant``), returned in memory.

    `model`: a loaded model (with `tokenizer`; `dense_model` a loaded dense control) or a name, loaded in float32
    on `device` (`dense_model` a name too). `options` are those of ``moescope.quant.run_quant_sweep`` (bits, targets,
    schemes, granularity, per_layer, max_tokens, seq_len, batch_size, split, device, overwrite, progress, ...). With
    `out` the sweep is written (and resumed) there as the CLI does; without it, it runs in a temporary folder
    that is removed afterwards.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from moescope.errors import MoescopeError
    from moescope.pipeline.quant import quant_from_names, quant_of_model
    from moescope.reporting import results as report_results
    from moescope.results import QuantSweep
    from moescope.trace.storage import download

    options.setdefault("progress", False)
    folder = out if out is not None else Path(tempfile.mkdtemp(prefix="moescope-quant-"))  # out: a folder or s3:// prefix
    try:
        if isinstance(model, str):
            quant_from_names(model, data, out=folder, dense_model=dense_model, **options)
        else:
            quant_of_model(model, tokenizer, data, out=folder, dense_model=dense_model, **options)
        written = download(folder)  # an s3:// prefix: read back from a local copy
        loaded = report_results.load_results(written)
        files = {p.name: p.read_bytes() for p in sorted(written.iterdir()) if p.is_file() and not p.name.startswith(".")}
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
    if not isinstance(loaded, report_results.QuantResults):
        raise MoescopeError(f"the quantization sweep wrote no results ({getattr(loaded, 'reason', '')})")
    return QuantSweep(loaded.summary, loaded.sweep, loaded.configs, loaded.per_layer, files)


def compare(a, b, *, out: str | os.PathLike) -> dict:
    """Compare two traces (``moescope compare``): load distributions, and per-token agreement on the tokens both
    hold; writes side-by-side tables into `out` and returns the summary."""
    from moescope.pipeline.compare import compare_traces

    return compare_traces(a, b, out)


def placement(trace, *, out: str | os.PathLike, gpus: int, nodes: int = 1, redundant: int | None = None,
              groups: int | None = None, window: int | None = None, decode_batch: int | None = None) -> dict:
    """Place experts over GPUs (``moescope placement``): EPLB and the alternatives, balancedness, the files
    engines load; written into `out`, the summary returned. The arguments are the command's flags."""
    from moescope.pipeline.placement import run_placement

    return run_placement(trace, out, gpus=gpus, nodes=nodes, redundant=redundant, groups=groups, window=window,
                         decode_batch=decode_batch)


def offload(trace, *, out: str | os.PathLike, **options) -> dict:
    """Simulate an expert cache and prefetchers over a trace (``moescope offload``); written into `out`, the
    summary returned. `options`: the command's flags as keywords (capacities, policies, prefetch, scope,
    window, phases, link, bandwidth_gbps, latency_us, expert_bytes_each, dtype, lossy, model, data,
    max_tokens, seq_len, device)."""
    from moescope.pipeline.offload import run_offload

    return run_offload(trace, out, **options)


def importance(model: str, data, *, out: str | os.PathLike, layers: str | None = None, **options) -> dict:
    """Which experts matter when removed (``moescope importance``): `model` loaded by name in float32; `layers`
    like ``"0,2"``; `options`: split, max_tokens, seq_len, batch_size, prune, device, overwrite, progress.
    Written into `out`; the summary returned."""
    from moescope.pipeline.importance import importance_from_name

    return importance_from_name(model, data, out=out, layers=layers, **options)


def saturation(checkpoints: list[str], final: str, data, *, out: str | os.PathLike, **options) -> dict:
    """Routing of training checkpoints against the final model on the same tokens (``moescope saturation``);
    `options`: max_tokens, seq_len, batch_size, split, device. Written into `out`; the summary returned."""
    from moescope.pipeline.saturation import saturation_run

    return saturation_run(checkpoints, final, data, out, **options)


def replay_check(trace, model: str, *, out: str | os.PathLike | None = None, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False) -> dict:
    """Recompute a trace's routing with `model` on its own tokens and compare (``moescope replay-check``);
    returns {"table": per-layer DataFrame, "text": it as printed, "flagged": rows, "summary": ...}; with `out`,
    the tables and flagged rows are written there."""
    from moescope.pipeline.replay_check import replay_check as run

    return run(trace, model, dtype=dtype, device=device, out=out, trust_remote_code=trust_remote_code)


def verify(trace) -> VerifyReport:
    """Check a trace's shards against its manifest (``moescope verify``): `.ok`, `.lines()`."""
    from moescope.trace.verify import verify_trace

    return verify_trace(trace)


def export(trace, out: str | os.PathLike, *, format: str = "jsonl", overwrite: bool = False) -> int:
    """Write a trace as JSONL, CSV or the RL routing-replay layout (``moescope export``); returns the rows
    (sequences for ``replay``) written. An existing `out` is refused unless `overwrite`."""
    from moescope.errors import MoescopeError
    from moescope.trace.reader import Trace, open_trace
    from moescope.trace.storage import exists

    if exists(out) and not overwrite:  # a file, or an object on a store
        raise MoescopeError(f"{out} exists; pass --overwrite or choose another --out")
    trace = trace if isinstance(trace, Trace) else open_trace(trace)
    if format == "replay":
        from moescope.trace.formats.replay import export_replay

        return export_replay(trace, out)
    from moescope.trace.exchange import export_trace

    return export_trace(trace, out, fmt=format)


def import_trace(path: str | os.PathLike, out: str | os.PathLike, *, format: str = "jsonl", n_experts: int | None = None,
                 overwrite: bool = False, slot_map: str | None = None, moe_layers: list[int] | None = None) -> str:
    """Turn routing JSONL, or an engine's own routing files (`format`: vllm, sglang, trtllm, olmoe), into a trace
    (or a load table, for trtllm counts) at `out` (``moescope import``); returns what was written, in one line."""
    if format != "jsonl" or slot_map is not None or moe_layers is not None:
        from moescope.trace.formats import import_foreign

        return import_foreign(format, path, out, n_experts=n_experts, overwrite=overwrite, slot_map=slot_map,
                              moe_layers=moe_layers)
    from moescope.trace.exchange import import_jsonl

    trace = import_jsonl(path, out, n_experts=n_experts, overwrite=overwrite)
    return f"wrote {trace.folder}: {trace.n_tokens} tokens x {trace.n_layers} layers"


def sql(trace, query: str) -> pd.DataFrame:
    """Run a DuckDB query over a trace's views (``moescope sql``: ``routing``, ``tokens``, ...); a failing query
    is one ``MoescopeError`` line."""
    import duckdb

    from moescope.errors import MoescopeError
    from moescope.trace.reader import Trace, open_trace

    trace = trace if isinstance(trace, Trace) else open_trace(trace)
    try:
        return trace.sql(query)
    except duckdb.Error as err:
        raise MoescopeError(f"query failed: {str(err).splitlines()[0]}") from None


def inspect(model: str, *, router=None, trust_remote_code: bool = False) -> dict:
    """What moescope finds in a model (``moescope inspect``): family, MoE layers, experts, top-k, scoring."""
    from moescope.adapters.describe import describe_model
    from moescope.recording.loading import default_router, load_model

    loaded, _ = load_model(model, device="cpu", trust_remote_code=trust_remote_code)
    return describe_model(loaded, router or default_router(model))


def top(url: str, *, interval: float = 2.0, once: bool = False) -> int:
    """A terminal view of a vLLM server's live expert load (``moescope top``); returns the exit code."""
    from moescope.serve.top import run_top

    return run_top(url, interval=interval, once=once)


def demo(out: str | os.PathLike, *, max_tokens: int = 24000, quant_tokens: int = 4096,
         steps: tuple[str, ...] = ("capture", "analyze", "quant", "report"), progress: bool = True) -> dict:
    """The demo (``moescope demo``): three shipped models captured, analysed, quantized and reported in `out`."""
    from moescope.errors import MoescopeError
    from moescope.pipeline.demo import run_demo

    unknown = set(steps) - {"capture", "analyze", "quant", "report"}
    if unknown:
        raise MoescopeError(f"unknown demo steps {sorted(unknown)}; choose from capture, analyze, quant, report")
    return run_demo(out, max_tokens=max_tokens, quant_tokens=quant_tokens, steps=tuple(steps), progress=progress)
