"""run_importance against independent naive computations: full forward passes with the experts masked by the
test's own router hooks, NLL computed here from the logits; resume, lock, specialisation and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from moescope.cli.main import main
from moescope.errors import ImportanceError, InterventionError
from moescope.intervention.importance import run_importance
from moescope.quant.store import ResultStore
from moescope.quant.sweep import make_batches
from moescope.recording.loading import load_model
from moescope.trace.reader import open_trace

from tests.adapters.tiny_configs import build_tiny_model
from tests.intervention.test_intervene import _deepseek_v3_without, _hand_routed, _qwen3_without
from tests.quant.quant_models import ByteTokenizer, documents

BUDGET = dict(max_tokens=240, seq_len=48, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny_moe():
    return load_model("moescope:tiny-moe", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def swept(tiny_moe, tmp_path_factory):
    """One sweep of tiny-moe's MoE layer 0 over code and prose (no pruning), shared by the tests below."""
    out = tmp_path_factory.mktemp("importance")
    model, tokenizer = tiny_moe
    return out, run_importance(model, tokenizer, "humaneval,wiki", out=out, layers=[0], prune=False, **BUDGET)


def naive_nll(model, batches, layer=None, replace=None) -> torch.Tensor:
    """Per predicted token NLL [n] of full forward passes, with `replace` routing `layer`'s router by hand."""
    handle = _hand_routed(model, layer, replace) if replace is not None else None
    out = []
    try:
        for b in batches:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
            picked = -logp[:, :-1].gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
            out.append(picked[(b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).bool()])
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(out)


def token_domains(batches) -> np.ndarray:
    rows = [np.full(int(((b.attention_mask[r, 1:] * b.attention_mask[r, :-1]) > 0).sum()), s.domain, dtype=object)
            for b in batches for r, s in enumerate(b.sequences)]
    return np.concatenate(rows)


def test_delta_nll_per_expert_and_domain_equals_the_naive_sweep(tiny_moe, swept):
    model, tokenizer = tiny_moe
    tmp_path, res = swept
    batches = make_batches(tokenizer, "humaneval,wiki", split="eval", seq_len=48, max_tokens=240, batch_size=4)
    plain, domains = naive_nll(model, batches), token_domains(batches)
    experts = res.tables["experts"].set_index(["layer", "expert"])
    assert len(experts) == 8 and res.ran == 8
    for layer in (0,):
        for expert in range(8):
            diff = (naive_nll(model, batches, layer, _qwen3_without(expert)) - plain).numpy()
            row = experts.loc[(layer, expert)]
            assert row.delta_nll == pytest.approx(diff.mean(), abs=2e-5), (layer, expert)
            for domain in ("code", "prose"):
                assert row[f"delta_nll_{domain}"] == pytest.approx(diff[domains == domain].mean(), abs=2e-5)
    assert experts.delta_nll.abs().max() > 1e-3  # some expert matters
    assert set(res.tables) == {"experts", "correlations", "pruning", "specialisation"}
    for name in res.tables:
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{name}.parquet"), res.tables[name], check_dtype=False)
        assert (tmp_path / f"{name}.csv").exists()
    assert (tmp_path / "summary.json").exists() and (tmp_path / "trace" / "manifest.json").exists()


def _frequency_by_hand(trace, layer: int, n_experts: int) -> np.ndarray:
    counts = np.zeros(n_experts)
    tokens = 0
    for shard in trace.shards():
        for slots in shard.topk_ids[layer]:  # a per-token reference loop
            tokens += 1
            for e in slots:
                counts[e] += 1
    return counts / tokens


