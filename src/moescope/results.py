"""Results in memory: what `moescope.analyze` and `moescope.quant_sweep` return (api.py).

    results = moescope.analyze(trace)        # Results: the tables `moescope analyze` writes, as DataFrames
    results.load.per_expert                  # = load__per_expert.parquet of the CLI
    results.summary                          # = its summary.json
    results.load.plot()                      # the report's figures of the load section (matplotlib Figures)
    results.save("results/run1")             # writes exactly what `moescope analyze` writes

Tables, summary and files come from the same functions the CLI uses (pipeline/analyze.py), and figures from
the report's own sections (reporting/sections/), so a notebook and the CLI cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from moescope.analysis.result import ChunkedTable
from moescope.display import analysis_html, figures_html, quant_html, results_html
from moescope.errors import MoescopeError
from moescope.reporting import results as report_results
from moescope.reporting.sections import SECTION_OF_ANALYSIS
from moescope.reporting.sections.common import shape_of
from moescope.reporting.sections.quant import quant_quality_section, quant_routing_section
from moescope.reporting.document import FigureBlock

SECTIONS = SECTION_OF_ANALYSIS  # the report section of each analysis


class Figures(list):
    """A list of matplotlib Figures that a notebook cell shows as images."""

    def _repr_html_(self) -> str:
        return figures_html(self)


def _figures(blocks) -> Figures:
    return Figures(block.make() for block in blocks if isinstance(block, FigureBlock))


class Analysis:
    """One analysis of `Results`: its tables as attributes (`results.load.per_expert`), summary, notes, figures."""

    def __init__(self, owner: "Results", name: str):
        self._owner, self.name = owner, name
        stems = owner.tables.get(name, {})
        self.tables = {stem.split("__", 1)[1] if "__" in stem else name: frame for stem, frame in stems.items()}
        self.summary = (owner.summary["analyses"] or {}).get(name, {})
        self.notes = list((owner.summary["notes"] or {}).get(name, []))

    def __getattr__(self, table: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if table in tables:
            if isinstance(tables[table], ChunkedTable):  # a large table, built on first use (the files never need it whole)
                tables[table] = tables[table].to_pandas()
            return tables[table]
        raise AttributeError(f"{self.__dict__.get('name')} has no table {table!r}; it has {', '.join(tables) or 'none'}")

    def __dir__(self):
        return sorted([*super().__dir__(), *self.tables])

    def plot(self) -> Figures:
        """The report's figures for this analysis (an empty list where the report draws none)."""
        return self._owner.plot(self.name)

    def _repr_html_(self) -> str:
        return analysis_html(self)


class Results:
    """What `moescope.analyze(...)` returns: every table `moescope analyze` writes, as pandas DataFrames."""

    def __init__(self, results: dict, summary: dict, tables: dict[str, dict[str, pd.DataFrame | ChunkedTable]], manifest: dict):
        self.results = results  # {name: the analysis's result object}
        self.summary = summary  # what summary.json holds
        self.tables = tables  # {analysis: {file stem: DataFrame, or ChunkedTable for the largest (built on first use)}}
        self.manifest = manifest  # the trace's

    @property
    def names(self) -> list[str]:
        return list(self.summary["analyses"])

    def __getattr__(self, name: str) -> Analysis:
        if name in SECTIONS and name in self.__dict__.get("summary", {}).get("analyses", {}):
            return Analysis(self, name)
        if name in SECTIONS:
            raise AttributeError(f"{name} was not run; run moescope.analyze(trace, only=[..., {name!r}])")
        raise AttributeError(name)

    def __getitem__(self, name: str) -> Analysis:
        try:
            return getattr(self, name)
        except AttributeError as err:
            raise KeyError(str(err)) from None

    def __dir__(self):
        return sorted([*super().__dir__(), *self.names])

    def for_report(self) -> report_results.AnalysisResults:
        """These results as the report reads a results folder (tables from memory)."""
        frames = {stem: frame.to_pandas() if isinstance(frame, ChunkedTable) else frame
                  for stems in self.tables.values() for stem, frame in stems.items()}
        return report_results.AnalysisResults(None, self.summary, self.manifest, None, frames=frames)

    def plot(self, name: str) -> Figures:
        """The report's figures of analysis `name` (e.g. "load"), as matplotlib Figures."""
        if name not in SECTIONS:
            raise MoescopeError(f"unknown analysis {name!r}; choose from {', '.join(SECTIONS)}")
        r = self.for_report()
        section = SECTIONS[name](r, name, shape_of(r))
        return _figures(section.blocks)

    def save(self, folder: str | os.PathLike, *, storage_options: dict | None = None):
        """Write the tables and summary.json into `folder` (or an s3:// prefix; `storage_options`: its settings, as
        `--storage-option` gives them), byte for byte what `moescope analyze` writes; returns where they are."""
        from moescope.pipeline.analyze import write_results
        from moescope.pipeline.output import check_output_folder, prepare_output_folder
        from moescope.trace.storage import is_url, with_options

        target = with_options(folder, storage_options)
        check_output_folder(target, markers=("summary.json",), what="analysis results", remote=True)
        out = prepare_output_folder(target, markers=("summary.json",), what="analysis results", remote=True)
        write_results(out, self.tables, self.summary)  # publishes a staging folder to the URL
        return folder if is_url(folder) else out

    def _repr_html_(self) -> str:
        return results_html(self)

    def __repr__(self) -> str:
        trace = self.summary["trace"]
        return f"Results(model={trace.get('model')!r}, tokens={trace.get('tokens')}, analyses={self.names})"


class QuantSweep:
    """What `moescope.quant_sweep(...)` returns: the sweep's tables as DataFrames, its summary and figures."""

    def __init__(self, summary: dict, sweep: dict, configs: pd.DataFrame | None, per_layer: pd.DataFrame | None, files: dict):
        self.summary, self.sweep, self.configs, self.per_layer = summary, sweep, configs, per_layer
        self._files = files  # {file name: bytes}: what the sweep wrote, for save()

    def for_report(self) -> report_results.QuantResults:
        return report_results.QuantResults(None, self.summary, self.sweep, self.configs, self.per_layer)

    def plot(self) -> Figures:
        """The report's quantization figures (quality against bits, routing flips)."""
        q = self.for_report()
        blocks = [b for build in (quant_quality_section, quant_routing_section)
                  for b in build(q, "quant").blocks] if self.configs is not None and len(self.configs) else []
        return _figures(blocks)

    def save(self, folder: str | os.PathLike, *, storage_options: dict | None = None) -> Path:
        """Write what `moescope quant` writes into a new folder (or an s3:// prefix; `storage_options`: its settings)."""
        from moescope.pipeline.output import check_output_folder, prepare_output_folder, publish
        from moescope.trace.storage import is_url, with_options

        target = with_options(folder, storage_options)
        check_output_folder(target, markers=("summary.json",), what="quantization results", remote=True)
        out = prepare_output_folder(target, markers=("summary.json",), what="quantization results", remote=True)
        for name, data in self._files.items():
            (out / name).write_bytes(data)
        publish(out)  # a staging folder for an s3:// prefix is uploaded now, summary.json last
        return folder if is_url(folder) else out

    def _repr_html_(self) -> str:
        return quant_html(self)
