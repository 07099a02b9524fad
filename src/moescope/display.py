"""What a notebook cell shows for a Trace, Results, one analysis, a quantization sweep and figures (`_repr_html_`).

Short HTML summaries; every value that comes from a trace or a model (ids, paths, corpus specs, notes) is
escaped, so a model named `<script>` shows as text.
"""

from __future__ import annotations

import base64
from html import escape

from moescope.trace.html import html_table, number_text


def _headline(summary: dict) -> list[tuple[str, str]]:
    """The scalar entries of an analysis summary (nested dicts and lists left to its tables)."""
    return [(key, number_text(value)) for key, value in summary.items() if isinstance(value, (int, float, str, bool)) or value is None]


def results_html(results) -> str:
    trace = results.summary["trace"]
    head = html_table([("model", trace.get("model")), ("trace", trace.get("path")), ("tokens", number_text(trace.get("tokens"))),
                   ("MoE layers", trace.get("moe_layers"))])
    parts = []
    for name in results.names:
        stems = ", ".join(results.tables.get(name, {})) or "no tables"
        scalars = _headline(results.summary["analyses"][name])[:6]
        parts.append(f"<li><b>{escape(name)}</b> ({escape(stems)}): "
                     + escape("; ".join(f"{k} {v}" for k, v in scalars)) + "</li>")
    return f"<div><b>moescope Results</b>{head}<ul>{''.join(parts)}</ul></div>"


def analysis_html(analysis) -> str:
    tables = ", ".join(f"{name} [{len(frame)} rows]" for name, frame in analysis.tables.items())
    notes = "".join(f"<li>{escape(n)}</li>" for n in analysis.notes)
    return (f"<div><b>{escape(analysis.name)}</b>{html_table(_headline(analysis.summary))}"
            f"<p>tables: {escape(tables or 'none')}</p>{f'<ul>{notes}</ul>' if notes else ''}</div>")


def quant_html(sweep) -> str:
    answers = [a.get("statement") or "" for a in sweep.summary.get("router_vs_experts") or []]
    n = len(sweep.configs) if sweep.configs is not None else 0
    items = "".join(f"<li>{escape(str(a))}</li>" for a in answers)
    return f"<div><b>moescope quantization sweep</b><p>{n} configurations</p><ul>{items}</ul></div>"


def figures_html(figures) -> str:
    from moescope.reporting.figures import render_png

    images = [base64.b64encode(render_png(fig, dpi=80)).decode() for fig in figures]
    return "".join(f"<img src='data:image/png;base64,{data}'/>" for data in images) or "<p>(no figures)</p>"
