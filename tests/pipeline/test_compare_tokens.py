"""`compare` computes per-token agreement only on tokens both traces hold: sequences matched by their text,
tokens by their ids over the common prefix; traces of different texts get the distribution comparison only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import moescope
from moescope.cli.main import main
from moescope.pipeline.compare import compare_traces

_spec = importlib.util.spec_from_file_location("moescope_tests_conftest", Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_conftest)
make_byte_tokenizer, make_tiny_qwen3_moe = _root_conftest.make_byte_tokenizer, _root_conftest.make_tiny_qwen3_moe

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n", "class A:\n    x = 1\n"]
MATH = ["What is 12 plus 30? It is 42.", "Tom has 3 apples and buys 5 more; he has 8.", "7 times 6 is 42."]


def _capture(model, texts, out, **kw):
    return moescope.capture(model, list(texts), tokenizer=make_byte_tokenizer(), out=out, progress=False,
                            options=moescope.CaptureOptions(seq_len=16, **kw))


@pytest.fixture(scope="module")
def model():
    return make_tiny_qwen3_moe()


def _routing_by_text(trace) -> dict:
    """{(text_sha1, occurrence, pos): (token_id, topk_ids [L, k])}: a plain-Python index of what the trace holds."""
    seqs = trace.table("sequences").to_pylist()
    seen, key_of = {}, {}
    for row in sorted(seqs, key=lambda r: r["seq_id"]):
        occurrence = seen.get(row["text_sha1"], 0)
        seen[row["text_sha1"]] = occurrence + 1
        key_of[row["seq_id"]] = (row["text_sha1"], occurrence)
    index = {}
    for shard in trace.shards():
        for t, (seq, pos) in enumerate(zip(shard.seq_id, shard.pos)):
            index[(*key_of[int(seq)], int(pos))] = (int(shard.token_id[t]), shard.topk_ids[:, t, :])
    return index


def _reference_agreement(a, b):
    """Top-1 agreement per layer over the tokens of matched sequences, up to the first differing token id."""
    ia, ib = _routing_by_text(a), _routing_by_text(b)
    agree, total = 0, 0
    for (sha, occ, pos), (token, ids_a) in ia.items():
        prefix_ok = all(ib.get((sha, occ, p), (None,))[0] == ia[(sha, occ, p)][0] for p in range(pos + 1))
        if not prefix_ok:
            continue
        ids_b = ib[(sha, occ, pos)][1]
        agree = agree + (ids_a[:, 0] == ids_b[:, 0]).astype(int)
        total += 1
    return total, agree / max(total, 1)


def test_recapture_in_another_order_agrees_everywhere(model, tmp_path):
    a = _capture(model, CODE + MATH, tmp_path / "a")
    b = _capture(model, list(reversed(CODE + MATH)), tmp_path / "b")
    assert a.table("tokens").column("token_id").to_pylist() != b.table("tokens").column("token_id").to_pylist()
    summary = compare_traces(a.folder, b.folder, tmp_path / "cmp")
    assert summary["shared_tokens"] == a.n_tokens == b.n_tokens and summary["shared_sequences"] == a.table("sequences").num_rows == 13
    assert summary["mean_top1_agreement"] == 1.0 and summary["mean_topk_jaccard"] == 1.0


def test_different_texts_get_no_per_token_agreement(model, tmp_path, capsys):
    a = _capture(model, CODE, tmp_path / "code")
    b = _capture(model, MATH, tmp_path / "math")
    assert main(["compare", str(a.folder), str(b.folder), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "no token" in line]
    assert len(lines) == 1 and "distribution" in lines[0]
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["shared_tokens"] == 0 and "no token" in summary["per_token"]
    assert "mean_top1_agreement" not in summary and not (tmp_path / "cmp" / "token_agreement.csv").exists()
    assert "mean_load_js_divergence" in summary  # the distribution-level comparison is still there


def test_partial_overlap_compares_only_the_shared_tokens_against_a_reference(model, tmp_path):
    other = make_tiny_qwen3_moe(seed=7)
    a = _capture(model, CODE + MATH[:1], tmp_path / "a")  # CODE[0] is cut into two sequences (16 tokens each)
    b = _capture(other, [MATH[1], MATH[0], CODE[0]], tmp_path / "b", max_tokens=93)  # CODE[0] truncated
    summary = compare_traces(a.folder, b.folder, tmp_path / "cmp")
    total, per_layer = _reference_agreement(a, b)
    assert total == 93 - len(MATH[1])  # one byte per token: MATH[0] whole, then the start of CODE[0]
    assert summary["shared_tokens"] == total
    agreement = __import__("pandas").read_csv(tmp_path / "cmp" / "token_agreement.csv")
    assert agreement["tokens"].tolist() == [total] * 4
    np.testing.assert_allclose(agreement["top1_agreement"].to_numpy(), per_layer, rtol=0, atol=1e-12)
    assert summary["mean_top1_agreement"] < 1.0  # another model: the check can fail


def test_imported_traces_without_token_ids_are_not_compared_per_token(model, tmp_path):
    from moescope.trace.exchange import export_trace, import_jsonl

    a = _capture(model, CODE, tmp_path / "a")
    export_trace(a, tmp_path / "a.jsonl", fmt="jsonl")
    imported = import_jsonl(tmp_path / "a.jsonl", tmp_path / "imp", n_experts=8)
    summary = compare_traces(a.folder, imported.folder, tmp_path / "cmp")
    assert summary["shared_tokens"] == 0 and "no token" in summary["per_token"]
