"""vLLM's routed experts in its documented layouts (built here by hand) -> a trace, checked value by value.

vLLM's own routed-experts output cannot be produced on these machines (it needs the V2 model runner, which
needs Triton); tests/serve/test_vllm_own_routes.py compares it with moescope's `--backend vllm` where it can.
"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import duckdb
import numpy as np
import pytest

from moescope.cli.main import main
from moescope.trace.formats.dense import write_imported
from moescope.trace.formats.vllm import read_request_outputs

E, K, DECODER_LAYERS, DENSE = 8, 2, 4, 0  # decoder layer 0 is dense: vLLM leaves its rows zero


def routes(rng, n_tokens: int) -> np.ndarray:
    """uint8 [T, decoder layers, k]: k distinct experts per token and MoE layer, zeros in the dense layer."""
    picks = np.argsort(rng.random((n_tokens, DECODER_LAYERS, E)), axis=-1)[..., :K].astype(np.uint8)
    picks[:, DENSE] = 0
    return picks


def npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def read_back(folder):
    routing = duckdb.sql(f"select seq_id, pos, layer, topk_ids from read_parquet('{folder}/routing/*.parquet') "
                         "order by layer, seq_id, pos").fetchnumpy()
    tokens = duckdb.sql(f"select seq_id, pos, token_id, generated from read_parquet('{folder}/tokens/*.parquet') "
                        "order by seq_id, pos").fetchnumpy()
    return routing, tokens


@pytest.fixture
def requests():
    """(prompt ids, generated ids, rows [R, layers, k], first routed position) of four requests, awkward sizes."""
    rng = np.random.default_rng(0)
    out = []
    for n_prompt, n_gen, start in ((1, 1, 0), (7, 4, 0), (33, 1, 0), (12, 6, 5)):  # the last skips 5 prompt rows
        prompt, gen = rng.integers(0, 1000, n_prompt).tolist(), rng.integers(0, 1000, n_gen).tolist()
        out.append((prompt, gen, routes(rng, n_prompt + n_gen - 1 - start), start))
    return out


def expected(requests):
    """What the trace must hold, computed from the requests without moescope."""
    ids, seq, pos, tok, gen = [], [], [], [], []
    for i, (prompt, generated, rows, start) in enumerate(requests):
        fed = (prompt + generated[:-1])[start:]
        ids.append(rows[:, 1:])  # drop the dense decoder layer
        seq += [i] * len(fed)
        pos += list(range(start, start + len(fed)))
        tok += fed
        gen += [p >= len(prompt) for p in range(start, start + len(fed))]
    ids = np.concatenate(ids).transpose(1, 0, 2)  # [L, T, k]
    return ids, np.array(seq), np.array(pos), np.array(tok), np.array(gen)


def check(folder, requests):
    ids, seq, pos, tok, gen = expected(requests)
    routing, tokens = read_back(folder)
    L, T, _ = ids.shape
    np.testing.assert_array_equal(np.stack(routing["topk_ids"]).reshape(L, T, K), ids)
    np.testing.assert_array_equal(tokens["seq_id"], seq)
    np.testing.assert_array_equal(tokens["pos"], pos)
    np.testing.assert_array_equal(tokens["token_id"], tok)
    np.testing.assert_array_equal(tokens["generated"], gen)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["capture"]["format"] == "vllm" and manifest["capture"]["gate_weights"] is False
    assert manifest["capture"]["decoder_layers"] == [1, 2, 3]
    assert [layer["top_k"] for layer in manifest["layers"]] == [K] * 3


def test_http_completion_responses_of_vllm_0_32(tmp_path, requests):
    lines = []
    for i, (prompt, gen, rows, _) in enumerate(requests):
        choice = {"index": 0, "text": "", "token_ids": gen, "prompt_token_ids": prompt, "routed_experts": npy_base64(rows)}
        lines.append(json.dumps({"id": f"cmpl-{i}", "object": "text_completion", "choices": [choice],
                                 "usage": {"prompt_tokens": len(prompt)}}))
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["import", str(tmp_path / "responses.jsonl"), "--format", "vllm", "--out", str(tmp_path / "t")]) == 0
    check(tmp_path / "t", requests)


def test_older_split_form_and_chat_responses_with_nested_lists(tmp_path, requests):
    lines = []
    for i, (prompt, gen, rows, start) in enumerate(requests):
        if start:
            continue  # the split form has no prompt start
        n = len(prompt)
        choice = {"index": 0, "message": {"role": "assistant", "content": ""}, "token_ids": gen,
                  "routed_experts": rows[n:].tolist()}
        lines.append(json.dumps({"id": f"chatcmpl-{i}", "object": "chat.completion", "prompt_token_ids": prompt,
                                 "prompt_routed_experts": rows[:n].tolist(), "choices": [choice]}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines))
    assert main(["import", str(tmp_path / "chat.jsonl"), "--format", "vllm", "--out", str(tmp_path / "t")]) == 0
    check(tmp_path / "t", [r for r in requests if not r[3]])


def test_request_output_objects_from_llm_generate(tmp_path, requests):
    outputs = [SimpleNamespace(request_id=str(i), prompt_token_ids=prompt, outputs=[
        SimpleNamespace(index=0, token_ids=gen, routed_experts=rows)]) for i, (prompt, gen, rows, _) in enumerate(requests)]
    write_imported(read_request_outputs(outputs), tmp_path / "t")
    check(tmp_path / "t", requests)


def _bad_line(tmp_path, response: dict, capsys) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(response) + "\n")
    assert main(["import", str(path), "--format", "vllm", "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}")
    return err[0]


@pytest.mark.parametrize("choice, message", [
    ({"token_ids": [1], "prompt_token_ids": [1, 2], "routed_experts": "not base64!"}, "not base64 of a .npy array"),
    ({"token_ids": [1], "prompt_token_ids": [1, 2], "routed_experts": None}, "no routed_experts"),
    ({"token_ids": [1], "routed_experts": [[[1, 2]]] * 2}, "return_token_ids=true"),
    ({"token_ids": [1], "prompt_token_ids": [1, 2], "routed_experts": [[[1, 2]]] * 3}, "3 routed tokens for a request"),
    ({"token_ids": [1], "prompt_token_ids": [1, 2], "routed_experts": [[[1.5, 2]]] * 2}, "must be integer"),
    ({"token_ids": [1], "prompt_token_ids": [1, 2], "routed_experts": [[[0, 0]]] * 2}, "every routed expert is 0"),
    ({"token_ids": [1], "prompt_token_ids": [1, 2], "routed_experts": [[[3, 3]]] * 2}, "the same expert twice"),
])
def test_malformed_responses_are_one_line_naming_the_file_and_write_nothing(tmp_path, capsys, choice, message):
    assert message in _bad_line(tmp_path, {"choices": [choice]}, capsys)


def test_a_pickled_array_is_refused_not_loaded(tmp_path, capsys):
    buffer = io.BytesIO()
    np.save(buffer, np.array([[[object()]]], dtype=object), allow_pickle=True)
    choice = {"token_ids": [1], "prompt_token_ids": [1], "routed_experts": base64.b64encode(buffer.getvalue()).decode()}
    assert "not base64 of a .npy array" in _bad_line(tmp_path, {"choices": [choice]}, capsys)


def test_not_json_and_missing_file(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("{nope\n")
    assert main(["import", str(tmp_path / "x.jsonl"), "--format", "vllm", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'x.jsonl'}:1: not valid JSON"
    assert main(["import", str(tmp_path / "none.jsonl"), "--format", "vllm", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"
    assert not (tmp_path / "t").exists()


def _responses_without_expert(tmp_path, requests, missing: int):
    """The requests' HTTP responses with expert `missing` never routed to (replaced by another id)."""
    lines = []
    for i, (prompt, gen, rows, _) in enumerate(requests):
        rows = rows.copy()
        for r in np.argwhere(rows == missing):  # swap in an expert the row does not hold
            free = sorted(set(range(E)) - {missing} - set(rows[r[0], r[1]].tolist()))
            rows[tuple(r)] = free[0]
        choice = {"index": 0, "token_ids": gen, "prompt_token_ids": prompt, "routed_experts": npy_base64(rows)}
        lines.append(json.dumps({"id": f"cmpl-{i}", "choices": [choice]}))
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_n_experts_keeps_an_expert_never_routed_to_and_its_absence_is_said(tmp_path, requests, capsys):
    """issue 12.7 for engine files: vLLM's responses carry no expert count, so the largest id seen would
    silently drop expert E-1 when nothing was routed to it."""
    path = _responses_without_expert(tmp_path, requests, missing=E - 1)
    assert main(["import", str(path), "--format", "vllm", "--out", str(tmp_path / "given"), "--n-experts", str(E)]) == 0
    layers = json.loads((tmp_path / "given" / "manifest.json").read_text())["layers"]
    assert {(layer["n_experts"], layer["n_experts_inferred"]) for layer in layers} == {(E, False)}
    capsys.readouterr()
    assert main(["import", str(path), "--format", "vllm", "--out", str(tmp_path / "inferred")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{E - 1} experts inferred" in err[0]
    layers = json.loads((tmp_path / "inferred" / "manifest.json").read_text())["layers"]
    assert {(layer["n_experts"], layer["n_experts_inferred"]) for layer in layers} == {(E - 1, True)}
    assert main(["import", str(path), "--format", "vllm", "--out", str(tmp_path / "small"), "--n-experts", "3"]) == 2


def test_rerunning_a_finished_engine_import_writes_nothing(tmp_path, requests):
    path = _responses_without_expert(tmp_path, requests, missing=E - 1)
    argv = ["import", str(path), "--format", "vllm", "--out", str(tmp_path / "t"), "--n-experts", str(E)]
    assert main(argv) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "t").rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "t").rglob("*") if p.is_file()} == before


