"""What a notebook cell shows for a Trace (`Trace._repr_html_`), and the escaped table it is drawn with.

Every value that comes from a trace (ids, paths, corpus specs) is escaped, so a model named `<script>` shows as text.
"""

from __future__ import annotations

from html import escape


def html_table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th style='text-align:left'>{escape(str(k))}</th><td style='text-align:left'>{escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def number_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def trace_html(trace) -> str:
    manifest = trace.manifest
    layers = trace.layers
    experts = sorted({layer.get("n_experts") for layer in layers})
    ks = sorted({layer.get("top_k") for layer in layers})
    where = str(trace.folder) if trace.folder is not None else "in memory"
    rows = [("model", manifest["model"].get("id")), ("where", where), ("tokens", number_text(trace.n_tokens)),
            ("MoE layers", len(layers)), ("experts per layer", ", ".join(map(str, experts))), ("top-k", ", ".join(map(str, ks))),
            ("shards", len(manifest["shards"])), ("complete", trace.complete),
            ("capture", ", ".join(f"{k}={v}" for k, v in (manifest.get("capture") or {}).items())),
            ("router outputs", manifest.get("router_output_kind") or "not recorded")]
    return f"<div><b>moescope Trace</b>{html_table(rows)}</div>"
