"""The training recipe: per-layer balance loss, z-loss, DeepSeek-V3 bias balancing, determinism, resume, packages.

Losses are checked against small NumPy references written here (not the training code) at awkward sizes;
the short training runs use the real models, optimizer and loop with the batch shrunk (monkeypatched
SEQ_LEN / BATCH_MIX) so that a step takes milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import train
from training.router_tap import router_modules, tap_routers


def _np_switch(logits: np.ndarray, k: int) -> float:
    """E * sum_e f_e P_e with a per-token loop: f = top-k slots per token, P = mean softmax probability."""
    n, e = logits.shape
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    slots = np.zeros(e)
    for row in probs:
        for expert in np.argsort(-row, kind="stable")[:k]:
            slots[expert] += 1
    return float(e * ((slots / n) * probs.mean(0)).sum())


@pytest.mark.parametrize("n_tokens", [1, 7, 256])
def test_switch_loss_matches_a_numpy_reference(n_tokens):
    g = torch.Generator().manual_seed(n_tokens)
    logits = torch.randn(n_tokens, 8, generator=g, dtype=torch.float64) * 2
    ids = torch.topk(logits.softmax(-1), 2, dim=-1).indices
    assert train.switch_loss(logits, ids).item() == pytest.approx(_np_switch(logits.numpy(), 2), rel=1e-6)


def test_switch_loss_is_top_k_when_uniform_as_in_transformers():
    ids = torch.arange(16).view(8, 2) % 8  # every expert gets 2 of 16 slots
    assert train.switch_loss(torch.zeros(8, 8), ids).item() == pytest.approx(2.0)


def test_per_layer_balance_sees_imbalance_that_pooling_all_layers_hides():
    """Two layers, each sending everything to its own two experts: pooled over layers the load looks even."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    n, e, k = 64, 4, 2
    layer_a = torch.tensor([[4.0, 4.0, -4.0, -4.0]]).expand(n, e)  # experts 0, 1
    layer_b = torch.tensor([[-4.0, -4.0, 4.0, 4.0]]).expand(n, e)  # experts 2, 3
    pooled = load_balancing_loss_func((layer_a, layer_b), num_experts=e, top_k=k).item()  # k = balanced
    ids = [torch.topk(lg.softmax(-1), k, dim=-1).indices for lg in (layer_a, layer_b)]
    per_layer = torch.stack([train.switch_loss(lg, i) for lg, i in zip((layer_a, layer_b), ids)]).mean().item()
    assert pooled == pytest.approx(k, abs=0.02)  # transformers' loss: nothing to fix
    assert per_layer == pytest.approx(2 * k, abs=0.02)  # ours: each layer uses half its experts


@pytest.mark.parametrize("n_tokens", [1, 7, 256])
def test_z_loss_matches_a_numpy_reference(n_tokens):
    logits = torch.randn(n_tokens, 8, generator=torch.Generator().manual_seed(n_tokens), dtype=torch.float64) * 3
    x = logits.numpy()
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    assert train.z_loss(logits).item() == pytest.approx(float((lse**2).mean()), rel=1e-6)  # the loss runs in float32


@pytest.mark.parametrize("seq_len", [1, 7])
def test_sequence_balance_loss_matches_a_numpy_reference(seq_len):
    batch, e, k = 3, 8, 2
    g = torch.Generator().manual_seed(seq_len)
    logits = torch.randn(batch * seq_len, e, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(batch * seq_len)])
    expected = []
    for b in range(batch):  # DeepSeek-V3, eq. 17-20, one sequence at a time
        rows = slice(b * seq_len, (b + 1) * seq_len)
        s = 1 / (1 + np.exp(-logits[rows].numpy()))
        p = (s / s.sum(1, keepdims=True)).mean(0)
        f = np.zeros(e)
        for row in ids[rows].numpy():
            f[row] += e / (k * seq_len)
        expected.append((f * p).sum())
    assert train.sequence_balance_loss(logits, ids, batch).item() == pytest.approx(float(np.mean(expected)), rel=1e-6)  # the loss runs in float32


