"""The report in a real browser: headless Chromium loads it offline, no errors, every figure decodes,
the token table sorts and filters, and a screenshot is saved.

A probe script is inserted at the top of a copy of the page; it records script errors, failed resource
loads, Content-Security-Policy violations (any network request the page tries), console.error and
alert() calls, then exercises the token table and writes its findings as JSON into the DOM, which
`chromium --dump-dom` prints. Skipped when Chromium is not installed (Debian: apt-get install chromium).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=10000")

PROBE = """<script>
(function () {
  var problems = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    problems.push(t && t !== window ? 'failed to load ' + (t.tagName || '?') + ' ' + String(t.src || t.href || '').slice(0, 60)
                                    : 'script error: ' + e.message);
  }, true);
  window.addEventListener('unhandledrejection', function (e) { problems.push('unhandled rejection: ' + e.reason); });
  document.addEventListener('securitypolicyviolation', function (e) { problems.push('blocked by CSP: ' + e.blockedURI + ' (' + e.violatedDirective + ')'); });
  var consoleError = console.error;
  console.error = function () { problems.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); consoleError.apply(console, arguments); };
  window.alert = function (m) { problems.push('alert: ' + m); };
  function cellValues(table, column) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return parseFloat(r.cells[column].getAttribute('data-v')); });
  }
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var out = {images: images.length, broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; })};
    var table = document.querySelector('table.interactive');
    if (table) {
      var heads = Array.prototype.map.call(table.tHead.rows[0].cells, function (c) { return c.textContent; });
      var column = heads.indexOf('occurrences');
      var values = cellValues(table, column);
      out.rows = values.length;
      out.min = Math.min.apply(null, values);
      out.max = Math.max.apply(null, values);
      table.tHead.rows[0].cells[column].click();
      out.ascending = cellValues(table, column);
      table.tHead.rows[0].cells[column].click();
      out.descending = cellValues(table, column);
      var token = table.tBodies[0].rows[3].cells[heads.indexOf('token')].textContent;
      var input = document.getElementById(table.getAttribute('data-filter'));
      input.value = token;
      input.dispatchEvent(new Event('input'));
      var visible = Array.prototype.filter.call(table.tBodies[0].rows, function (r) { return !r.hidden; });
      out.token = token;
      out.visible = visible.length;
      out.visibleMatch = visible.every(function (r) { return r.textContent.indexOf(token) >= 0; });
      out.count = document.getElementById(table.getAttribute('data-count')).textContent;
    }
    var wrap = document.querySelector('.headline .tablewrap');
    if (wrap) {
      var cells = wrap.querySelector('table').rows[0].cells;
      out.headline = {columns: cells.length, scroll: wrap.scrollWidth, client: wrap.clientWidth,
                      right: Math.max.apply(null, Array.prototype.map.call(cells, function (c) { return c.getBoundingClientRect().right; })),
                      viewport: document.documentElement.clientWidth};
    }
    out.problems = problems;
    var pre = document.createElement('pre');
    pre.id = 'probe-result';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>"""


def _chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, profile, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def browser() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("Chromium is not installed (Debian/Ubuntu: apt-get install -y chromium); the browser test needs it")
    return path


def probe(browser: str, page: str, tmp_path, *extra: str) -> dict:
    """Load `page` with the probe in front (one Chromium run) and return what the probe found."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    result = _run(browser, tmp_path / "profile", *extra, "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not report (chromium exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_loads_cleanly_in_chromium(browser, full_report, tmp_path):
    page = full_report.read_text(encoding="utf-8")
    shot = tmp_path / "report.png"
    out = probe(browser, page, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    assert out["problems"] == []
    assert out["images"] == page.count("<img") > 30 and out["broken"] == []
    # the token table sorts by a numeric column both ways and filters by a token's text
    assert out["ascending"] == sorted(out["ascending"]) and out["ascending"][0] == out["min"]
    assert out["descending"] == sorted(out["descending"], reverse=True) and out["descending"][0] == out["max"]
    assert 1 <= out["visible"] < out["rows"] and out["visibleMatch"]
    assert out["count"] == f"{out['visible']} of {out['rows']} rows"

    from PIL import Image

    with Image.open(shot) as image:  # the top of the page: header, contents, headline numbers, first figures
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # a rendered page, not a blank one
    print(f"screenshot: {shot}")


def test_headline_shows_every_model_at_a_normal_window_width(browser, report_inputs, tmp_path, width=1280):
    """Three models side by side in the headline table: every column is on screen, nothing scrolls sideways."""
    import shutil as sh

    from moescope.reporting import write_report

    third = tmp_path / "third-model-with-a-rather-long-folder-name"
    sh.copytree(report_inputs["full"], third)
    page = write_report([report_inputs["full"], report_inputs["partial"], third], tmp_path / "r.html").read_text(encoding="utf-8")
    out = probe(browser, page, tmp_path, f"--window-size={width},1600")
    assert out["problems"] == []
    h = out["headline"]
    assert h["columns"] == 4  # the quantity and three models
    assert h["scroll"] <= h["client"] and h["right"] <= h["viewport"], h


def test_probe_catches_errors_broken_figures_and_network_requests(browser, tmp_path):
    """The same probe on a page with the report's CSP that breaks each rule: every breach is reported."""
    from moescope.reporting.html import CSP

    page = (f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}"></head><body>'
            '<img alt="remote" src="https://example.invalid/x.png"><img alt="broken" src="data:image/svg+xml;base64,AAAA">'
            "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    out = probe(browser, page, tmp_path)
    text = " | ".join(out["problems"])
    assert "blocked by CSP: https://example.invalid/x.png" in text
    assert "console.error: boom" in text and "script error" in text
    assert sorted(out["broken"]) == ["broken", "remote"]


@pytest.mark.slow
def test_demo_report_in_chromium(browser, tmp_path):
    """The demo end to end (shipped models: capture, analyze, quant, report), its page checked in Chromium."""
    from moescope.pipeline.demo import run_demo

    outputs = run_demo(tmp_path / "demo", max_tokens=3000, quant_tokens=512, progress=False)
    page = Path(outputs["report"]).read_text(encoding="utf-8")
    out = probe(browser, page, tmp_path, "--window-size=1280,2400", f"--screenshot={tmp_path / 'demo.png'}")
    assert out["problems"] == [] and out["broken"] == [] and out["images"] == page.count("<img") > 40
    assert "could not be drawn" not in page and "could not be read" not in page
    for group in ("tiny-moe", "tiny-varmoe", "tiny-dsv3", "quant"):
        assert f"<strong>{group}</strong>" in page
    assert page.count('class="analysis off"') <= 3  # at most: tiny-moe and tiny-dsv3 have no variable-size experts
    print(f"screenshot: {tmp_path / 'demo.png'}")
