"""`moescope import` keeps experts that were never routed to: the count comes from --n-experts, or is
inferred from the ids seen, said on stderr, recorded in the manifest and repeated by the load analysis."""

from __future__ import annotations

import json

import numpy as np

from moescope.cli.main import main
from moescope.pipeline.analyze import analyze_trace
from moescope.reporting import write_report
from moescope.trace.reader import open_trace


def _jsonl(path, n_tokens=30, n_layers=2):
    """8 experts, top-2; expert 7 is never chosen. Returns the routed ids [L, T, 2] the file holds."""
    rng = np.random.default_rng(4)
    ids = np.stack([rng.permutation(7)[:2] for _ in range(n_tokens * n_layers)]).reshape(n_layers, n_tokens, 2)
    with open(path, "w") as f:
        for layer in range(n_layers):
            for t in range(n_tokens):
                f.write(json.dumps({"problem_id": t // 10, "layer": layer, "token_id": t % 10,
                                    "expert_ids": ids[layer, t].tolist(), "weights": [0.75, 0.25]}) + "\n")
    return ids


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_n_experts_keeps_the_never_routed_expert(capsys, tmp_path):
    ids = _jsonl(tmp_path / "r.jsonl")
    code, _, err = _run(capsys, "import", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t"), "--n-experts", "8")
    assert code == 0 and err == ""
    trace = open_trace(tmp_path / "t")
    assert [layer["n_experts"] for layer in trace.layers] == [8, 8]
    assert not any(layer["n_experts_inferred"] for layer in trace.layers)
    summary = analyze_trace(trace.folder, tmp_path / "res", use_model=False)
    load = summary["analyses"]["load"]
    assert load["n_experts"] == 8 and load["dead_experts"] == [[0, 7], [1, 7]]
    counts = np.stack([np.bincount(ids[layer].ravel(), minlength=8) for layer in range(2)])  # independent count
    per_expert = __import__("pandas").read_parquet(tmp_path / "res" / "load__per_expert.parquet")
    np.testing.assert_array_equal(per_expert.sort_values(["layer", "expert"])["count"].to_numpy(), counts.ravel())
    assert not any("inferred" in note for note in summary["notes"]["load"])


def test_without_n_experts_the_count_is_inferred_and_said_everywhere(capsys, tmp_path):
    _jsonl(tmp_path / "r.jsonl")
    code, _, err = _run(capsys, "import", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t"))
    assert code == 0 and err.count("\n") == 1 and "inferred" in err and "7" in err and "--n-experts" in err
    trace = open_trace(tmp_path / "t")
    assert [layer["n_experts"] for layer in trace.layers] == [7, 7]
    assert all(layer["n_experts_inferred"] for layer in trace.layers)
    summary = analyze_trace(trace.folder, tmp_path / "res", use_model=False)
    notes = [note for note in summary["notes"]["load"] if "inferred" in note]
    assert len(notes) == 1 and "--n-experts" in notes[0]
    html = write_report([tmp_path / "res"], tmp_path / "report.html").read_text()
    assert notes[0].split(":")[0] in html


def test_n_experts_below_the_ids_seen_is_refused(capsys, tmp_path):
    _jsonl(tmp_path / "r.jsonl")
    code, _, err = _run(capsys, "import", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t"), "--n-experts", "6")
    assert code == 2 and err.startswith("error: ") and "expert id 6" in err and "--n-experts 6" in err
    assert not (tmp_path / "t").exists()


def test_rerunning_the_same_import_writes_nothing(capsys, tmp_path):
    _jsonl(tmp_path / "r.jsonl")
    argv = ["import", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t"), "--n-experts", "8"]
    assert _run(capsys, *argv)[0] == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((tmp_path / "t").rglob("*")) if p.is_file()}
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "already" in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((tmp_path / "t").rglob("*")) if p.is_file()} == before
    code, _, err = _run(capsys, *argv[:-1], "9")  # another expert count: refused
    assert code == 2 and "different" in err
