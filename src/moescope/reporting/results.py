"""Results folders as the report reads them: what ran, its tables, its notes, and the trace it came from.

Three kinds of folder, told apart by their files:

    analysis    summary.json with "analyses" + <analysis>__<table>.parquet (written by `moescope analyze`)
    quant       summary.json with "router_vs_experts" and/or configs.parquet (written by `moescope quant`)
    saturation  summary.json with "saturation" + saturation__per_layer.parquet (`moescope saturation`)

Anything else (a missing folder, an unreadable summary) becomes `MissingResults`, which the report shows as
a plain sentence instead of failing, so a demo that skipped a step still gets its report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moescope.errors import MoescopeError
from moescope.trace.manifest import read_manifest
from moescope.trace.storage import is_url

# The order sections appear in, and the table stems each analysis writes (`moescope analyze`).
ANALYSIS_ORDER = (
    "load",
    "aux_losses",
    "router_structure",
    "router_confidence",
    "coactivation",
    "cross_layer",
    "expert_cache",
    "temporal_locality",
    "domain_specialisation",
    "token_specialisation",
    "token_cost",
    "placement",
    "offload",  # written by `moescope offload` (and `moescope placement` writes placement's tables)
)


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path.name} not found"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(data, dict):
        return None, f"{path.name} does not hold a JSON object"
    return data, None


def _read_table(folder: Path, stem: str, where: dict[str, tuple] | None = None) -> pd.DataFrame | None:
    """The table `stem` of a results folder (Parquet, else CSV), or None when neither file exists.

    `where` {column: allowed values} keeps only matching rows; from Parquet only those rows are read
    (transition and per-token tables of a 60-layer, 256-expert model run to millions of rows).
    """
    parquet, csv = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    if parquet.exists():
        filters = [(column, "in", list(values)) for column, values in (where or {}).items()] or None
        return pd.read_parquet(parquet, filters=filters)
    if csv.exists():
        frame = pd.read_csv(csv)
        for column, values in (where or {}).items():
            frame = frame[frame[column].isin(values)].reset_index(drop=True)
        return frame
    return None


def _filtered(frame: pd.DataFrame | None, where: dict[str, tuple] | None) -> pd.DataFrame | None:
    for column, values in (where or {}).items():
        frame = frame[frame[column].isin(values)].reset_index(drop=True) if frame is not None else None
    return frame


@dataclass(frozen=True, eq=False)
class AnalysisResults:
    """One `moescope analyze` output folder (or, with `frames`, the same results held in memory)."""

    path: Path | None
    summary: dict
    manifest: dict | None  # the trace's manifest.json when it can still be read
    manifest_note: str | None  # why the manifest is absent
    _tables: dict = field(default_factory=dict, repr=False)
    frames: dict[str, pd.DataFrame] | None = field(default=None, repr=False)  # {file stem: table}: no folder

    @property
    def trace(self) -> dict:
        return self.summary.get("trace") or {}

    def ran(self, analysis: str) -> bool:
        return analysis in (self.summary.get("analyses") or {})

    def headline(self, analysis: str) -> dict:
        return (self.summary.get("analyses") or {}).get(analysis) or {}

    def notes(self, analysis: str) -> list[str]:
        notes = (self.summary.get("notes") or {}).get(analysis) or []
        return [str(n) for n in notes]

    def table(self, analysis: str, name: str | None = None, *, where: dict[str, tuple] | None = None) -> pd.DataFrame | None:
        """The table `<analysis>__<name>` (or `<analysis>` for single-table analyses); None when absent.

        `where` {column: allowed values} reads only the matching rows.
        """
        stem = f"{analysis}__{name}" if name else analysis
        key = (stem, tuple(sorted((c, tuple(v)) for c, v in (where or {}).items())))
        if key not in self._tables:
            self._tables[key] = _read_table(self.path, stem, where) if self.frames is None else _filtered(self.frames.get(stem), where)
        return self._tables[key]

    def get(self, analysis: str, *keys: str, default: Any = None) -> Any:
        """A nested value of an analysis's headline dict, or `default`."""
        value: Any = self.headline(analysis)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return default if value is None else value

    @property
    def layers_info(self) -> list[dict]:
        return list((self.manifest or {}).get("layers") or [])

    def expert_sizes(self) -> dict[int, list[int]] | None:
        """{moe_layer: [intermediate size of each expert]} from the trace manifest, when it recorded them."""
        sizes = {}
        for layer in self.layers_info:
            if layer.get("expert_sizes"):
                sizes[int(layer["moe_layer"])] = [int(s) for s in layer["expert_sizes"]]
        return sizes or None


@dataclass(frozen=True, eq=False)
class QuantResults:
    """One `moescope quant` output folder."""

    path: Path | None
    summary: dict
    sweep: dict  # sweep.json (options, models); {} when absent
    configs: pd.DataFrame | None
    per_layer: pd.DataFrame | None


@dataclass(frozen=True, eq=False)
class ImportanceResults:
    """One `moescope importance` output folder: its summary and tables (None where missing)."""

    path: Path
    summary: dict
    tables: dict  # experts, correlations, pruning, specialisation -> DataFrame or None


@dataclass(frozen=True, eq=False)
class SaturationResults:
    """One `moescope saturation` output folder."""

    path: Path | None
    summary: dict
    per_layer: pd.DataFrame | None


@dataclass(frozen=True)
class MissingResults:
    path: Path
    reason: str


Results = AnalysisResults | QuantResults | ImportanceResults | SaturationResults | MissingResults


def _trace_manifest(summary: dict, folder: Path) -> tuple[dict | None, str | None]:
    trace_path = (summary.get("trace") or {}).get("path")
    if not trace_path:
        return None, "the summary names no trace"
    if is_url(trace_path):  # a trace on an object store
        try:
            return read_manifest(trace_path), None
        except MoescopeError:
            return None, f"trace manifest not found at {trace_path} (header shows what summary.json records)"
    candidates = [Path(trace_path)]
    if not Path(trace_path).is_absolute():  # analyze was run from another folder: try next to the results
        candidates.append(folder.parent / trace_path)
    for candidate in candidates:
        manifest, _ = _read_json(candidate / "manifest.json")
        if manifest is not None:
            return manifest, None
    return None, f"trace manifest not found at {trace_path} (header shows what summary.json records)"


def load_results(path: str | os.PathLike) -> Results:
    """Read a results folder (analysis or quantization) without failing on what is missing."""
    folder = Path(path)
    if not folder.is_dir():
        return MissingResults(folder, "folder not found: the step that writes it was not run, or the path is wrong")
    summary, problem = _read_json(folder / "summary.json")
    has_configs = (folder / "configs.parquet").exists() or (folder / "configs.csv").exists()
    if summary is None and not has_configs:
        return MissingResults(folder, f"not a moescope results folder: {problem}")
    summary = summary or {}
    if "analyses" in summary:
        manifest, note = _trace_manifest(summary, folder)
        return AnalysisResults(folder, summary, manifest, note)
    if "importance" in summary:
        tables = {name: _read_table(folder, name) for name in ("experts", "correlations", "pruning", "specialisation")}
        return ImportanceResults(folder, summary, tables)
    if "saturation" in summary:
        return SaturationResults(folder, summary, _read_table(folder, "saturation__per_layer"))
    if "router_vs_experts" in summary or has_configs:
        sweep, _ = _read_json(folder / "sweep.json")
        return QuantResults(folder, summary, sweep or {}, _read_table(folder, "configs"), _read_table(folder, "per_layer"))
    return MissingResults(folder, "summary.json is neither an analysis summary nor a quantization summary")
