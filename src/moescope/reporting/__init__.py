"""The report: analysis and quantization results folders -> one self-contained HTML page (+ figure files).

    results.py    read results folders (analysis or quant) without failing on what is missing
    sections/     which figures, tables and notes each analysis gets, one module per analysis (the report as data)
    figures/      pure functions DataFrame -> matplotlib Figure, rendered byte-stably
    html.py       the page: escaped text, inline CSS/JS, figures as data: URIs, no network requests

>>> from moescope.reporting import write_report                                    # doctest: +SKIP
>>> write_report(["results/tiny-moe", "results/quant"], "report.html", figures_dir="figures")
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from moescope.version import __version__
from moescope.errors import MoescopeError
from moescope.reporting.document import Document, FigureBlock, Group
from moescope.reporting.results import (AnalysisResults, ImportanceResults, MissingResults, QuantResults,
                                       SaturationResults, load_results)
from moescope.reporting.sections import UNREADABLE, analysis_group, headline, missing_group, quant_group, saturation_group


class ReportError(MoescopeError):
    """The report cannot be written (no inputs, unwritable output)."""


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, prefixed with their parent where two inputs share a name."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 and p.parent.name else n for p, n in zip(paths, names)]


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "results"


def _memory_label(results) -> str:
    if isinstance(results, QuantResults):
        return "quantization"
    return _stem(str((results.summary.get("trace") or {}).get("model") or "results"))


def _loaded(item) -> AnalysisResults | QuantResults | MissingResults:
    """A results folder, read; or results already in memory (`moescope.analyze(...)`), as they are."""
    return item if isinstance(item, (AnalysisResults, QuantResults, SaturationResults)) else load_results(Path(item))


def build_document(result_dirs: Sequence, *, title: str = "moescope report") -> Document:
    """The report as data (see document.py): one group per results folder (or in-memory results), quantization last."""
    loaded = [_loaded(p) for p in result_dirs]
    paths = [Path(r.path) if r.path is not None else Path(_memory_label(r)) for r in loaded]
    labels = _labels(paths)
    order = sorted(range(len(paths)), key=lambda i: (isinstance(loaded[i], MissingResults),
                                                     isinstance(loaded[i], (QuantResults, ImportanceResults)), i))
    groups = []
    for n, i in enumerate(order, 1):
        results, gid = loaded[i], f"r{n}"
        if isinstance(results, AnalysisResults):
            groups.append(analysis_group(results, gid, labels[i]))
        elif isinstance(results, QuantResults):
            groups.append(quant_group(results, gid, labels[i]))
        elif isinstance(results, ImportanceResults):
            from moescope.reporting.sections.importance import importance_group

            groups.append(importance_group(results, gid, labels[i]))
        elif isinstance(results, SaturationResults):
            groups.append(saturation_group(results, gid, labels[i]))
        else:
            groups.append(missing_group(results, gid, labels[i]))
    from moescope.trace.storage import source_of

    return Document(title, tuple(source_of(p) for p in paths), headline([(labels[i], loaded[i]) for i in order]), tuple(groups), __version__)


def _write_report_to_store(result_dirs, out_html, *, figures_dir, title: str):
    """`write_report` with the page and/or the figures folder on an object store: written into a temporary folder,
    then uploaded (the page in one piece, then each figure); returns the page's URL or path."""
    from moescope.trace.storage import is_url, location

    remote = [where for where in (out_html, figures_dir) if where is not None and is_url(where)]
    for where in remote:  # before any figure is drawn
        if not location(where).bucket_exists():
            raise ReportError(f"{where}: no such bucket (or no access to it); create it or check the storage options")
    with tempfile.TemporaryDirectory(prefix="moescope-report-") as tmp:
        page = Path(tmp) / str(out_html).rstrip("/").rsplit("/", 1)[-1] if is_url(out_html) else Path(out_html)
        figures = Path(tmp) / "figures" if figures_dir is not None and is_url(figures_dir) else figures_dir
        written = write_report(result_dirs, page, figures_dir=figures, title=title)
        if figures_dir is not None and is_url(figures_dir):
            for path in sorted(Path(figures).iterdir()):
                location(figures_dir).upload(path.name, path)
        if is_url(out_html):
            location(out_html).upload("", written)
            return str(out_html)
    return written