def test_pruning_curve_point_equals_naive_masked_forward_on_deepseek_v3(tmp_path):
    model = build_tiny_model("deepseek_v3")
    tok = ByteTokenizer()
    docs = documents(6, 40)
    res = run_importance(model, tok, docs, out=tmp_path, layers=[1], **BUDGET)
    batches = make_batches(tok, docs, seq_len=48, max_tokens=240, batch_size=4)
    plain = naive_nll(model, batches)
    freq = _frequency_by_hand(open_trace(tmp_path / "trace"), 1, 8)
    order = np.lexsort((np.arange(8), freq))  # least routed first, ties by id
    pruning = res.tables["pruning"].set_index(["criterion", "n_pruned"])
    for n in (1, 3):
        drop = order[:n].tolist()
        diff = naive_nll(model, batches, 1, _deepseek_v3_without(drop, model.config)) - plain
        assert pruning.loc[("frequency", n), "delta_nll"] == pytest.approx(float(diff.mean()), abs=2e-5)
    assert pruning.loc[("none", 0), "nll"] == pytest.approx(float(plain.mean()), abs=1e-5)
    assert set(pruning.index.get_level_values(0)) == {"none", "delta_nll", "frequency", "mean_gate_weight", "reap", "random"}
    assert pruning.index.get_level_values(1).max() == 6  # down to top-k = 2 experts left
    logged = [json.loads(line)["config"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {c["replayed_decoder_layers"] for c in logged} == {2}  # MoE layer 1 is decoder layer 2: 0-1 replayed
    from moescope.reporting import write_report

    write_report([tmp_path], tmp_path / "r.html", figures_dir=tmp_path / "f")
    assert len(list((tmp_path / "f").glob("*__importance_pruning.svg"))) == 1


def test_interrupted_sweep_resumes_to_the_same_tables_and_is_locked(tmp_path, monkeypatch):
    model = build_tiny_model("qwen3_moe")
    tok, docs = ByteTokenizer(), documents(4, 30)
    kwargs = dict(layers=[2], prune=False, **BUDGET)
    whole = run_importance(model, tok, docs, out=tmp_path / "whole", **kwargs)
    append = ResultStore.append
    calls = []

    def stop_after_three(self, record):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        append(self, record)

    monkeypatch.setattr(ResultStore, "append", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_importance(model, tok, docs, out=tmp_path / "cut", **kwargs)
    monkeypatch.setattr(ResultStore, "append", append)
    resumed = run_importance(model, tok, docs, out=tmp_path / "cut", **kwargs)
    assert (resumed.ran, resumed.skipped) == (5, 3)
    columns = [c for c in whole.tables["experts"].columns]
    pd.testing.assert_frame_equal(resumed.tables["experts"][columns], whole.tables["experts"][columns])
    again = run_importance(model, tok, docs, out=tmp_path / "cut", **kwargs)  # finished: nothing redone
    assert again.ran == 0
    with _held(tmp_path / "cut"):
        with pytest.raises(ImportanceError, match="being written by another moescope importance sweep"):
            run_importance(model, tok, docs, out=tmp_path / "cut", **kwargs)


def _held(folder):
    """The folder's lock, held as a running sweep holds it."""
    import fcntl
    import os
    from contextlib import contextmanager

    @contextmanager
    def hold():
        fd = os.open(folder / ".moescope-sweep.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            os.close(fd)

    return hold()


def test_specialisation_picks_the_most_domain_specific_expert(swept):
    tmp_path, res = swept
    trace = open_trace(tmp_path / "trace")
    shard_ids = np.concatenate([s.topk_ids[0] for s in trace.shards()])
    domain = np.concatenate([np.array(s.domain_names)[s.domain] for s in trace.shards()])
    spec = res.tables["specialisation"].set_index("domain")
    for name in ("code", "prose"):
        inside = np.array([(shard_ids[domain == name] == e).sum() for e in range(8)]) / (domain == name).sum()
        outside = np.array([(shard_ids[domain != name] == e).sum() for e in range(8)]) / (domain != name).sum()
        assert spec.loc[name, "expert"] == int(np.argmax(inside - outside))
        experts = res.tables["experts"].set_index("expert")
        assert spec.loc[name, "delta_nll_domain"] == experts.loc[spec.loc[name, "expert"], f"delta_nll_{name}"]
    assert any("code-specific" in line for line in res.summary["statements"])


def test_reap_frequency_and_gate_weight_come_from_the_trace(swept):
    tmp_path, res = swept
    trace = open_trace(tmp_path / "trace")
    rows = [(e, w, n) for s in trace.shards() for ids, ws, ns in zip(s.topk_ids[0], s.topk_weights[0], s.expert_norms[0])
            for e, w, n in zip(ids, ws, ns)]  # per slot
    table = res.tables["experts"].set_index("expert")
    tokens = trace.n_tokens
    for expert in range(8):
        mine = [(w, n) for e, w, n in rows if e == expert]
        assert table.loc[expert, "frequency"] == pytest.approx(len(mine) / tokens)
        if mine:
            assert table.loc[expert, "mean_gate_weight"] == pytest.approx(np.mean([w for w, _ in mine]), rel=1e-6)
            assert table.loc[expert, "reap"] == pytest.approx(np.mean([w * n for w, n in mine]), rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--layers", "9"], "unknown MoE layer 9"),
    (["--layers", "one"], "--layers takes MoE-layer indices"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = main(["importance", "moescope:tiny-moe", "--data", "wiki", "--out", str(tmp_path / "o"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_runs_and_prints_the_answers(tmp_path, capsys):
    code = main(["importance", "moescope:tiny-moe", "--data", "wiki", "--out", str(tmp_path / "o"), "--layers", "3",
                 "--max-tokens", "160", "--seq-len", "40", "--no-prune", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "Rank correlation with ΔNLL" in out
    assert math.isfinite(pd.read_csv(tmp_path / "o" / "experts.csv").delta_nll.abs().max())
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert "specialisation" not in summary and any("two or more domains" in note for note in summary["notes"])


def test_layers_that_cannot_drop_are_skipped_or_refused(tmp_path):
    model = build_tiny_model("deepseek_v4")  # MoE layers 0-2 route by a token-id table
    with pytest.raises(InterventionError, match="hash routing"):
        run_importance(model, ByteTokenizer(), documents(2, 20), out=tmp_path / "a", layers=[0], **BUDGET)
    res = run_importance(model, ByteTokenizer(), documents(2, 20), out=tmp_path / "b", prune=False, **BUDGET)
    assert res.summary["importance"]["moe_layers"] == [3]
    assert sum("not swept" in note for note in res.summary["notes"]) == 3


def test_report_draws_the_importance_folder(swept, tmp_path):
    from moescope.reporting import write_report

    folder, _ = swept
    html = write_report([folder], tmp_path / "r.html", figures_dir=tmp_path / "f").read_text()
    for title in ("ΔNLL per dropped expert", "Do routing statistics predict it?", "Specialisation by intervention"):
        assert title in html
    assert "ran with --no-prune" in html  # the pruning section says why it is empty
    names = sorted(p.stem.split("__")[1] for p in (tmp_path / "f").glob("*.svg"))
    assert names == ["importance_delta_nll_map", "importance_specialisation", "importance_statistics"]
