"""RoutingMonitor: really training a tiny Qwen3-MoE with transformers' Trainer, and in a plain loop."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Trainer, TrainerCallback, TrainingArguments

import moescope
from moescope.errors import MoescopeError, NoRouterFoundError


def tiny_qwen3_moe(seed: int = 0):
    """Qwen3-MoE with transformers' own initialisation: routers near uniform, as a run starts."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def collapse_routers(model) -> None:
    """Force every router onto expert 0: every token carries a large constant feature (embedding column 0), and
    only expert 0's router row reads it. Softmax saturates, so training cannot undo it in a few steps."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            router = layer.mlp.gate
            router.weight.zero_()
            router.weight[0, 0] = 5.0


class Batches(torch.utils.data.Dataset):
    """Random token rows, the last rows right-padded (attention mask 0, label -100 there)."""

    def __init__(self, n: int = 64, width: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 256, (n, width), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[n // 2:, width // 2:] = 0
        self.ids[self.mask == 0] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class LogSpy(TrainerCallback):
    """Stands where Trainer puts TensorBoard and W&B: before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(model, tmp_path, monitor, steps: int = 6):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    spy = LogSpy()
    trainer = Trainer(model=model, args=args, train_dataset=Batches(), callbacks=[spy, monitor])
    trainer.train()
    spy.history = trainer.state.log_history
    return spy


def test_trainer_healthy_run_raises_no_alert_and_logs_scalars(tmp_path):
    model = tiny_qwen3_moe()
    monitor = moescope.RoutingMonitor(every=1, out=tmp_path / "monitor", dead_after=2, trend_window=3)
    spy = train(model, tmp_path, monitor)
    assert monitor.alerts == [] and not (tmp_path / "monitor" / "alerts.jsonl").exists()
    table = pd.read_parquet(tmp_path / "monitor" / "metrics.parquet")
    assert list(table.columns) == ["step", "layer", "metric", "value"]
    assert sorted(set(table["step"])) == [1, 2, 3, 4, 5, 6]
    metrics = set(table["metric"])
    assert {"load_entropy_norm", "aux_loss", "z_loss", "router_entropy", "router_entropy_norm", "top1_weight_mean",
            "n_cold", "n_dead", "load_share/0", "load_share/7"} <= metrics
    shares = table[table["metric"].str.startswith("load_share/") & (table["layer"] >= 0)]
    np.testing.assert_allclose(shares.groupby(["step", "layer"])["value"].sum(), 1.0, atol=1e-9)
    logged = [log for log in spy.logs if "loss" in log]
    assert len(logged) == 6 and all("moe/router_entropy" in log and "moe/aux_loss/layer1" in log for log in logged)
    assert all("moe/router_entropy" in log for log in spy.history if "loss" in log)  # trainer.state.log_history too
    entropy = table[(table["metric"] == "router_entropy_norm") & (table["layer"] == -1)]["value"]
    assert (entropy > 0.9).all()  # near-uniform routers at the start of training
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


def test_trainer_collapsed_router_raises_the_alerts(tmp_path):
    model = tiny_qwen3_moe()
    collapse_routers(model)
    monitor = moescope.RoutingMonitor(every=1, out=tmp_path / "monitor", dead_after=2)
    train(model, tmp_path, monitor, steps=4)
    lines = [json.loads(line) for line in (tmp_path / "monitor" / "alerts.jsonl").read_text().splitlines()]
    assert lines == monitor.alerts
    kinds = {(a["kind"], a["layer"]) for a in lines}
    assert {("collapse", 0), ("collapse", 1), ("dead", 0), ("dead", 1)} <= kinds
    collapse = [a for a in lines if a["kind"] == "collapse"]
    assert all(a["severity"] == "critical" and a["step"] == 1 and a["value"] < 0.3 for a in collapse)
    dead = [a for a in lines if a["kind"] == "dead"]
    assert all(a["step"] == 2 for a in dead)  # cold at check 1, dead at check 2 (dead_after=2); said once
    assert all(set(a) == {"step", "severity", "kind", "layer", "message", "value", "threshold"} for a in lines)


