"""TensorRT-LLM expert statistics, written here by hand in its layout -> a load table, or a trace."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
from safetensors.numpy import save_file

from moescope.cli.main import main
from moescope.trace.load_table import read_load_table

E, K, ITERS, MOE_LAYERS, RANKS = 8, 2, (5, 6, 7), (1, 3), 2  # decoder layers 0 and 2 are dense


@pytest.fixture
def statistic(tmp_path):
    """An EXPERT_STATISTIC_PATH folder of two ranks; returns (folder, ids {(rank, iter, layer): [n, k]})."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "expert_statistic"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": K}))
    ids = {}
    for rank in range(RANKS):
        counts, tokens = {}, {}
        for it in ITERS:
            n = int(rng.integers(1, 20))
            for layer in MOE_LAYERS:
                chosen = np.argsort(rng.random((n, E)), -1)[:, :K].astype(np.int32)
                ids[rank, it, layer] = chosen
                counts[f"{it}_{layer}"] = np.bincount(chosen.ravel(), minlength=E).astype(np.int64)
                tokens[f"{it}_{layer}"] = chosen
        save_file(counts, str(folder / f"rank{rank}.safetensors"))
        save_file(tokens, str(folder / f"token_selected_experts_rank{rank}.safetensors"))
    return folder, ids


def test_counts_become_a_load_table_summed_over_ranks(tmp_path, statistic):
    folder, ids = statistic
    assert main(["import", str(folder), "--format", "trtllm", "--out", str(tmp_path / "load.parquet")]) == 0
    table = read_load_table(tmp_path / "load.parquet")
    assert table.windows.tolist() == list(ITERS)
    for w, it in enumerate(ITERS):
        for l, layer in enumerate(MOE_LAYERS):
            expected = sum(np.bincount(ids[r, it, layer].ravel(), minlength=E) for r in range(RANKS))
            np.testing.assert_array_equal(table.tokens[w, l], expected)


def test_per_token_files_become_a_trace_with_one_sequence_per_rank_and_iteration(tmp_path, statistic):
    folder, ids = statistic
    assert main(["import", str(folder), "--format", "trtllm", "--out", str(tmp_path / "t")]) == 0
    keys = sorted({(r, it) for r, it, _ in ids})
    for l, layer in enumerate(MOE_LAYERS):
        rows = duckdb.sql(f"select topk_ids from read_parquet('{tmp_path}/t/routing/*.parquet') where layer = {l} "
                          "order by seq_id, pos").fetchnumpy()["topk_ids"]
        np.testing.assert_array_equal(np.stack(rows), np.concatenate([ids[r, it, layer] for r, it in keys]))
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["capture"]["decoder_layers"] == list(MOE_LAYERS) and manifest["layers"][0]["n_experts"] == E


def _fails(tmp_path, folder, capsys, out="load.parquet") -> str:
    assert main(["import", str(folder), "--format", "trtllm", "--out", str(tmp_path / out)]) == 2
    assert not (tmp_path / out).exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}")
    return lines[0]


def test_malformed_statistics_are_one_line_naming_the_file(tmp_path, statistic, capsys):
    folder, _ = statistic
    save_file({"5_1": np.zeros(E + 1, np.int64)}, str(folder / "rank0.safetensors"))
    assert "must hold 8 non-negative counts" in _fails(tmp_path, folder, capsys)
    save_file({"five_1": np.zeros(E, np.int64)}, str(folder / "rank0.safetensors"))
    assert "not an integer '<iteration>_<layer>' entry" in _fails(tmp_path, folder, capsys)
    (folder / "rank0.safetensors").write_bytes(b"junk")
    assert "not a safetensors file" in _fails(tmp_path, folder, capsys)
    (folder / "meta_info.json").write_text("{}")
    assert "num_experts" in _fails(tmp_path, folder, capsys)
    (folder / "meta_info.json").unlink()
    assert "meta_info.json: missing" in _fails(tmp_path, folder, capsys, out="t")


def test_a_counts_only_folder_cannot_be_a_trace(tmp_path, statistic, capsys):
    folder, _ = statistic
    for rank in range(RANKS):
        (folder / f"token_selected_experts_rank{rank}.safetensors").unlink()
    assert "--out FILE.parquet" in _fails(tmp_path, folder, capsys, out="t")


LOGICAL, SLOTS = 6, 8  # the load balancer's 8 slots hold 6 experts (two replicated)


