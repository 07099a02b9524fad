"""What a notebook cell shows for a Trace, Results, one analysis, a quantization sweep and figures (`_repr_html_`).

Short HTML summaries; every value that comes from a trace or a model (ids, paths, corpus specs, notes) is
escaped, so a model named `<script>` shows as text.
"""

from __future__ import annotations

import base64
from html import escape


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th style='text-align:left'>{escape(str(k))}</th><td style='text-align:left'>{escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def trace_html(trace) -> str:
    manifest = trace.manifest
    layers = trace.layers
    experts = sorted({layer.get("n_experts") for layer in layers})
    ks = sorted({layer.get("top_k") for layer in layers})
    where = str(trace.folder) if trace.folder is not None else "in memory"
    rows = [("model", manifest["model"].get("id")), ("where", where), ("tokens", _number(trace.n_tokens)),
            ("MoE layers", len(layers)), ("experts per layer", ", ".join(map(str, experts))), ("top-k", ", ".join(map(str, ks))),
            ("shards", len(manifest["shards"])), ("complete", trace.complete),
            ("capture", ", ".join(f"{k}={v}" for k, v in (manifest.get("capture") or {}).items())),
            ("router outputs", manifest.get("router_output_kind") or "not recorded")]
    return f"<div><b>moescope Trace</b>{_table(rows)}</div>"


def _headline(summary: dict) -> list[tuple[str, str]]:
    """The scalar entries of an analysis summary (nested dicts and lists left to its tables)."""
    return [(key, _number(value)) for key, value in summary.items() if isinstance(value, (int, float, str, bool)) or value is None]


def results_html(results) -> str:
    trace = results.summary["trace"]
    head = _table([("model", trace.get("model")), ("trace", trace.get("path")), ("tokens", _number(trace.get("tokens"))),
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
    return (f"<div><b>{escape(analysis.name)}</b>{_table(_headline(analysis.summary))}"
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
