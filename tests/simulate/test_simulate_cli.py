"""`moescope placement` and `moescope offload` end to end on real tiny-moe traces: what they write against plain
loops over the trace, the cost model against the model's real parameters, the report, and bad command lines."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import reference_placement as ref
from simulate_helpers import generated_trace, lookahead_trace, trace_shards  # noqa: F401 (fixtures)

from moescope.cli.main import main
from moescope.simulate.cost import LINKS
from moescope.analysis.reference import placement as per_token
from moescope.trace.exchange import import_jsonl
from moescope.trace.reader import open_trace


def _main(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's usage errors
        return exit_.code


def _tokens_in_order(folder):
    """Per token of the trace, in order: (layer-major ids [L][k], generated)."""
    shards, ctx = trace_shards(folder)
    ids = np.concatenate([s.topk_ids for s in shards], axis=1)  # [L, T, k]
    return ids, np.concatenate([s.generated for s in shards]), ctx


def test_placement_writes_eplb_inputs_and_what_each_placement_does(generated_trace, tmp_path, capsys):
    out = tmp_path / "placement"
    assert _main(["placement", generated_trace, "--gpus", 4, "--nodes", 2, "--window", 97, "--out", out]) == 0
    shards, ctx = trace_shards(generated_trace)
    L, E, k = ctx.n_layers, ctx.n_experts, ctx.top_k
    p2l = {policy: np.load(out / f"physical_to_logical_{policy}.npy").tolist() for policy in ("static", "greedy", "eplb")}
    loops = per_token.compute(shards, ctx, p2l, 4, 2, 97)  # per-token loops over the trace
    load = loops["load"]
    assert np.load(out / "load_matrix.npy").tolist() == load
    table = pd.read_parquet(out / "placement__load_matrix.parquet")
    assert table.pivot(index="layer", columns="expert", values="tokens").to_numpy().tolist() == load
    w = [[float(x) for x in row] for row in load]
    assert p2l == {"eplb": ref.eplb(w, E + 4, 2, 2, 4), "greedy": ref.greedy(w, 4, 4), "static": ref.static(L, E, E + 4)}
    mapping = pd.read_parquet(out / "placement__mapping.parquet")
    fanout = pd.read_parquet(out / "placement__fanout.parquet")
    for policy, layout in p2l.items():
        rows = mapping[mapping["policy"] == policy].sort_values(["layer", "gpu", "slot"])
        assert rows["expert"].to_numpy().reshape(L, -1).tolist() == layout  # (layer, gpu, slot, expert) in slot order
        l2p = np.load(out / f"logical_to_physical_{policy}.npy")
        assert all(sorted(s for s in l2p[l, e] if s >= 0) == [s for s, x in enumerate(layout[l]) if x == e]
                   for l in range(L) for e in range(E))
        mine = fanout[fanout["policy"] == policy].sort_values(["layer", "touched"])
        assert mine["tokens_gpus"].to_numpy().reshape(L, k + 1).tolist() == loops["fanout"][policy]
        assert mine["tokens_nodes"].to_numpy().reshape(L, k + 1).tolist() == loops["fanout_nodes"][policy]
    # staleness over windows of exactly 97 tokens in trace order
    stale = pd.read_parquet(out / "placement__staleness.parquet")
    windows = [[[float(x) for x in row] for row in window] for window in loops["windows"]]
    for policy, place in (("eplb", lambda w: ref.eplb(w, E + 4, 2, 2, 4)), ("greedy", lambda w: ref.greedy(w, 4, 4))):
        rows = stale[(stale["policy"] == policy) & (stale["layer"] == 0)].sort_values("window")
        assert rows["window"].tolist() == list(range(1, len(windows)))
        assert rows["tokens"].sum() == sum(s.n_tokens for s in shards) - 97 and (rows["tokens"].iloc[:-1] == 97).all()
        for (_, row), before, now in zip(rows.iterrows(), windows[:-1], windows[1:]):
            for column, layout in (("balancedness_stale", place(before)), ("balancedness_fresh", place(now))):
                loads = per_token.gpu_loads(layout, now, 4)[0]
                assert row[column] == pytest.approx(sum(loads) / 4 / max(loads)), (policy, column)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["window"] == 97 and "placement" in summary["analyses"]
    assert _main(["placement", generated_trace, "--gpus", 4, "--out", out]) == 0  # rerun into its own folder
    assert "balancedness_eplb" in capsys.readouterr().out


def test_placement_budgets_lp_split_coactivation_and_decode_batches_equal_plain_loops(generated_trace, tmp_path):
    from test_decode_batches import plain_distinct, plain_group, plain_requests

    from moescope.analysis.placement_coactivation import SLACK
    from moescope.analysis.reference.rows import real, token_rows

    out = tmp_path / "placement"
    assert _main(["placement", generated_trace, "--gpus", 4, "--nodes", 2, "--window", 97, "--decode-batch", 3,
                  "--out", out]) == 0
    shards, ctx = trace_shards(generated_trace)
    L, E = ctx.n_layers, ctx.n_experts
    together = [[[0] * E for _ in range(E)] for _ in range(L)]
    for row in token_rows(shards):
        for layer in range(L):
            chosen = set(real(row.experts[layer], E))
            for i in chosen:
                for j in chosen:
                    together[layer][i][j] += 1
    p2l = {policy: np.load(out / f"physical_to_logical_{policy}.npy").tolist() for policy in ("eplb", "coactivation")}
    loops = per_token.compute(shards, ctx, p2l, 4, 2, 97)
    w = [[float(x) for x in row] for row in loops["load"]]
    assert p2l["coactivation"] == ref.coactivation(w, together, E + 4, 4, SLACK)
    fanout = pd.read_parquet(out / "placement__fanout.parquet")
    mine = fanout[fanout["policy"] == "coactivation"].sort_values(["layer", "touched"])
    assert mine["tokens_gpus"].to_numpy().reshape(L, -1).tolist() == loops["fanout"]["coactivation"]
    # one total of redundant slots spread over the layers
    budget = pd.read_parquet(out / "placement__budget.parquet")
    assert budget["busiest_gpu_budget"].iloc[-1] == pytest.approx(ref.best_budgets(w, 4, 2, 2, 4))
    assert budget["redundant_budget"].iloc[:-1].sum() <= 4 * L
    # the stale placement of each window, split evenly and by the LP
    split = pd.read_parquet(out / "placement__split.parquet")
    windows = [[[float(x) for x in row] for row in window] for window in loops["windows"]]
    rows = split[(split["policy"] == "eplb") & (split["layer"] == 0)].sort_values("window")
    assert len(rows) == len(windows) - 1
    for (_, row), before, now in zip(rows.iterrows(), windows[:-1], windows[1:]):
        layout = ref.eplb(before, E + 4, 2, 2, 4)[0]
        assert row["balancedness_lp"] == pytest.approx(sum(now[0]) / 4 / ref.best_split_peak(layout, now[0], 4), rel=1e-7)
        assert row["balancedness_lp"] >= row["balancedness_even"] - 1e-12
    # decode batches of three requests grouped by their prefill routing
    decode = pd.read_parquet(out / "placement__decode_batches.parquet")
    requests = plain_requests(shards, ctx)
    totals, batches = plain_distinct(requests, plain_group([s for s, _ in requests], 3), 3, L)
    grouped = decode[decode["batching"] == "grouped"]
    assert grouped["mean_distinct_experts"].iloc[:-1].tolist() == pytest.approx([t / batches for t in totals])
    summary = json.loads((out / "summary.json").read_text())["analyses"]["placement"]
    assert {"balancedness_eplb_replica_budget", "stale_balancedness_lp_split_eplb", "decode_distinct_experts_grouped",
            "mean_gpus_per_token_coactivation"} <= set(summary)


def test_offload_reports_prefill_and_decode_bytes_stall_and_a_decode_bound(generated_trace, tmp_path):
    out = tmp_path / "offload"
    assert _main(["offload", generated_trace, "--capacity", "2,4", "--prefetch", "none,popularity", "--out", out]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["phases"] == ["prefill", "decode"] and summary["options"]["link"] == "pcie4x16"
    hits = pd.read_parquet(out / "offload__hit_rate.parquet")
    cost = pd.read_parquet(out / "offload__cost.parquet")
    _, generated, ctx = _tokens_in_order(generated_trace)
    expert = 3 * 128 * 256 * 2  # gate, up, down of hidden 128 x 256, bfloat16 (the shipped config)
    gbps, us = LINKS["pcie4x16"]
    for phase, tokens in (("prefill", int((~generated).sum())), ("decode", int(generated.sum()))):
        for policy in ("lru", "lfu", "arc", "belady"):
            row = hits[(hits.phase == phase) & (hits.policy == policy) & (hits.prefetch == "none") & (hits.capacity == 4)
                       & (hits.layer == -1)].iloc[0]
            misses = row.lookups - row.hits
            assert row.experts_moved == misses and row.bytes_moved == misses * expert
            c = cost[(cost.phase == phase) & (cost.policy == policy) & (cost.prefetch == "none") & (cost.capacity == 4)
                     & (cost.link == "pcie4x16")].iloc[0]
            assert c.stall_s_per_token == pytest.approx((misses * us * 1e-6 + misses * expert / (gbps * 1e9)) / tokens)
            assert c.tokens_per_s_bound == pytest.approx(1 / c.link_s_per_token)
        popular = hits[(hits.phase == phase) & (hits.prefetch == "popularity") & (hits.layer == -1)]
        assert (popular.experts_moved == popular.lookups - popular.hits + popular.prefetch_loads).all()
    assert summary["analyses"]["offload"]["decode_tokens_per_s_bound_belady_none"] > 0
    assert set(cost.link) == set(LINKS)
    assert _main(["offload", generated_trace, "--capacity", "2", "--policy", "lru", "--out", out]) == 0  # rerun


def test_offload_lossy_writes_the_knobs_table(generated_trace, tmp_path):
    out = tmp_path / "lossy"
    assert _main(["offload", generated_trace, "--capacity", "2,4", "--lossy", "drop-cold:0.5,topk:1", "--out", out]) == 0
    table = pd.read_parquet(out / "offload__lossy.parquet")
    assert set(table["knob"]) == {"lru", "drop-cold:0.5", "topk:1"} and set(table["source"]) == {"trace"}
    rates = pd.read_parquet(out / "offload__hit_rate.parquet")
    lru = table[(table["knob"] == "lru")].merge(rates[(rates["policy"] == "lru") & (rates["prefetch"] == "none")],
                                                on=["capacity", "phase", "layer"])
    assert (lru["hits_x"] == lru["hits_y"]).all() and (lru["bytes_moved_x"] == lru["bytes_moved_y"]).all()
    assert (table[table["knob"] == "lru"]["weight_discarded"] == 0).all()
    assert (table[table["knob"] == "topk:1"]["weight_discarded"] > 0).all()


def test_expert_bytes_equal_the_shipped_models_parameters(generated_trace):
    from moescope.pipeline.offload import _expert_bytes
    from moescope.recording.loading import load_model

    model, _ = load_model("moescope:tiny-moe", device="cpu")
    experts = model.model.layers[0].mlp.experts
    n_experts = experts.gate_up_proj.shape[0]
    per_expert = sum(p.numel() * p.element_size() for p in experts.parameters()) / n_experts
    trace = open_trace(generated_trace)
    _, _, ctx = _tokens_in_order(generated_trace)
    sizes = _expert_bytes(trace, ctx, None, None)
    assert sizes.shape == (ctx.n_layers, ctx.n_experts) and (sizes == per_expert).all()
    assert (_expert_bytes(trace, ctx, None, "fp8") == per_expert / 2).all()


def test_report_shows_placement_and_offloading(generated_trace, tmp_path):
    for argv in (["placement", generated_trace, "--gpus", 2, "--decode-batch", 4, "--out", tmp_path / "p"],
                 ["offload", generated_trace, "--capacity", "2,3", "--policy", "lru,belady,static,static-oracle",
                  "--lossy", "topk:1", "--out", tmp_path / "o"],
                 ["analyze", generated_trace, "--only", "placement", "--no-model", "--out", tmp_path / "a"],
                 ["report", tmp_path / "p", tmp_path / "o", tmp_path / "a", "--out", tmp_path / "r.html", "--figures", tmp_path / "f"]):
        assert _main(argv) == 0
    html = (tmp_path / "r.html").read_text()
    assert html.count("Expert placement") >= 2 and "Expert offloading" in html
    figures = {p.name.split("__")[1] for p in (tmp_path / "f").glob("*.svg")}
    assert {"placement_balancedness.svg", "placement_gpu_load.svg", "placement_staleness.svg", "offload_hit_rate_prefill.svg",
            "offload_hit_rate_decode.svg", "offload_stall_bandwidth.svg", "offload_coverage.svg", "offload_oracle_gap.svg",
            "offload_quality_frontier.svg", "placement_fanout_balance.svg", "placement_split_bound.svg",
            "placement_decode_batches.svg"} <= figures
    assert "Replica budgets" in html and "Coverage per layer and phase" in html
    assert "load_bars.svg" not in figures  # a simulation folder gets its own sections only


@pytest.fixture(scope="module")
def world(tmp_path_factory, generated_trace, lookahead_trace):
    """Copies of the traces, an imported trace (no model, no expert sizes), a file and a folder of the user's."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(generated_trace, root / "gen")
    shutil.copytree(lookahead_trace, root / "pred")
    lines = [json.dumps({"problem_id": s, "layer": l, "token_id": p, "expert_ids": [(s + p) % 3, 3], "weights": [0.6, 0.4]})
             for s in range(3) for p in range(4) for l in range(2)]
    (root / "routing.jsonl").write_text("\n".join(lines))
    import_jsonl(root / "routing.jsonl", root / "imported")
    (root / "mine.txt").write_text("keep me")
    (root / "mydir").mkdir()
    (root / "mydir" / "notes.md").write_text("keep me")
    return root


