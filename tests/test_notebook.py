"""The notebook API: moescope.analyze / report / quant_sweep in memory, equal to the CLI's files."""

from __future__ import annotations

import importlib
import pkgutil

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import moescope
from moescope.cli.main import main
from moescope.errors import MoescopeError


@pytest.fixture(scope="module")
def shipped():
    from moescope.recording.loading import load_model

    return load_model("moescope:tiny-moe", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("nb")
    (root / "docs.txt").write_text("def f(x):\n    return x * 2\n\nThe river ran slowly past the old mill.\n\n12 + 30 = 42\n")
    trace = moescope.capture(str(tiny_model_dir), str(root / "docs.txt"), out=root / "t", progress=False,
                             options=moescope.CaptureOptions(seq_len=16, save_logits=True))
    return root, trace


def test_results_save_is_byte_identical_to_the_cli(captured, capsys):
    root, trace = captured
    assert main(["analyze", str(trace.folder), "--out", str(root / "cli")]) == 0
    capsys.readouterr()
    results = moescope.analyze(trace)
    results.save(root / "nb")
    cli_files = sorted(p.name for p in (root / "cli").iterdir())
    assert cli_files == sorted(p.name for p in (root / "nb").iterdir()) and "summary.json" in cli_files
    for name in cli_files:
        assert (root / "cli" / name).read_bytes() == (root / "nb" / name).read_bytes(), name
    # the DataFrames are the files' tables
    pd.testing.assert_frame_equal(results.load.per_expert, pd.read_parquet(root / "cli" / "load__per_expert.parquet"))
    assert results.summary["analyses"]["load"] == results.load.summary
    assert set(results.names) >= {"load", "aux_losses", "router_structure", "token_specialisation"}
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(MoescopeError, match="is not empty and holds no analysis results"):
        results.save(root / "mine")  # as the CLI: a folder of the user's is never written into
    assert [p.name for p in (root / "mine").iterdir()] == ["notes.txt"]


def test_plots_are_the_reports_figures(captured):
    _, trace = captured
    results = moescope.analyze(trace, only=["load", "router_confidence"])
    figures = results.load.plot()
    assert len(figures) >= 3 and all(isinstance(f, Figure) for f in figures)
    assert len(results.plot("load")) == len(figures)
    assert "<img src='data:image/png;base64," in figures._repr_html_()
    with pytest.raises(AttributeError, match="coactivation was not run"):
        results.coactivation
    with pytest.raises(AttributeError, match="has no table 'nope'"):
        results.load.nope
    with pytest.raises(MoescopeError, match="unknown analysis"):
        results.plot("nope")
    with pytest.raises(MoescopeError, match="unknown analyses"):
        moescope.analyze(trace, only=["nope"])


def test_report_from_memory(captured, tmp_path):
    _, trace = captured
    results = moescope.analyze(trace, only=["load", "aux_losses"])
    page = moescope.report(results, tmp_path / "r.html").read_text()
    assert "Expert load" in page and "Auxiliary losses" in page and page.count("<svg") + page.count("data:image/svg") >= 3


def test_html_summaries_are_escaped(tiny_moe):
    tiny_moe.config._name_or_path = "<script>alert(1)</script>"
    with torch.inference_mode(), moescope.record(tiny_moe) as rec:
        tiny_moe(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
    results = moescope.analyze(rec.trace, only=["load"], model=tiny_moe)
    for html in (rec.trace._repr_html_(), results._repr_html_()):
        assert "<script>" not in html and "&lt;script&gt;" in html
    assert "per_expert [32 rows]" in results.load._repr_html_()
    assert "in memory" in rec.trace._repr_html_() and "tokens" in rec.trace._repr_html_()


def test_quant_sweep_in_memory_equals_the_cli(shipped, tmp_path, capsys):
    model, tokenizer = shipped
    options = dict(bits="4", targets="router", max_tokens=256, seq_len=64)
    sweep = moescope.quant_sweep(model, "wiki", tokenizer=tokenizer, **options)
    assert len(sweep.configs) == 1 and sweep.configs["target"].tolist() == ["router"]
    assert sweep.summary["reference"]["moe"]["tokens_predicted"] > 0
    assert all(isinstance(f, Figure) for f in sweep.plot()) and sweep.plot()
    assert "configurations" in sweep._repr_html_()
    code = main(["quant", "moescope:tiny-moe", "--data", "wiki", "--bits", "4", "--targets", "router", "--max-tokens", "256",
                 "--seq-len", "64", "--out", str(tmp_path / "cli"), "--no-progress"])
    capsys.readouterr()
    assert code == 0
    cli = pd.read_parquet(tmp_path / "cli" / "configs.parquet")
    assert cli["delta_nll"].tolist() == sweep.configs["delta_nll"].tolist()
    page = moescope.report([sweep], tmp_path / "q.html").read_text()
    assert "Does router quantization cost more?" in page


def test_public_functions_whatever_was_imported_before():
    for info in pkgutil.walk_packages(moescope.__path__, "moescope."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # optional extras not installed here (vLLM); nothing of theirs is a public name
            continue
    from moescope import api
    from moescope.recording.session import record

    assert moescope.record is record is api.record and moescope.report is api.report and moescope.analyze is api.analyze
    assert moescope.quant_sweep is api.quant_sweep and moescope.capture is api.capture
    assert moescope.RoutingMonitor.__name__ == "RoutingMonitor"
    for name in moescope._PUBLIC:  # every public name is the API's, and every command of the CLI has one
        assert getattr(moescope, name) is getattr(api, name), name
    from moescope.cli.main import SUBCOMMANDS

    function_of = {"import_": "import_trace", "quant": "quant_sweep"}
    assert {function_of.get(c, c) for c in SUBCOMMANDS} <= set(moescope._PUBLIC)
