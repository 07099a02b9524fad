"""The report's HTML: one self-contained page (inline CSS, a few lines of inline JS, figures as data URIs).

Every text that comes from results, models or users goes through `esc` (html.escape, quotes included);
markup is only ever built here from fixed strings. A Content-Security-Policy meta tag forbids the page
any network request (images only from data: URIs, no external scripts, styles or fonts).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable

import pandas as pd

from moescope.reporting.document import Document, FigureBlock, Group, KeyValues, Notes, Section, TableBlock, Text

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
:root { --ink: #1d2330; --muted: #5b6576; --line: #dfe3ea; --accent: #0b63b6; --warn-bg: #fff6e0; --warn-line: #e9b949;
        --note-bg: #f4f6f9; --card: #ffffff; --bg: #fafbfc; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
header.top { border-bottom: 1px solid var(--line); margin-bottom: 20px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin: 40px 0 4px; padding-top: 12px; border-top: 3px solid var(--ink); }
h3 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: var(--muted); margin: 0 0 12px; }
nav.toc { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; margin: 16px 0; font-size: 14px; }
nav.toc ul { margin: 4px 0; padding-left: 18px; }
nav.toc li.off a { color: var(--muted); }
nav.toc .grp { display: inline-block; vertical-align: top; margin: 2px 28px 2px 0; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
.headline table { font-size: 15px; width: 100%; table-layout: fixed; }
.headline th, .headline td { white-space: normal; overflow-wrap: anywhere; vertical-align: top; }
.headline th:first-child, .headline td:first-child { width: 30%; }
.headline td.v { font-weight: 600; font-variant-numeric: tabular-nums; }
.verdict { background: var(--card); border-left: 4px solid var(--accent); padding: 8px 12px; margin: 8px 0; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0 16px; font-size: 14px; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; overflow-wrap: anywhere; }
section.analysis { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 4px 20px 16px; margin: 16px 0; }
section.analysis.off { background: transparent; }
figure { margin: 16px 0; } figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.notes { background: var(--note-bg); border-radius: 6px; padding: 6px 12px; font-size: 13px; color: var(--muted); margin: 10px 0; }
.notes.missing { background: var(--warn-bg); border-left: 4px solid var(--warn-line); color: var(--ink); }
.notes ul { margin: 2px 0; padding-left: 18px; }
.tablewrap { overflow-x: auto; max-width: 100%; margin: 10px 0; }
.tablewrap.tall { max-height: 560px; overflow-y: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef1f5; position: sticky; top: 0; }
table.interactive th { cursor: pointer; user-select: none; }
table.interactive th[aria-sort=ascending]::after { content: " ▲"; }
table.interactive th[aria-sort=descending]::after { content: " ▼"; }
code, td.m { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
td.m span.tok { background: #eef1f5; border-radius: 3px; padding: 0 3px; white-space: pre; }
.caption { color: var(--muted); font-size: 13px; margin: 4px 0; }
input.filter { font: inherit; padding: 4px 8px; border: 1px solid var(--line); border-radius: 6px; width: 280px; margin: 6px 8px 6px 0; }
.count { color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 13px; margin-top: 48px; border-top: 1px solid var(--line); padding-top: 8px; }
"""

# Sort on header click (numbers by data-v, text otherwise) and filter rows by text; no network, no globals.
JS = """
(function () {
  function key(cell) { var v = cell.getAttribute('data-v'); return v === null ? cell.textContent : parseFloat(v); }
  function compare(a, b) {
    if (typeof a === 'number' && typeof b === 'number') { return (isNaN(a) ? Infinity : a) - (isNaN(b) ? Infinity : b); }
    return String(a).localeCompare(String(b));
  }
  var tables = document.querySelectorAll('table.interactive');
  Array.prototype.forEach.call(tables, function (table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var input = document.getElementById(table.getAttribute('data-filter'));
    var count = document.getElementById(table.getAttribute('data-count'));
    function update() {
      var query = input.value.toLowerCase(), shown = 0;
      rows.forEach(function (row) {
        var hit = !query || row.textContent.toLowerCase().indexOf(query) >= 0;
        row.hidden = !hit; if (hit) { shown += 1; }
      });
      count.textContent = shown + ' of ' + rows.length + ' rows';
    }
    input.addEventListener('input', update);
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, column) {
      th.addEventListener('click', function () {
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        var order = rows.map(function (row, i) { return [key(row.cells[column]), i, row]; });
        order.sort(function (a, b) { var c = compare(a[0], b[0]); return (ascending ? c : -c) || a[1] - b[1]; });
        order.forEach(function (entry) { body.appendChild(entry[2]); });
      });
    });
    update();
  });
})();
"""


def esc(text) -> str:
    """Escape any value for HTML text and attribute contexts."""
    return html.escape(str(text), quote=True)