def _snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


BAD = {
    "gpus do not divide the slots": (["placement", "{w}/gen", "--gpus", "3", "--out", "{w}/new"], "does not divide the 11 expert slots"),
    "redundant without room": (["placement", "{w}/gen", "--gpus", "4", "--redundant", "6", "--out", "{w}/new"], "does not divide the 14"),
    "more redundant slots than experts": (["placement", "{w}/gen", "--gpus", "4", "--redundant", "12", "--out", "{w}/new"],
                                          "exceeds the 8 experts"),
    "gpus not a multiple of nodes": (["placement", "{w}/gen", "--gpus", "4", "--nodes", "3", "--out", "{w}/new"], "multiple of --nodes"),
    "groups do not divide experts": (["placement", "{w}/gen", "--gpus", "4", "--groups", "3", "--out", "{w}/new"], "--groups 3"),
    "zero window": (["placement", "{w}/gen", "--gpus", "4", "--window", "0", "--out", "{w}/new"], "--window"),
    "placement out is a file": (["placement", "{w}/gen", "--gpus", "4", "--out", "{w}/mine.txt"], "is a file"),
    "placement out is the user's folder": (["placement", "{w}/gen", "--gpus", "4", "--out", "{w}/mydir"], "not empty"),
    "placement of a folder that is not a trace": (["placement", "{w}/mydir", "--gpus", "4", "--out", "{w}/new"], "not a moescope trace"),
    "capacity below top-k": (["offload", "{w}/gen", "--capacity", "4,1", "--out", "{w}/new"], "--capacity 1 is below the 2 experts"),
    "decode figures without generated tokens": (["offload", "{w}/pred", "--capacity", "2", "--phase", "decode", "--out", "{w}/new"],
                                                "needs generated tokens"),
    "router lookahead without predictions": (["offload", "{w}/gen", "--capacity", "2", "--prefetch", "router-lookahead",
                                              "--out", "{w}/new"], "--predict-next-layer"),
    "unknown policy": (["offload", "{w}/gen", "--capacity", "2", "--policy", "lru,fifo", "--out", "{w}/new"], "unknown fifo"),
    "unknown prefetch": (["offload", "{w}/gen", "--capacity", "2", "--prefetch", "psychic", "--out", "{w}/new"], "unknown psychic"),
    "unknown phase": (["offload", "{w}/gen", "--capacity", "2", "--phase", "training", "--out", "{w}/new"], "unknown --phase training"),
    "unknown link": (["offload", "{w}/gen", "--capacity", "2", "--link", "pcie9", "--out", "{w}/new"], "unknown --link"),
    "negative bandwidth": (["offload", "{w}/gen", "--capacity", "2", "--bandwidth", "-3", "--out", "{w}/new"], "--bandwidth"),
    "unknown dtype": (["offload", "{w}/gen", "--capacity", "2", "--dtype", "int3", "--out", "{w}/new"], "unknown --dtype"),
    "empty capacity": (["offload", "{w}/gen", "--capacity", "", "--out", "{w}/new"], "--capacity"),
    "capacity of commas only": (["offload", "{w}/gen", "--capacity", ",", "--out", "{w}/new"], "--capacity"),
    "capacity beyond every expert": (["offload", "{w}/gen", "--capacity", "9999999999", "--out", "{w}/new"],
                                     "--capacity 9999999999 exceeds the 8 experts"),
    "global capacity beyond every expert": (["offload", "{w}/gen", "--capacity", "4,99", "--scope", "global", "--out", "{w}/new"],
                                            "--capacity 99 exceeds the 32 experts"),
    "decode batch without generated tokens": (["placement", "{w}/pred", "--gpus", "4", "--decode-batch", "4", "--out", "{w}/new"],
                                              "needs generated tokens"),
    "decode batch beyond any integer": (["placement", "{w}/gen", "--gpus", "4", "--decode-batch", "99999999999999999999",
                                         "--out", "{w}/new"], "--decode-batch 99999999999999999999"),
    "offload window beyond the trace": (["offload", "{w}/gen", "--capacity", "2", "--window", "99999999999999999999",
                                         "--out", "{w}/new"], "--window 99999999999999999999"),
    "unknown lossy knob": (["offload", "{w}/gen", "--capacity", "2", "--lossy", "skip:1", "--out", "{w}/new"], "unknown knob"),
    "lossy topk not below k": (["offload", "{w}/gen", "--capacity", "2", "--lossy", "topk:2", "--out", "{w}/new"],
                               "from 1 to 1"),
    "rerank without router output": (["offload", "{w}/gen", "--capacity", "2", "--lossy", "rerank:1", "--out", "{w}/new"],
                                     "--save-logits"),
    "lossy with one global budget": (["offload", "{w}/gen", "--capacity", "16", "--scope", "global", "--lossy", "topk:1",
                                      "--out", "{w}/new"], "cache per layer"),
    "model without data": (["offload", "{w}/gen", "--capacity", "2", "--lossy", "topk:1", "--model", "moescope:tiny-moe",
                            "--out", "{w}/new"], "--model and --data go together"),
    "model without lossy knobs": (["offload", "{w}/gen", "--capacity", "2", "--model", "moescope:tiny-moe", "--data", "wiki",
                                   "--out", "{w}/new"], "give --lossy"),
    "window beyond any integer": (["placement", "{w}/gen", "--gpus", "4", "--window", "99999999999999999999", "--out", "{w}/new"],
                                  "--window 99999999999999999999 is longer than the trace"),
    "capacity not numbers": (["offload", "{w}/gen", "--capacity", "two", "--out", "{w}/new"], "two"),
    "no expert sizes anywhere": (["offload", "{w}/imported", "--capacity", "2", "--out", "{w}/new"], "--expert-bytes"),
    "offload out is a file": (["offload", "{w}/gen", "--capacity", "2", "--out", "{w}/mine.txt"], "is a file"),
    "offload out is the user's folder": (["offload", "{w}/gen", "--capacity", "2", "--out", "{w}/mydir"], "not empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_command_line(world, capsys, case):
    argv, message = BAD[case]
    before = _snapshot(world)
    code = _main([a.format(w=world) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _snapshot(world) == before  # nothing written, nothing of the user's touched


def test_placement_of_a_load_table_equals_placement_of_the_trace_it_counts(generated_trace, tmp_path):
    """A load table (what the vLLM plugin and TensorRT-LLM's import write) is placed like the trace whose
    windows it counts: the per-token loops' window loads, written as a load table, give the trace's placements."""
    from moescope.trace.load_table import write_load_table

    shards, ctx = trace_shards(generated_trace)
    E = ctx.n_experts
    p2l_any = {p: None for p in ("static", "greedy", "eplb")}
    loops = per_token.compute(shards, ctx, {p: [list(range(E)) + [0, 1, 2, 3]] * ctx.n_layers for p in p2l_any}, 4, 2, 97)
    windows = np.array(loops["windows"], np.int64)  # [W, L, E], windows of 97 tokens counted by the loops
    (tmp_path / "table").mkdir()
    write_load_table(tmp_path / "table" / "load-000000.parquet", np.arange(len(windows) // 2), windows[: len(windows) // 2])
    write_load_table(tmp_path / "table" / "load-000001.parquet", np.arange(len(windows) // 2, len(windows)),
                     windows[len(windows) // 2:])  # a folder of window files, as the plugin writes
    from_table, from_trace = tmp_path / "from-table", tmp_path / "from-trace"
    assert _main(["placement", tmp_path / "table", "--gpus", 4, "--nodes", 2, "--out", from_table]) == 0
    assert _main(["placement", generated_trace, "--gpus", 4, "--nodes", 2, "--window", 97, "--out", from_trace]) == 0
    assert np.load(from_table / "load_matrix.npy").tolist() == loops["load"]
    w = [[float(x) for x in row] for row in loops["load"]]
    assert np.load(from_table / "physical_to_logical_eplb.npy").tolist() == ref.eplb(w, E + 4, 2, 2, 4)
    for table in ("per_layer", "staleness", "mapping", "gpu_load"):
        mine, theirs = (pd.read_parquet(f / f"placement__{table}.parquet") for f in (from_table, from_trace))
        columns = [c for c in theirs.columns if c not in ("tokens", "mean_gpus_per_token", "mean_nodes_per_token")]
        theirs = theirs[theirs["policy"] != "coactivation"].reset_index(drop=True)  # needs each token's experts
        pd.testing.assert_frame_equal(mine[columns], theirs[columns])
    assert pd.read_parquet(from_table / "placement__per_layer.parquet")["mean_gpus_per_token"].isna().all()
    assert not (from_table / "placement__fanout.parquet").exists()  # fan-out needs each token's experts
    summary = json.loads((from_table / "summary.json").read_text())
    assert summary["trace"]["windows"] == len(windows) and summary["trace"]["tokens"] is None
    assert any("load table" in note for note in summary["notes"]["placement"])
    assert _main(["report", from_table, "--out", tmp_path / "r.html"]) == 0
    assert "Expert placement" in (tmp_path / "r.html").read_text()
    code = _main(["placement", tmp_path / "table", "--gpus", 4, "--window", 50, "--out", tmp_path / "w"])
    assert code == 2 and not (tmp_path / "w").exists()  # the table's windows are its own
