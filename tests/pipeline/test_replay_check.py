"""`moescope replay-check`: a trace's routes against the model's recomputation of the same tokens.

A Hugging Face trace checked against its own model differs nowhere; the same trace with a known set of rows
corrupted (zeroed, duplicated from the previous token, shifted by one token) differs in exactly those rows,
each flagged as what it is. The figures for vLLM traces (float32, bfloat16) are in tests/serve/test_replay_check_vllm.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import moescope
from moescope.cli.main import main
from moescope.pipeline.replay_check import replay_check
from moescope.trace.block import TokenBlock
from moescope.trace.formats.dense import Imported, write_imported


@pytest.fixture(scope="module")
def hf_trace(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay-check") / "hf"
    return moescope.capture("moescope:tiny-moe", "wiki", out=out, progress=False,
                            options=moescope.CaptureOptions(max_tokens=700, seq_len=100))


def _arrays(trace):
    """The fields this test reads of the trace's shards, joined (the capture's last batch is a shard of its own)."""
    shards = list(trace.shards())
    per_token = {f: np.concatenate([getattr(s, f) for s in shards]) for f in ("seq_id", "pos", "token_id", "generated")}
    per_row = {f: np.concatenate([getattr(s, f) for s in shards], axis=1) for f in ("topk_ids", "topk_weights")}
    return SimpleNamespace(**per_token, **per_row)


def test_a_trace_checked_against_its_own_model_differs_nowhere(hf_trace, tmp_path, capsys):
    assert main(["replay-check", str(hf_trace.folder), "--model", "moescope:tiny-moe", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "tables and flagged rows in" in printed
    summary = json.loads((tmp_path / "r" / "replay_check.json").read_text())["overall"]
    assert summary["rows"] == 700 * 4
    assert summary["set_differs"] == summary["first_differs"] == 0.0
    assert summary["weight_abs_diff_mean"] == summary["weight_abs_diff_max"] == 0.0
    assert summary["zeros"] == summary["duplicated"] == summary["misaligned"] == 0


def _pick(rng, candidates: np.ndarray, n: int, taken: set) -> list[int]:
    """n tokens among candidates, none adjacent to one already taken (corruptions must not touch each other)."""
    out = []
    for t in rng.permutation(candidates):
        if len(out) == n:
            break
        if not {t - 1, t, t + 1} & taken:
            out.append(int(t))
            taken.add(int(t))
    assert len(out) == n
    return out


def test_a_known_fraction_of_corrupted_rows_is_found_exactly_and_each_kind_flagged(hf_trace, tmp_path):
    shard = _arrays(hf_trace)
    ids, weights = shard.topk_ids.copy(), shard.topk_weights.copy()  # [L, T, k]
    L, T, k = ids.shape
    sets = np.sort(ids, -1)
    prev = np.zeros(T, bool)
    prev[1:] = shard.seq_id[1:] == shard.seq_id[:-1]
    nxt = np.append(prev[1:], False)
    differs_from = lambda shift: (sets != np.roll(sets, shift, axis=1)).any(-1).all(0)  # [T]: every layer differs
    rng = np.random.default_rng(0)
    taken: set[int] = set()
    # duplicated: a token gets the previous token's rows in every layer; misaligned: the next token's routes
    dup = _pick(rng, np.flatnonzero(prev & differs_from(1)), 9, taken)
    mis = _pick(rng, np.flatnonzero(nxt & differs_from(-1)), 7, taken)
    zero_rows = [(int(l), t) for t in _pick(rng, np.arange(T), 5, taken) for l in rng.choice(L, 2, replace=False)]
    for t in dup:
        ids[:, t], weights[:, t] = ids[:, t - 1], weights[:, t - 1]
    for t in mis:
        ids[:, t], weights[:, t] = shard.topk_ids[:, t + 1], shard.topk_weights[:, t + 1]
    for l, t in zero_rows:
        ids[l, t], weights[l, t] = 0, 0.0
    block = TokenBlock(seq_id=shard.seq_id, pos=shard.pos, token_id=shard.token_id, generated=shard.generated,
                       output_entropy=np.full(T, np.nan, np.float32), topk_ids=ids, topk_weights=weights, router_output=None)
    write_imported(Imported(block, "corrupted", "test", gate_weights=True), tmp_path / "bad")

    result = replay_check(tmp_path / "bad", "moescope:tiny-moe")
    table = result["table"].set_index("layer")
    changed = (np.sort(ids, -1) != sets).any(-1)  # [L, T] rows the corruption changed, computed here
    assert changed.sum() == L * (len(dup) + len(mis)) + len(zero_rows)
    np.testing.assert_allclose(table["set_differs"].to_numpy(), [*(changed.mean(1)), changed.mean()], rtol=0, atol=0)
    first = ids[..., 0] != shard.topk_ids[..., 0]
    np.testing.assert_allclose(table["first_differs"].to_numpy(), [*(first.mean(1)), first.mean()], rtol=0, atol=0)
    assert table.loc["overall", "weight_abs_diff_max"] == 0.0  # untouched rows: the same weights, bit for bit
    flagged = {kind: set(map(tuple, g[["layer", "pos", "seq_id"]].to_numpy().tolist()))
               for kind, g in result["flagged"].groupby("kind")}
    where = lambda t: (int(shard.pos[t]), int(shard.seq_id[t]))
    assert flagged["duplicated"] == {(l, *where(t)) for t in dup for l in range(L)}
    assert flagged["misaligned"] == {(l, *where(t)) for t in mis for l in range(L)}
    assert flagged["zeros"] == {(l, *where(t)) for l, t in zero_rows}
    assert table.loc["overall", ["zeros", "duplicated", "misaligned"]].tolist() == [len(zero_rows), L * len(dup), L * len(mis)]


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(hf_trace, tmp_path, capsys):
    out = tmp_path / "r"
    trace = str(hf_trace.folder)
    assert _fails(["replay-check", str(tmp_path / "none"), "--model", "moescope:tiny-moe", "--out", str(out)],
                  capsys).startswith(f"error: {tmp_path / 'none'}")
    assert "unknown shipped model" in _fails(["replay-check", trace, "--model", "moescope:nope", "--out", str(out)], capsys)
    assert "not the trace's model" in _fails(["replay-check", trace, "--model", "moescope:tiny-varmoe", "--out", str(out)], capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert "is not empty" in _fails(["replay-check", trace, "--model", "moescope:tiny-moe", "--out", str(tmp_path / "mine")], capsys)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"problem_id": 0, "layer": 0, "token_id": 0, "expert_ids": [1, 2], "weights": [0.6, 0.4]}))
    assert main(["import", str(jsonl), "--out", str(tmp_path / "imported"), "--n-experts", "8"]) == 0
    assert "has no token ids" in _fails(["replay-check", str(tmp_path / "imported"), "--model", "moescope:tiny-moe",
                                         "--out", str(out)], capsys)
    assert not out.exists() and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