def top1_npz(tmp_path) -> tuple[object, np.ndarray]:
    """A top-1 model's replay .npz: decoder layer 0 dense, layer 2 routed every token to expert 0 (rows of zeros)."""
    rng = np.random.default_rng(4)
    rows = rng.integers(1, E, (9, DECODER_LAYERS, 1)).astype(np.uint8)  # [T, layers, 1]
    rows[:, 0] = 0
    rows[:, 2] = 0
    np.savez(tmp_path / "top1.npz", routed_experts_0=rows, token_ids_0=np.arange(9))
    return tmp_path / "top1.npz", rows


def test_a_top1_layer_routing_everything_to_expert_0_is_never_dropped_without_a_word(tmp_path, capsys):
    path, rows = top1_npz(tmp_path)
    assert main(["import", str(path), "--format", "vllm", "--n-experts", str(E), "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}: decoder layer(s) [0, 2] routed every token to expert 0 or are dense layers (top-1 routing "
                   "cannot tell them apart); left out as dense: give --moe-layers to keep them"]
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["capture"]["decoder_layers"] == [1, 3] and manifest["capture"]["dense_or_expert0_layers"] == [0, 2]


def test_moe_layers_keeps_a_top1_layer_that_routed_everything_to_expert_0(tmp_path, capsys):
    path, rows = top1_npz(tmp_path)
    assert main(["import", str(path), "--format", "vllm", "--moe-layers", "1,2,3", "--n-experts", str(E),
                 "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().err == ""
    routing, _ = read_back(tmp_path / "t")
    np.testing.assert_array_equal(np.stack(routing["topk_ids"]).reshape(3, 9, 1), rows[:, 1:].transpose(1, 0, 2))
    assert (np.stack(routing["topk_ids"]).reshape(3, 9)[1] == 0).all()  # decoder layer 2: every token to expert 0
    assert main(["import", str(path), "--format", "vllm", "--moe-layers", "1,7", "--out", str(tmp_path / "u")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: --moe-layers [7] not among the 4 decoder layers of routed_experts"
    assert main(["import", str(path), "--format", "sglang", "--moe-layers", "1", "--out", str(tmp_path / "v")]) == 2
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()
