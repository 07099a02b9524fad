"""run_quant_sweep on tiny config-built models: real properties of the numbers, resume, restore, tables."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from quant_models import ByteTokenizer, documents, qwen3_dense, qwen3_moe, varmoe, varmoe_router
from moescope.quant import make_format, quantize, run_quant_sweep
from moescope.quant import sweep as sweep_module
from moescope.quant.formats import QuantConfigError

DOCS = documents(8, 50)
BUDGET = dict(max_tokens=600, seq_len=64, batch_size=4, progress=False)


def _sweep(model, out, **kw):
    return run_quant_sweep(model, ByteTokenizer(), DOCS, out=out, **{**BUDGET, **kw})


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _metrics(frame):
    return frame.drop(columns=["seconds"]).set_index("config_id").sort_index()


def test_local_flip_rate_falls_with_bits_and_vanishes_at_16(tmp_path):
    model = qwen3_moe()
    res = _sweep(model, tmp_path, targets="router", bits=(2, 4, 8, 16), schemes=("rtn-sym", "rtn-asym"),
                 end_to_end=False)
    for scheme in ("rtn-sym", "rtn-asym"):
        rows = res.configs[res.configs.scheme == scheme].set_index("bits")
        flips = rows["flip_topk_set_local"]
        assert flips[2] > flips[4] > flips[8], flips
        assert rows.loc[16, "flip_top1_local"] == 0 and flips[16] == 0
        assert rows.loc[16, "kl_local"] < rows.loc[8, "kl_local"] / 100 < rows.loc[2, "kl_local"] / 100
        assert (rows["jaccard_local"].diff().dropna() > 0).all()  # agreement rises with bits
    assert res.summary["reference"]["moe"]["local_reference_agreement"] == [1.0, 1.0, 1.0]
    assert res.configs["nll"].isna().all()  # local only: no quality without a forward pass


def _router_inputs(model, ids, mask):
    inputs = []
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    handles = [r.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]))) for r in routers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    keep = mask.reshape(-1).bool()
    return [x[keep].double().numpy() for x in inputs], routers


def test_local_flips_match_an_independent_numpy_computation(tmp_path):
    model = qwen3_moe()
    res = _sweep(model, tmp_path, targets="router", bits=(3,), per_layer=True, end_to_end=False)
    batches = sweep_module.make_batches(ByteTokenizer(), DOCS, seq_len=64, max_tokens=600, batch_size=4)
    per_batch = [_router_inputs(model, b.input_ids, b.attention_mask) for b in batches]
    routers = per_batch[0][1]
    fmt = make_format("rtn-asym", 3, "channel")
    for layer, router in enumerate(routers):
        x = np.concatenate([xs[layer] for xs, _ in per_batch])
        w = router.weight.detach().double().numpy()
        w_q = quantize(router.weight.detach(), fmt)[0].double().numpy()
        top = lambda logits: np.sort(np.argsort(-logits, axis=-1, kind="stable")[:, :2], axis=-1)  # noqa: E731
        expected = float((top(x @ w.T) != top(x @ w_q.T)).any(-1).mean())
        row = res.per_layer[(res.per_layer.layer == layer) & (res.per_layer["mode"] == "local")]
        assert len(row) == 1 and row.iloc[0].n_tokens == len(x)
        assert row.iloc[0].flip_topk_set == pytest.approx(expected, abs=2 / len(x))


def test_end_to_end_with_dense_control(tmp_path):
    model, dense = qwen3_moe(), qwen3_dense()
    snap, dense_snap = _snapshot(model), _snapshot(dense)
    res = _sweep(model, tmp_path, targets=("router", "experts", "attention", "all"), bits=(2, 8), dense_model=dense,
                 per_layer=True)
    c = res.configs.set_index("config_id")
    # the dense control runs the targets it has; experts means its MLPs
    dense_ids = {i for i in c.index if i.startswith("dense:")}
    assert {i.split(":")[1] for i in dense_ids} == {"experts", "attention", "all"}
    mlp_params = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    assert c.loc["dense:experts:rtn-asym:channel:2b:all", "n_params"] == mlp_params
    # quality falls with bits, for both models
    for kind in ("moe", "dense"):
        assert c.loc[f"{kind}:all:rtn-asym:channel:2b:all", "delta_nll"] > c.loc[f"{kind}:all:rtn-asym:channel:8b:all", "delta_nll"]
    # router-only: the first MoE layer sees an unchanged input, so end-to-end equals local there
    pl = res.per_layer
    first = pl[(pl.config_id == "moe:router:rtn-asym:channel:2b:all") & (pl.moe_layer == 0)].set_index("mode")
    assert first.loc["e2e", "flip_topk_set"] == pytest.approx(first.loc["local", "flip_topk_set"], abs=2 / first.loc["e2e", "n_tokens"])
    assert first.loc["e2e", "kl"] == pytest.approx(first.loc["local", "kl"], rel=1e-3)
    # experts of the last layer can change no router: zero downstream change
    last = pl[(pl.config_id == "moe:experts:rtn-asym:channel:2b:L2") & (pl["mode"] == "e2e")]
    assert (last.flip_topk_set == 0).all() and (last.kl.abs() < 1e-9).all()
    # ...but experts of layer 0 do change the routing of later layers
    assert c.loc["moe:experts:rtn-asym:channel:2b:L0", "flip_topk_set_e2e"] > 0
    assert c[c.target == "experts"]["flip_top1_local"].isna().all()
    # summary answers the hypothesis per bit width with numbers, and lines up the dense control
    answers = {a["bits"]: a for a in res.summary["router_vs_experts"]}
    assert set(answers) == {2, 8}
    assert answers[2]["router"]["n_params"] == 3 * 8 * 64 and answers[2]["router_costs_more_per_param"] in ("yes", "no", "inconclusive")
    assert {d["target"] for d in res.summary["dense_control"]} == {"experts", "attention", "all"}
    # tables on disk, both formats
    for name, frame in (("configs", res.configs), ("per_layer", res.per_layer)):
        assert len(pd.read_parquet(tmp_path / f"{name}.parquet")) == len(pd.read_csv(tmp_path / f"{name}.csv")) == len(frame)
    assert json.loads((tmp_path / "summary.json").read_text())["configs"] == len(res.configs)
    for m, s in ((model, snap), (dense, dense_snap)):
        assert all(torch.equal(p, s[n]) for n, p in m.named_parameters())


def test_prefix_replay_gives_the_same_numbers(tmp_path):
    model = qwen3_moe()
    kw = dict(targets=("router", "attention"), bits=(3,), per_layer=True)
    fast = _sweep(model, tmp_path / "fast", **kw)
    slow = _sweep(model, tmp_path / "slow", reuse_prefix=False, **kw)
    assert fast.per_layer["replayed"].any() and not slow.per_layer["replayed"].any()
    pd.testing.assert_frame_equal(_metrics(fast.configs), _metrics(slow.configs), rtol=1e-5, atol=1e-7)


def test_resume_runs_only_unfinished_configs(tmp_path, monkeypatch):
    model = qwen3_moe()
    kw = dict(targets=("router", "experts"), bits=(2, 4))
    full = _sweep(model, tmp_path / "full", **kw)
    assert full.ran == 4

    real, calls = sweep_module._Evaluator.evaluate, []

    def crash_on_third(self, cfg, weights):
        calls.append(cfg.config_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, cfg, weights)

    monkeypatch.setattr(sweep_module._Evaluator, "evaluate", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _sweep(model, tmp_path / "cut", **kw)
    monkeypatch.setattr(sweep_module._Evaluator, "evaluate", real)
    log = tmp_path / "cut" / "results.jsonl"
    assert len(log.read_text().splitlines()) == 2
    with open(log, "ab") as fh:  # a kill in the middle of a write leaves a torn line
        fh.write(b'{"config": {"config_id": "moe:experts:rtn-asym:chan')
    resumed = _sweep(model, tmp_path / "cut", **kw)
    assert (resumed.ran, resumed.skipped) == (2, 2)
    assert all(json.loads(line) for line in log.read_text().splitlines())
    pd.testing.assert_frame_equal(_metrics(resumed.configs), _metrics(full.configs), rtol=1e-9)
    again = _sweep(model, tmp_path / "cut", **{**kw, "bits": (2, 4, 8)})  # widening the sweep adds only the new ones
    assert (again.ran, again.skipped) == (2, 4) and len(again.configs) == 6
    with pytest.raises(QuantConfigError, match="another model, corpus"):
        run_quant_sweep(model, ByteTokenizer(), documents(8, 50, seed=1), out=tmp_path / "cut", **{**BUDGET, **kw})


def test_resume_after_sigkill(tmp_path):
    """A forked child commits two configurations and is SIGKILLed; the parent resumes its folder."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            real = sweep_module.ResultStore.append

            def append_then_die(self, record):
                real(self, record)
                if len(self.done) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

            sweep_module.ResultStore.append = append_then_die
            _sweep(qwen3_moe(), tmp_path, targets="router", bits=(2, 3, 4, 8))
        finally:
            os._exit(3)  # not killed: the test fails on the exit status
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "configs.parquet").exists()
    res = _sweep(qwen3_moe(), tmp_path, targets="router", bits=(2, 3, 4, 8))
    assert (res.ran, res.skipped, len(res.configs)) == (2, 2, 4)