@pytest.fixture
def slotted(tmp_path):
    """Statistics of a load-balanced run: ids are slots; returns (folder, slot map file, logical ids {(it, layer)})."""
    rng = np.random.default_rng(11)
    folder = tmp_path / "balanced"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": SLOTS, "num_experts_per_token": K}))
    assignment = {layer: rng.permutation(np.arange(SLOTS) % LOGICAL).tolist() for layer in MOE_LAYERS}
    slot_map = tmp_path / "eplb.yaml"  # TensorRT-LLM's extra-options layout
    slot_map.write_text("moe_config:\n  load_balancer:\n    num_slots: 8\n    initial_global_assignments:\n" +
                        "".join(f"      {layer}: {slots}\n" for layer, slots in assignment.items()))
    counts, tokens, logical = {}, {}, {}
    for it in ITERS:
        n = int(rng.integers(1, 20))
        for layer in MOE_LAYERS:
            experts = np.argsort(rng.random((n, LOGICAL)), -1)[:, :K]  # k distinct experts, each on one of its slots
            holders = [np.flatnonzero(np.array(assignment[layer]) == e) for e in range(LOGICAL)]
            slots = np.array([[rng.choice(holders[e]) for e in row] for row in experts], dtype=np.int32)
            logical[it, layer] = experts
            counts[f"{it}_{layer}"] = np.bincount(slots.ravel(), minlength=SLOTS).astype(np.int64)
            tokens[f"{it}_{layer}"] = slots
    save_file(counts, str(folder / "rank0.safetensors"))
    save_file(tokens, str(folder / "token_selected_experts_rank0.safetensors"))
    return folder, slot_map, logical


def test_slot_counts_become_logical_expert_counts_with_the_slot_map(tmp_path, slotted):
    folder, slot_map, logical = slotted
    assert main(["import", str(folder), "--format", "trtllm", "--slot-map", str(slot_map),
                 "--out", str(tmp_path / "load.parquet")]) == 0
    table = read_load_table(tmp_path / "load.parquet")
    expected = np.array([[np.bincount(logical[it, layer].ravel(), minlength=LOGICAL) for layer in MOE_LAYERS]
                         for it in ITERS])  # [W, L, E] counted from the logical ids, replicas summed
    np.testing.assert_array_equal(table.tokens, expected)


def test_slot_ids_become_logical_expert_ids_with_the_slot_map(tmp_path, slotted):
    folder, slot_map, logical = slotted
    assert main(["import", str(folder), "--format", "trtllm", "--slot-map", str(slot_map),
                 "--out", str(tmp_path / "t")]) == 0
    got = duckdb.sql(f"select layer, seq_id, pos, topk_ids from read_parquet('{tmp_path}/t/routing/*.parquet') "
                     "order by layer, seq_id, pos").fetchnumpy()
    expected = np.concatenate([np.concatenate([logical[it, layer] for it in ITERS]) for layer in MOE_LAYERS])
    np.testing.assert_array_equal(np.stack(got["topk_ids"]), expected)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert {layer["n_experts"] for layer in manifest["layers"]} == {LOGICAL}


def test_slots_without_their_map_are_refused_in_one_line_before_writing(tmp_path, slotted, capsys):
    folder, _, _ = slotted
    for out in ("load.parquet", "t"):
        assert main(["import", str(folder), "--format", "trtllm", "--n-experts", str(LOGICAL),
                     "--out", str(tmp_path / out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {folder}: meta_info.json counts {SLOTS} experts but --n-experts is {LOGICAL}: these are "
            "load-balancer slots; give their assignment with --slot-map FILE"]
        assert not (tmp_path / out).exists()


def test_a_statistics_prefix_on_s3_becomes_a_load_table_there(tmp_path, statistic, s3, capsys):
    """Input folder and output table on the object store: the table the local import writes, byte for byte."""
    from moescope.trace.storage import location

    folder, _ = statistic
    for path in folder.iterdir():
        location(f"{s3}/expert_statistic").upload(path.name, path)
    assert main(["import", str(folder), "--format", "trtllm", "--out", str(tmp_path / "load.parquet")]) == 0
    assert main(["import", f"{s3}/expert_statistic", "--format", "trtllm", "--out", f"{s3}/load.parquet"]) == 0
    assert location(s3).read_bytes("load.parquet") == (tmp_path / "load.parquet").read_bytes()
    capsys.readouterr()
    assert main(["import", f"{s3}/expert_statistic", "--format", "trtllm", "--out", f"{s3}/load.parquet"]) == 2
    assert "exists" in capsys.readouterr().err
    # analyze reads the table from the store and writes its results there: what it writes from and to a folder
    assert main(["analyze", str(tmp_path / "load.parquet"), "--out", str(tmp_path / "res")]) == 0
    assert main(["analyze", f"{s3}/load.parquet", "--out", f"{s3}/res"]) == 0
    names = sorted(p.name for p in (tmp_path / "res").iterdir())
    assert sorted(location(f"{s3}/res").list()) == names
    for name in names:
        if name.endswith(".csv"):
            assert location(f"{s3}/res").read_bytes(name) == (tmp_path / "res" / name).read_bytes(), name