def _tiny_dsv3():
    from transformers import AutoModelForCausalLM

    from training.architectures import build_config

    torch.manual_seed(0)
    config = build_config("tiny-dsv3", 64, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    return AutoModelForCausalLM.from_config(config)


def test_correction_bias_moves_against_the_load():
    model = _tiny_dsv3()
    routers = [m for _, m in router_modules(model)]
    loads = [torch.tensor([9.0, 1, 5, 5] + [5.0] * 12) for _ in routers]  # expert 0 busy, 1 idle, rest at the mean
    train.update_correction_bias(model, loads)
    bias = routers[0].e_score_correction_bias
    assert bias[0] == -train.BIAS_UPDATE_RATE and bias[1] == train.BIAS_UPDATE_RATE and (bias[2:] == 0).all()


def test_tap_sees_what_the_dsv3_experts_receive():
    """The ids the tap records are the ones the experts module is called with (bias and groups applied)."""
    model = _tiny_dsv3().eval()
    for _, router in router_modules(model):
        router.e_score_correction_bias.normal_(0, 0.5)  # selection now differs from plain top-k of the scores
    seen = []
    handle = model.model.layers[1].mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        with tap_routers(model) as calls, torch.no_grad():
            model(input_ids=torch.arange(1, 40)[None])
    finally:
        handle.remove()
    assert len(calls) == 3  # the first decoder layer is dense
    assert torch.equal(calls[0].ids[0], seen[0])


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(train, "SEQ_LEN", 16)
    monkeypatch.setattr(train, "BATCH_MIX", {"code": 2, "prose": 2})
    monkeypatch.setattr(train, "LOG_EVERY", 1)
    g = torch.Generator().manual_seed(3)
    return {"code": torch.randint(1, 8192, (4000,), generator=g), "prose": torch.randint(1, 8192, (4000,), generator=g)}


class _Tok:
    """The three things train_model reads from a tokenizer (it saves the real one only in checkpoints)."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __len__(self):
        return 8192

    def save_pretrained(self, folder):
        pass


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dsv3"])
def test_training_is_deterministic_and_balances(small_batches, name):
    runs = [train.train_model(name, _Tok(), small_batches, 4, torch.device("cpu"), log=lambda m: None)
            for _ in range(2)]
    (a, info_a), (b, info_b) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert info_a["history"] == [{**h, "elapsed_s": h2["elapsed_s"]} for h, h2 in zip(info_b["history"], info_a["history"])]
    parts = set(info_a["history"][0])
    if name == "tiny-dsv3":
        assert "seq_aux" in parts and info_a["balancing"]["bias_update_rate"] == train.BIAS_UPDATE_RATE
        biases = [m.e_score_correction_bias for _, m in router_modules(a)]
        assert all(bias.abs().sum() > 0 for bias in biases)  # moved after every step
    else:
        assert {"balance", "z"} <= parts and "per layer" in info_a["balancing"]["kind"]


def test_resumed_training_equals_an_uninterrupted_run(small_batches, tmp_path):
    from transformers import AutoModelForCausalLM

    quiet = lambda m: None  # noqa: E731
    whole, _ = train.train_model("tiny-moe", _Tok(), small_batches, 4, torch.device("cpu"), quiet)
    train.train_model("tiny-moe", _Tok(), small_batches, 4, torch.device("cpu"), quiet, checkpoint_every=2,
                      checkpoint_dir=tmp_path)
    checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-moe" / "step-000002")  # float32, loadable
    assert next(checkpoint.parameters()).dtype == torch.float32
    (tmp_path / "tiny-moe" / "step-000002" / "model.safetensors").unlink()  # resume must not need the folder
    resume = torch.load(tmp_path / "tiny-moe" / "resume.pt", weights_only=False)
    assert resume["step"] == 2
    resumed, info = train.train_model("tiny-moe", _Tok(), small_batches, 4, torch.device("cpu"), quiet,
                                      checkpoint_every=2, checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(x, y) for x, y in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert [h["step"] for h in info["history"]] == [0, 1, 2, 3]


def test_resume_with_other_steps_is_refused(small_batches, tmp_path):
    quiet = lambda m: None  # noqa: E731
    train.train_model("tiny-moe", _Tok(), small_batches, 3, torch.device("cpu"), quiet, checkpoint_every=2,
                      checkpoint_dir=tmp_path)
    with pytest.raises(train.TrainingError, match="run of 3 steps, not 5"):
        train.train_model("tiny-moe", _Tok(), small_batches, 5, torch.device("cpu"), quiet, checkpoint_dir=tmp_path,
                          resume=True)


def test_missing_debian_packages_stop_training_in_one_line(monkeypatch, tmp_path, capsys):
    from training import debian_docs

    monkeypatch.setattr(debian_docs, "DPKG_INFO", tmp_path)  # as on a machine without the packages
    assert train.main(["--model", "tiny-moe", "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install -y python3.11-doc debian-reference-en manpages" in err
    assert not (tmp_path / "out").exists()


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert train.main(["--steps", "0"]) == 2
    assert train.main(["--checkpoint-every", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --steps must be positive, not 0", "error: --checkpoint-every and --resume need --checkpoint-dir"]


def test_one_layer_switch_loss_is_transformers_load_balancing_loss():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    logits = torch.randn(37, 8, generator=torch.Generator().manual_seed(5))
    ids = torch.topk(logits.softmax(-1), 2, dim=-1).indices
    expected = load_balancing_loss_func((logits,), num_experts=8, top_k=2).item()
    assert train.switch_loss(logits, ids).item() == pytest.approx(expected, rel=1e-6)