def test_local_only_sweep_runs_no_forward_pass_per_config(tmp_path):
    model = qwen3_moe()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    res = _sweep(model, tmp_path, targets="router", bits=(2, 3, 4, 8), per_layer=True, end_to_end=False)
    handle.remove()
    n_batches = len(sweep_module.make_batches(ByteTokenizer(), DOCS, seq_len=64, max_tokens=600, batch_size=4))
    assert len(res.configs) == 4 * 4 and len(calls) == n_batches  # the reference pass only
    with pytest.raises(QuantConfigError, match="end-to-end"):
        _sweep(model, tmp_path / "x", targets="experts", end_to_end=False)


def test_custom_router_with_per_expert_linear_experts(tmp_path):
    model = varmoe()
    res = _sweep(model, tmp_path, targets=("router", "experts"), bits=(2, 8), custom_router=varmoe_router())
    c = res.configs.set_index("target")
    assert res.summary["reference"]["moe"]["local_reference_agreement"] == [1.0, 1.0]
    router = res.configs[res.configs.target == "router"].set_index("bits")
    assert router.loc[2, "flip_topk_set_local"] > router.loc[8, "flip_topk_set_local"]
    assert c.loc["experts", "n_params"].tolist() == [2 * 3 * 32 * (48 + 48 + 16 + 16)] * 2
    assert not math.isnan(router.loc[2, "delta_nll"])


def test_reference_nll_equals_the_models_own_loss(tmp_path):
    model = qwen3_moe()
    res = _sweep(model, tmp_path, targets="router", bits=(8,), end_to_end=False)
    total, count = 0.0, 0
    for b in sweep_module.make_batches(ByteTokenizer(), DOCS, seq_len=64, max_tokens=600, batch_size=4):
        labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
        with torch.no_grad():
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert res.summary["reference"]["moe"]["tokens_predicted"] == count
    assert res.summary["reference"]["moe"]["nll"] == pytest.approx(total / count, rel=1e-5)