def prose(text) -> str:
    """Escaped text in which `backticked` spans (commands, flags) are shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def _cell(value, spec: str | None, mono: bool) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = float(value)
        if not math.isfinite(x):
            return '<td class="n" data-v="NaN">—</td>'
        if spec:
            shown = format(int(round(x)), spec) if spec.endswith("d") else format(x, spec)
        else:
            shown = str(value) if isinstance(value, int) else format(x, ".4g")
        return f'<td class="n" data-v="{esc(repr(x))}">{esc(shown)}</td>'
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td>—</td>"
    if mono:
        return f'<td class="m"><span class="tok">{esc(value)}</span></td>'
    return f"<td>{esc(value)}</td>"


def table_html(block: TableBlock, table_id: str) -> str:
    frame = block.frame
    columns = [str(c) for c in frame.columns]
    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in columns)
    values = frame.astype(object).where(pd.notna(frame), None).to_numpy().tolist()
    specs = [block.formats.get(c) for c in columns]
    mono = [c in block.mono for c in columns]
    body = "\n".join("<tr>" + "".join(_cell(_plain(v), s, m) for v, s, m in zip(row, specs, mono)) + "</tr>" for row in values)
    caption = f'<p class="caption">{esc(block.caption)}</p>'
    if not block.interactive:
        return f'{caption}<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table></div>'
    controls = (f'<div><input class="filter" type="search" id="{table_id}-filter" placeholder="filter rows (e.g. a token)" '
                f'aria-label="filter rows"><span class="count" id="{table_id}-count"></span></div>')
    return (f'{caption}{controls}<div class="tablewrap tall"><table class="interactive" id="{table_id}" data-filter="{table_id}-filter" '
            f'data-count="{table_id}-count"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table></div>')


def _plain(value):
    """NumPy scalars as Python numbers (so they are formatted as numbers)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, TypeError):
            return value
    return value


def kv_html(kv: KeyValues) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in kv.rows) + "</dl>"


def notes_html(notes: Notes) -> str:
    items = "".join(f"<li>{prose(n)}</li>" for n in notes.items)
    label = "Not available" if notes.kind == "missing" else "Notes"
    return f'<div class="notes {esc(notes.kind)}"><strong>{label}:</strong><ul>{items}</ul></div>'


def figure_html(svg: bytes, block: FigureBlock) -> str:
    data = base64.b64encode(svg).decode("ascii")
    alt = block.alt or block.caption
    return (f'<figure><img src="data:image/svg+xml;base64,{data}" alt="{esc(alt)}" loading="eager" decoding="sync">'
            f"<figcaption>{esc(block.caption)}</figcaption></figure>")


RenderFigure = Callable[[Group, FigureBlock], "bytes | str"]  # SVG bytes, or why the figure could not be drawn


def section_html(group: Group, section: Section, render_figure: RenderFigure) -> str:
    parts = [f'<section class="analysis{"" if section.ran else " off"}" id="{esc(section.id)}"><h3>{esc(section.title)}</h3>']
    for i, block in enumerate(section.blocks):
        if isinstance(block, Text):
            parts.append(f"<p>{prose(block.text)}</p>")
        elif isinstance(block, Notes):
            parts.append(notes_html(block))
        elif isinstance(block, FigureBlock):
            svg = render_figure(group, block)
            parts.append(figure_html(svg, block) if isinstance(svg, bytes) else notes_html(Notes((svg,), "missing")))
        elif isinstance(block, TableBlock):
            parts.append(table_html(block, f"{section.id}-t{i}"))
        elif isinstance(block, KeyValues):
            parts.append(kv_html(block))
    parts.append("</section>")
    return "\n".join(parts)


def toc_html(doc: Document) -> str:
    groups = []
    for g in doc.groups:
        items = "".join(f'<li class="{"on" if s.ran else "off"}"><a href="#{esc(s.id)}">{esc(s.title)}</a>'
                        f'{"" if s.ran else " (not available)"}</li>' for s in g.sections)
        groups.append(f'<div class="grp"><a href="#{esc(g.id)}"><strong>{esc(g.title)}</strong></a><ul>{items}</ul></div>')
    return '<nav class="toc"><strong>Contents</strong><div>' + "".join(groups) + "</div></nav>"


def headline_html(doc: Document) -> str:
    h = doc.headline
    parts = ['<section class="headline" id="headline"><h2>Headline numbers</h2>']
    if h.rows:
        head = "<th>quantity</th>" + "".join(f'<th scope="col">{esc(c)}</th>' for c in h.columns)
        body = "".join(f"<tr><td>{esc(name)}</td>" + "".join(f'<td class="v">{esc(v)}</td>' for v in values) + "</tr>" for name, values in h.rows)
        parts.append(f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    else:
        parts.append('<div class="notes missing"><strong>Not available:</strong> no analysis results among the inputs.</div>')
    for verdict in h.verdicts:
        parts.append(f'<p class="verdict">{esc(verdict)}</p>')
    if not h.verdicts:
        parts.append('<div class="notes missing"><strong>Not available:</strong> no quantization results among the inputs '
                     "(run <code>moescope quant</code> and pass its folder).</div>")
    parts.append("</section>")
    return "\n".join(parts)


def render_document(doc: Document, render_figure: RenderFigure) -> str:
    """The whole page; `render_figure` turns each figure block into SVG bytes or an error message (called in document order)."""
    body = [
        f'<header class="top"><h1>{esc(doc.title)}</h1><p class="sub">inputs: ' + ", ".join(f"<code>{esc(p)}</code>" for p in doc.inputs) + "</p></header>",
        toc_html(doc),
        headline_html(doc),
    ]
    for group in doc.groups:
        body.append(f'<h2 id="{esc(group.id)}">{esc(group.title)}</h2><p class="sub">{esc(group.subtitle)}</p>')
        body.append(kv_html(group.header))
        body.extend(section_html(group, section, render_figure) for section in group.sections)
    body.append(f"<footer>moescope {esc(doc.version)} · figures are also written as PNG and SVG with "
                "<code>--figures DIR</code> · every table is in the results folders as Parquet and CSV</footer>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(doc.title)}</title><style>{CSS}</style></head>\n"
        "<body><main>\n" + "\n".join(body) + "\n</main>\n"
        f"<script>{JS}</script>\n</body></html>\n"
    )
