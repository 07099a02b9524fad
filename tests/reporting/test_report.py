"""write_report end to end: contents, escaping, partial and missing results, determinism, figure files."""

from __future__ import annotations

import base64
import html
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from report_data import HOSTILE_DOMAIN, HOSTILE_FOLDER, HOSTILE_MODEL, HOSTILE_NOTE, PARTIAL_INPUTS, hostile_token

from moescope.reporting import ReportError, build_document, write_report
from moescope.reporting.document import FigureBlock

IMG = re.compile(r'<img src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"')


def _sections(page: str) -> dict[str, str]:
    """{section id: its HTML} for every analysis section."""
    parts = re.split(r'(?=<section class="analysis[^"]*" id=")', page)
    return {re.match(r'<section class="analysis[^"]*" id="([^"]+)"', p).group(1): p for p in parts[1:]}


def test_every_figure_is_an_embedded_valid_svg(full_report):
    page = full_report.read_text(encoding="utf-8")
    images = IMG.findall(page)
    doc_figures = [b for g in build_document(_inputs_of(page)).groups for s in g.sections for b in s.blocks if isinstance(b, FigureBlock)]
    assert len(images) == len(doc_figures) >= 30
    for data in images:
        root = ET.fromstring(base64.b64decode(data))  # parses: a complete SVG document
        assert root.tag.endswith("svg")
    assert "could not be drawn" not in page
    assert page.count("<img") == len(images)  # nothing else is an image


def _inputs_of(page: str) -> list[str]:
    header = re.search(r'<p class="sub">inputs: (.*?)</p>', page).group(1)
    return [html.unescape(p) for p in re.findall(r"<code>(.*?)</code>", header)]


def test_page_requests_nothing_from_the_network(full_report):
    page = full_report.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "url(http" not in page and "@import" not in page and "<link" not in page
    assert page.count("<script") == 1  # only the page's own table script


def test_headline_comes_first_with_the_issue_numbers(full_report, report_inputs):
    import json

    page = full_report.read_text(encoding="utf-8")
    headline = page[page.index('id="headline"'): page.index('<h2 id="r1"')]
    summary = json.loads((report_inputs["full"] / "summary.json").read_text())["analyses"]
    for quantity in ("balance score", "dead experts", "mean routing entropy", "best next-layer predictor", "code vs math divergence"):
        assert quantity in headline
    assert f"{summary['load']['balance_score_worst']:.3f} (layer {summary['load']['balance_score_worst_layer']})" in headline
    assert f"pooled as transformers computes it: {summary['aux_losses']['load_balancing_loss_pooled_transformers']:.4g}" in headline
    assert f"{summary['router_confidence']['mean_router_entropy']:.3f} nats" in headline
    assert f"{summary['domain_specialisation']['js_divergence']['code|math']:.3f}" in headline
    assert "does router-only quantization cost more quality per parameter" in headline
    gain = summary["cross_layer"]["best_minus_popularity_hop1"]
    assert f"({gain:+.3f} vs popularity)" in headline
    cross = _sections(page)["r1-cross-layer"]
    assert all(html.escape(v) in cross for v in summary["cross_layer"]["versus_popularity"]) and "static baseline" in cross


def test_each_analysis_gets_its_figures(full_report):
    page = full_report.read_text(encoding="utf-8")
    sections = _sections(page)
    expected = {  # section of the complete results folder (group r1) -> figures it must show
        "r1-load": 4, "r1-aux": 1, "r1-router-structure": 4, "r1-confidence": 4, "r1-coactivation": 1,
        "r1-cross-layer": 3, "r1-cache": 1, "r1-locality": 1, "r1-domains": 3, "r1-tokens": 1, "r1-sizes": 3,
    }
    for sid, n in expected.items():
        assert len(IMG.findall(sections[sid])) == n, sid
    assert 'class="analysis off"' not in "".join(sections[s] for s in expected)  # everything ran
    quant = "".join(v for k, v in sections.items() if k.startswith("r2-"))
    assert len(IMG.findall(quant)) == 5 and "Dense control" in quant and "yes at" in page


def test_token_routing_table_is_interactive_and_complete(full_report, report_inputs):
    import pandas as pd

    page = full_report.read_text(encoding="utf-8")
    tokens = pd.read_parquet(report_inputs["full"] / "token_specialisation__tokens.parquet")
    table = re.search(r'<table class="interactive" id="r1-tokens-t\d+".*?</table>', page, re.S).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    assert len(rows) == min(200, len(tokens))
    top = tokens.sort_values(["occurrences", "token_id"], ascending=[False, True]).iloc[0]
    first = re.findall(r"<td[^>]*>(.*?)</td>", rows[0])
    assert first[0] == str(top.token_id) and html.unescape(re.sub(r"<[^>]+>", "", first[1])) == top.token
    assert {"layer_0", "layer_3", "avg_expert_size", "flops_per_token"} <= set(re.findall(r'<th scope="col">(.*?)</th>', table))