def test_plain_loop_metrics_equal_an_independent_computation():
    """The monitor's numbers for one step against NumPy on the router logits transformers returns."""
    model = tiny_qwen3_moe(seed=3)
    for module in model.modules():  # give the routers real preferences
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.5)
    data = Batches(n=8, width=16, seed=1)
    ids, mask = data.ids, data.mask
    with moescope.RoutingMonitor(model, every=2) as monitor:
        for step in range(3):
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=step == 0)
            if step == 0:
                logits = [l.detach().double().numpy() for l in out.router_logits]  # [B*T, E] per layer
            out.logits.sum().backward()
            monitor.step()
    table = monitor.metrics
    assert sorted(set(table["step"])) == [0, 2]  # every 2nd step
    got = table[table["step"] == 0].set_index(["layer", "metric"])["value"]
    keep = mask.reshape(-1).bool().numpy()
    for layer, raw in enumerate(logits):
        x = raw[keep]
        probs = np.exp(x - x.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        top = np.argsort(-probs, 1, kind="stable")[:, :2]
        counts = np.bincount(top.ravel(), minlength=8)
        aux = 8 * ((counts / len(x)) * probs.mean(0)).sum()
        lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
        entropy = -(probs * np.log(probs)).sum(1).mean()
        share = counts / counts.sum()
        assert got[(layer, "aux_loss")] == pytest.approx(aux, rel=2e-3)
        assert got[(layer, "z_loss")] == pytest.approx((lse ** 2).mean(), rel=2e-3)
        assert got[(layer, "router_entropy")] == pytest.approx(entropy, rel=2e-3)
        assert got[(layer, "router_entropy_norm")] == pytest.approx(entropy / math.log(8), rel=2e-3)
        for e in range(8):
            assert got[(layer, f"load_share/{e}")] == pytest.approx(share[e], abs=1e-12)
        w = np.take_along_axis(probs, top, 1)
        assert got[(layer, "top1_weight_mean")] == pytest.approx((w[:, 0] / w.sum(1)).mean(), rel=2e-3)
        load_p = share[share > 0]
        assert got[(layer, "load_entropy_norm")] == pytest.approx(-(load_p * np.log(load_p)).sum() / math.log(8), rel=1e-6)
    # what remains is transformers' own (output_router_logits installs its capture hooks for good): none of ours
    remaining = [h for m in model.modules() for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]]
    assert not any("moescope" in getattr(h, "__module__", "") or "moescope" in repr(h) for h in remaining)


def test_dead_needs_persistence_and_alerts_do_not_repeat():
    model = tiny_qwen3_moe()
    collapse_routers(model)
    ids = Batches(n=4, width=16).ids
    with torch.no_grad(), moescope.RoutingMonitor(model, every=1, dead_after=3) as monitor:
        raised = []
        for _ in range(5):
            model(input_ids=ids)
            raised.append(sorted({a["kind"] for a in monitor.step()}))
    assert raised == [["collapse"], [], ["dead"], [], []]
    cold = monitor.metrics.query("metric == 'n_cold' and layer == 0")["value"].tolist()
    dead = monitor.metrics.query("metric == 'n_dead' and layer == 0")["value"].tolist()
    assert cold == [6.0] * 5 and dead == [0.0, 0.0, 6.0, 6.0, 6.0]  # experts 2..7 never chosen (top-2: 0, then 1)


def test_bad_input_is_one_moescope_error(tmp_path):
    from transformers import Qwen3Config

    dense = AutoModelForCausalLM.from_config(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(NoRouterFoundError, match="no MoE layers"):
        moescope.RoutingMonitor(dense)
    with pytest.raises(MoescopeError, match="every must be a whole number"):
        moescope.RoutingMonitor(every=0)
    with pytest.raises(MoescopeError, match="out of range"):
        moescope.RoutingMonitor(tiny_qwen3_moe(), layers=[5])
    with pytest.raises(MoescopeError, match="collapse_ratio"):
        moescope.RoutingMonitor(collapse_ratio=1.5)
    model = tiny_qwen3_moe()
    with moescope.RoutingMonitor(model):
        with pytest.raises(MoescopeError, match="already being recorded"):
            with moescope.record(model):
                pass
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(MoescopeError, match="has no model"):
        moescope.RoutingMonitor().step()
