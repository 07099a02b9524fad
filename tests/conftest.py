"""Shared fixtures: tiny random-initialised MoE models built from config classes (no hub, no network)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests (hypothesis): a quick run by default; HYPOTHESIS_PROFILE=thorough for the long one.
# No example database: nothing is written into the work tree, and the default run is the same every time.
_FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", max_examples=40, derandomize=True, **_FUZZ)
settings.register_profile("thorough", max_examples=1000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def make_tiny_qwen3_moe(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2, **overrides,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():  # routers start at zero: give them real, tie-free preferences
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.5)
    return model


@pytest.fixture
def tiny_moe():
    return make_tiny_qwen3_moe()


@pytest.fixture
def padded_batch():
    """[3, 12] ids with right padding in rows 1 and 2 (pad id 0)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def make_byte_tokenizer():
    """A 256-symbol byte-level BPE tokenizer trained on nothing: offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet)[:253])})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<0>", eos_token="<1>", bos_token="<2>", unk_token="<0>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen3-MoE + tokenizer folder, loadable with AutoModelForCausalLM like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe")
    make_tiny_qwen3_moe().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def warm_cli(tmp_path_factory):
    """One warm helper interpreter that runs `moescope` commands in forked, killable children (tests/warm_cli.py)."""
    from warm_cli import WarmCli

    with WarmCli(log_dir=tmp_path_factory.mktemp("warm-cli-logs")) as cli:
        yield cli


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on a free loopback port, for the whole session; skipped when moto is absent."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install -e '.[dev]')")
    from s3_server import start_server

    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server reached through the AWS environment variables alone, and a fresh bucket: s3://BUCKET."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{s3_server.new_bucket()}"
