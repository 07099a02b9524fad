"""analyze / compare end to end on real captures of a tiny model (tables on disk, summary.json)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import moescope
from moescope.pipeline.analyze import analyze_trace
from moescope.pipeline.compare import compare_traces
from moescope.trace.exchange import export_trace, import_jsonl
import importlib.util
from pathlib import Path as _Path

# the tests folder's own conftest, by path: `import conftest` finds whichever conftest pytest imported first
_spec = importlib.util.spec_from_file_location("moescope_tests_conftest", _Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_conftest)
make_byte_tokenizer, make_tiny_qwen3_moe = _root_conftest.make_byte_tokenizer, _root_conftest.make_tiny_qwen3_moe


@pytest.fixture(scope="module")
def traces(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("an")
    (root / "code.txt").write_text("def f(x):\n    return x * 2\n\nfor i in range(10):\n    print(i)\n")
    (root / "prose.txt").write_text("The river ran slowly past the old mill.\n\nShe read the letter twice.\n")
    data = f"code={root / 'code.txt'},prose={root / 'prose.txt'}"
    a = moescope.capture(str(tiny_model_dir), data, out=root / "a", progress=False,
                         options=moescope.CaptureOptions(seq_len=16, save_logits=True, predict_next_layer=True))
    other = make_tiny_qwen3_moe(seed=7)
    b = moescope.capture(other, data, tokenizer=make_byte_tokenizer(), out=root / "b", progress=False,
                         options=moescope.CaptureOptions(seq_len=16))
    return root, a, b


def test_analyze_writes_every_table_and_a_summary(traces):
    root, a, _ = traces
    summary = analyze_trace(a.folder, root / "res")
    on_disk = json.loads((root / "res" / "summary.json").read_text())
    assert on_disk["trace"]["tokens"] == a.n_tokens
    assert {"load", "aux_losses", "router_confidence", "cross_layer", "domain_specialisation", "router_structure"} <= set(summary["analyses"])
    load = pd.read_parquet(root / "res" / "load__per_expert.parquet")
    counted = a.sql("SELECT layer, count(*) * 2 AS slots FROM routing GROUP BY layer ORDER BY layer")
    per_layer = load[load["layer"] >= 0].groupby("layer")["count"].sum().to_numpy()
    assert per_layer.tolist() == counted["slots"].tolist()  # the analysis counts what DuckDB counts
    assert summary["analyses"]["router_structure"]  # the model was loadable: router weights analysed
    assert (root / "res" / "load__per_expert.csv").exists()


def test_imported_trace_gets_routing_only_analyses(traces):
    root, a, _ = traces
    export_trace(a, root / "a.jsonl", fmt="jsonl")
    imported = import_jsonl(root / "a.jsonl", root / "imp")
    summary = analyze_trace(imported.folder, root / "res-imp")
    assert "load" in summary["analyses"]
    assert any("skipped" in note for note in summary["notes"]["router_structure"])


def test_compare_same_tokens_gives_agreement(traces):
    root, a, b = traces
    same = compare_traces(a.folder, a.folder, root / "cmp-same")
    assert same["mean_top1_agreement"] == 1.0 and same["mean_topk_jaccard"] == 1.0
    assert same["mean_load_js_divergence"] == pytest.approx(0.0, abs=1e-12)
    diff = compare_traces(a.folder, b.folder, root / "cmp-diff")
    assert diff["shared_tokens"] == a.n_tokens and diff["mean_top1_agreement"] < 0.9


def test_an_empty_fold_is_warned_once_on_stderr_and_in_the_summary(tmp_path, capsys):
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.cli.main import main

    spec = SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(4, 20), sequences_per_document=10**6,
                         router_output=None, output_entropy=False)  # every sequence cut from one document
    write_synthetic_trace(tmp_path / "t", spec, 400, 100)
    assert main(["analyze", str(tmp_path / "t"), "--out", str(tmp_path / "res"), "--no-model",
                 "--only", "cross_layer,expert_cache"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: every routed slot falls in one of the two cross-fitting folds")
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["warnings"] == [err[0].removeprefix("warning: ")]
    assert summary["warnings"][0] in summary["notes"]["cross_layer"] and summary["warnings"][0] in summary["notes"]["expert_cache"]


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a socket connection is recorded and refused."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_a_model_that_is_not_here_is_skipped_at_once_without_the_network(tmp_path, capsys, no_network, monkeypatch):
    """The manifest names a hub model that is not on the machine: analyze tries no host, waits on no retry, and says
    in one stderr line what it skipped and how to supply the model."""
    import time

    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.cli.main import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the default is what is tested, not the variable
    spec = SyntheticSpec(n_layers=2, n_experts=4, top_k=2, seq_len=(4, 12), router_output=None, output_entropy=False)
    write_synthetic_trace(tmp_path / "t", spec, 60, 60, model_id="moescope-tests/not-on-this-machine")
    start = time.monotonic()
    assert main(["analyze", str(tmp_path / "t"), "--out", str(tmp_path / "res"), "--only", "load,router_structure"]) == 0
    elapsed = time.monotonic() - start
    assert no_network == []  # no host resolved, no connection tried
    assert elapsed < 20  # the hub's retries took 38-46 s; a local look-up is well under a second
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("warning: the trace's model moescope-tests/not-on-this-machine is not on this machine")
    assert "router weight structure" in err[0] and "token text" in err[0] and "--model PATH" in err[0]
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert "router_structure" not in summary["analyses"]
    assert "not on this machine" in summary["notes"]["router_structure"][0]


def test_a_folder_the_manifest_names_that_is_gone_is_skipped_with_the_same_warning(tmp_path, no_network):
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.pipeline.analyze import model_for
    from moescope.trace.reader import open_trace

    spec = SyntheticSpec(n_layers=2, n_experts=4, top_k=2, seq_len=(4, 12), router_output=None, output_entropy=False)
    write_synthetic_trace(tmp_path / "t", spec, 30, 30, model_id=str(tmp_path / "models" / "moved-away"))
    loaded, tokenizer, reason, warning = model_for(open_trace(tmp_path / "t"), None)
    assert loaded is None and tokenizer is None and "not on this machine" in reason
    assert "--model PATH" in warning and no_network == []


def test_a_model_in_the_local_cache_still_loads_offline(tmp_path, no_network, tiny_model_dir):
    """A folder named in the manifest is on this machine: it loads, with the network blocked."""
    from moescope.pipeline.analyze import model_for
    from moescope.trace.reader import open_trace
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace

    spec = SyntheticSpec(n_layers=2, n_experts=4, top_k=2, seq_len=(4, 12), router_output=None, output_entropy=False)
    write_synthetic_trace(tmp_path / "t", spec, 30, 30, model_id=str(tiny_model_dir))
    loaded, tokenizer, reason, warning = model_for(open_trace(tmp_path / "t"), None)
    assert loaded is not None and tokenizer is not None and reason is None and warning is None
    assert no_network == []


def test_large_tables_are_written_in_pieces_and_as_parquet_only(tmp_path, monkeypatch):
    """A table longer than CSV_MAX_ROWS is Parquet only (a note says so); the transitions and pair tables are built
    piece by piece (ChunkedTable) yet their files hold the same rows, in row groups of ROW_GROUP_ROWS, as the
    notebook's whole DataFrames written by the same writer (byte for byte)."""
    import pyarrow.parquet as pq

    from moescope.analysis import coactivation, cross_layer
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace
    from moescope.pipeline import analyze as pipeline

    monkeypatch.setattr(pipeline, "CSV_MAX_ROWS", 300)
    monkeypatch.setattr(pipeline, "ROW_GROUP_ROWS", 37)
    for module in (cross_layer, coactivation):
        monkeypatch.setattr(module, "TABLE_PIECE_ROWS", 50)  # pieces of a layer or two, of uneven sizes
    spec = SyntheticSpec(n_layers=3, n_experts=16, top_k=4, router_output=None, output_entropy=False)
    write_synthetic_trace(tmp_path / "t", spec, 90, 40)
    summary = analyze_trace(tmp_path / "t", tmp_path / "cli", only=["cross_layer", "coactivation", "load"], use_model=False)
    results = moescope.analyze(tmp_path / "t", only=["cross_layer", "coactivation", "load"], use_model=False)
    results.save(tmp_path / "nb")
    for stem, frame in [("cross_layer__transitions", results.cross_layer.transitions),
                        ("coactivation__pairs", results.coactivation.pairs)]:
        assert len(frame) > 300
        part = pq.ParquetFile(tmp_path / "cli" / f"{stem}.parquet")
        assert [part.metadata.row_group(g).num_rows for g in range(part.num_row_groups)] == \
            [37] * (len(frame) // 37) + ([len(frame) % 37] if len(frame) % 37 else [])
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cli" / f"{stem}.parquet"), frame)
        assert (tmp_path / "cli" / f"{stem}.parquet").read_bytes() == (tmp_path / "nb" / f"{stem}.parquet").read_bytes()
        assert not (tmp_path / "cli" / f"{stem}.csv").exists() and not (tmp_path / "nb" / f"{stem}.csv").exists()
        name = stem.split("__")[0]
        assert f"{stem}: {len(frame):,} rows, written as Parquet only" in " ".join(summary["notes"][name])
    short = results.coactivation.top_pairs
    assert len(short) <= 300
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cli" / "coactivation__top_pairs.csv"), short, check_dtype=False)
    assert json.loads((tmp_path / "cli" / "summary.json").read_text()) == json.loads((tmp_path / "nb" / "summary.json").read_text())