def test_user_and_model_text_is_escaped(full_report):
    page = full_report.read_text(encoding="utf-8")
    for raw in (HOSTILE_MODEL, HOSTILE_NOTE, HOSTILE_DOMAIN, HOSTILE_FOLDER, hostile_token(5), hostile_token(6)):
        assert raw not in page
    assert html.escape(HOSTILE_MODEL) in page
    assert html.escape(HOSTILE_NOTE) in page
    assert html.escape(HOSTILE_FOLDER) in page
    assert html.escape(hostile_token(5)) in page  # a token shown as text in the routing table
    assert "onerror=" not in page.replace(html.escape("onerror="), "")


def test_partial_results_say_what_was_not_run(partial_report, full_report):
    page = partial_report.read_text(encoding="utf-8")
    partial = {k.removeprefix("r1-"): v for k, v in _sections(page).items()}
    # analysed: figures from what the routing-only trace has
    assert IMG.search(partial["confidence"]) and IMG.search(partial["cross-layer"]) and IMG.search(partial["tokens"])
    # not run (analyze --only): said plainly, no figure
    for name in ("load", "coactivation", "cache", "locality", "domains", "aux"):
        assert "was not run" in partial[name] and not IMG.search(partial[name]), name
    # ran, but the capture lacked what it needs: the fix is named
    assert "--save-logits" in partial["confidence"]
    assert "--predict-next-layer" in partial["cross-layer"]
    assert "without <code>--no-model</code>" in partial["router-structure"] and "not requested (--no-model)" in partial["router-structure"]
    assert "Token text is unavailable" in partial["tokens"]
    assert "tiny-varmoe" in partial["sizes"] and not IMG.search(partial["sizes"])
    headline = page[page.index('id="headline"'): page.index('<h2 id="r1"')]
    assert "— (no router outputs recorded)" in headline and "— (needs code and math tokens)" in headline
    assert "— (load not run)" in headline and "400 × 2 × 6 (top-2)" in headline  # shape from the trace manifest
    assert "folder not found" in _sections(full_report.read_text(encoding="utf-8"))["r3-missing"]


def test_same_inputs_give_byte_identical_outputs(partial_report, report_inputs, tmp_path):
    """Written again by another interpreter with another hash seed (so set or dict order cannot leak into
    the bytes unnoticed): the same page and the same figure files, byte for byte."""
    code = "import sys; from moescope.reporting import write_report; write_report(sys.argv[3:], sys.argv[1], figures_dir=sys.argv[2])"
    again, files = tmp_path / "again.html", tmp_path / "files"
    subprocess.run([sys.executable, "-c", code, str(again), str(files), *(str(report_inputs[k]) for k in PARTIAL_INPUTS)],
                   check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=600)
    assert again.read_bytes() == partial_report.read_bytes()
    first = {p.name: p.read_bytes() for p in (partial_report.parent / "files").iterdir()}
    assert first == {p.name: p.read_bytes() for p in files.iterdir()}
    assert len(first) == 2 * len(IMG.findall(again.read_text(encoding="utf-8")))


def test_figures_dir_gets_every_figure_as_png_and_svg(partial_report):
    images = IMG.findall(partial_report.read_text(encoding="utf-8"))
    files = partial_report.parent / "files"
    svgs, pngs = sorted(files.glob("*.svg")), sorted(files.glob("*.png"))
    assert len(svgs) == len(pngs) == len(images) > 0
    assert [p.stem for p in svgs] == [p.stem for p in pngs]
    assert {p.name.split("__")[0] for p in svgs} == {"01-partial", "02-quant"}
    assert sorted(base64.b64decode(d) for d in images) == sorted(p.read_bytes() for p in svgs)  # the page embeds the same SVGs
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_no_inputs_is_an_error_and_an_unreadable_folder_is_reported(tmp_path):
    with pytest.raises(ReportError, match="no results folders"):
        write_report([], tmp_path / "r.html")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "summary.json").write_text("{not json")
    page = write_report([junk], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "not a moescope results folder" in page and "summary.json is unreadable" in page
    assert "no analysis results among the inputs" in page and "no quantization results among the inputs" in page


def test_tables_this_version_cannot_read_are_reported_not_fatal(report_inputs, tmp_path):
    import json
    import shutil

    import pandas as pd

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    summary = json.loads((report_inputs["full"] / "summary.json").read_text())
    summary["analyses"] = {k: v for k, v in summary["analyses"].items() if k in ("load", "coactivation", "temporal_locality")}
    (damaged / "summary.json").write_text(json.dumps(summary))
    for table in report_inputs["full"].glob("*.parquet"):
        shutil.copy(table, damaged)
    pd.read_parquet(damaged / "load__per_expert.parquet").drop(columns="status").to_parquet(damaged / "load__per_expert.parquet")
    (damaged / "coactivation__pairs.parquet").write_bytes(b"not parquet at all")
    pd.read_parquet(damaged / "temporal_locality.parquet").drop(columns="overlap_chance").to_parquet(damaged / "temporal_locality.parquet")

    with pytest.warns(UserWarning) as caught:
        page = write_report([damaged], tmp_path / "r.html").read_text(encoding="utf-8")
    sections = _sections(page)
    assert "Expert load: the results could not be read (KeyError" in sections["r1-load"]
    assert "Co-activation: the results could not be read (ArrowInvalid" in sections["r1-coactivation"]
    assert "figure temporal_locality could not be drawn: KeyError" in sections["r1-locality"]
    assert len(caught) == 3
    assert "was not run" in sections["r1-cache"]  # the rest of the report is as usual
