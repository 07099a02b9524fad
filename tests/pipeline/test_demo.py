"""`moescope demo` end to end on a reduced budget: shipped models, built-in corpora, every step."""

from __future__ import annotations

import json

import pytest

from moescope.cli.main import main
from moescope.models import WEIGHTS_DIR


@pytest.mark.skipif(not (WEIGHTS_DIR / "tiny-dsv3" / "model.safetensors").exists(), reason="shipped weights missing")
def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--max-tokens", "800", "--quant-tokens", "256", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and str(tmp_path / "demo" / "report.html") in out
    for name in ("tiny-moe", "tiny-varmoe", "tiny-dsv3"):
        summary = json.loads((tmp_path / "demo" / "results" / name / "summary.json").read_text())
        assert summary["trace"]["tokens"] == 800 and summary["trace"]["complete"]
        assert summary["analyses"]["router_structure"]  # the shipped model's router weights were read
    dsv3 = json.loads((tmp_path / "demo" / "results" / "tiny-dsv3" / "summary.json").read_text())
    assert dsv3["trace"]["moe_layers"] == 3  # its first decoder layer is dense
    varmoe = json.loads((tmp_path / "demo" / "results" / "tiny-varmoe" / "summary.json").read_text())
    assert varmoe["analyses"]["token_cost"], "variable-size experts: cost per token must be computed"
    domains = json.loads((tmp_path / "demo" / "results" / "tiny-moe" / "summary.json").read_text())["analyses"]["domain_specialisation"]
    assert domains  # code, math and prose all present
    quant = json.loads((tmp_path / "demo" / "quant" / "summary.json").read_text())
    assert quant["router_vs_experts"] and quant["dense_control"]
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "tiny-moe" in html and "http://" not in html.replace("http://www.w3.org", "")
    # rerunning reuses the captures instead of failing on the existing traces
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-tokens", "800", "--steps", "capture", "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