def write_report(
    result_dirs: Sequence[str | os.PathLike],
    out_html: str | os.PathLike,
    *,
    figures_dir: str | os.PathLike | None = None,
    title: str = "moescope report",
) -> Path:
    """Write one self-contained HTML report of analysis and quantization results folders.

    Parameters
    ----------
    result_dirs
        Folders written by `moescope analyze` (one section group each) and `moescope quant`. A folder that
        does not exist or is not a results folder gets a short "not available" group instead of an error,
        so a pipeline that skipped a step still gets its report; a table this version cannot read (renamed
        column, damaged file) turns its section or figure into a note and a UserWarning.
    out_html
        The HTML file to write (its folder is created). The page makes no network requests: figures are
        embedded as SVG data URIs, CSS and the table-sorting script are inline.
    figures_dir
        Also write every figure there as ``NN-<folder>__<figure>.svg`` and ``.png`` (for papers).
    title
        The page title.

    Returns
    -------
    Path of the written report. The same inputs give byte-identical output.
    """
    if not result_dirs:
        raise ReportError("no results folders given; pass the --out folders of `moescope analyze` and/or `moescope quant`")
    from moescope.reporting.figures import render_png, render_svg
    from moescope.reporting.html import render_document
    from moescope.trace.storage import download, is_url

    if is_url(out_html) or (figures_dir is not None and is_url(figures_dir)):
        return _write_report_to_store(result_dirs, out_html, figures_dir=figures_dir, title=title)

    result_dirs = [download(d) if is_url(d) else d for d in result_dirs]  # s3:// results folders: read from a copy

    out_html = Path(out_html)
    figures = Path(figures_dir) if figures_dir is not None else None
    if out_html.is_dir():
        raise ReportError(f"--out {out_html} is a folder; give the HTML file to write, e.g. {out_html / 'report.html'}")
    if figures is not None and figures.exists() and not figures.is_dir():
        raise ReportError(f"--figures {figures} is a file; give a folder")
    if not any(isinstance(d, (AnalysisResults, QuantResults)) or _holds_results(Path(d)) for d in result_dirs):
        raise ReportError(f"none of {', '.join(map(str, result_dirs))} holds results of `moescope analyze` or "
                          "`moescope quant` (summary.json); pass their --out folders")
    doc = build_document(result_dirs, title=title)
    for folder in (out_html.parent, figures):
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):  # writable? (before the figures are drawn; root ignores mode bits)
                    pass
            except OSError as err:
                raise ReportError(f"cannot create {folder}: {err.strerror}; choose a writable location") from None
    index = {g.id: n for n, g in enumerate(doc.groups, 1)}
    used: set[str] = set()

    def render(group: Group, block: FigureBlock) -> bytes | str:
        stem = f"{index[group.id]:02d}-{_stem(group.title)}__{block.name}"
        while stem in used:  # a figure name repeated within a group (not expected; kept distinct anyway)
            stem += "_"
        used.add(stem)
        try:
            fig = block.make()
        except UNREADABLE as err:  # a table this version cannot read
            message = f"figure {block.name} could not be drawn: {type(err).__name__}: {err}"
            warnings.warn(message, stacklevel=2)
            return message
        svg = render_svg(fig)
        if figures is not None:
            (figures / f"{stem}.svg").write_bytes(svg)
            fig.set_layout_engine("none")  # laid out for the SVG already: keep those positions, skip the layout pass
            (figures / f"{stem}.png").write_bytes(render_png(fig))
        return svg

    page = render_document(doc, render)
    tmp = out_html.with_name(f".{out_html.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_html)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {out_html}: {err.strerror}; choose a writable --out") from None
    return out_html


def _holds_results(folder: Path) -> bool:
    return (folder / "summary.json").is_file() or (folder / "configs.parquet").is_file() or (folder / "configs.csv").is_file()


__all__ = ["ReportError", "build_document", "load_results", "write_report"]
