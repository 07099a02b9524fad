"""Every sequence starts the way the model's tokenizer starts one by default (`tokenizer(text)`): with BOS for
Llama-style tokenizers, with nothing for GPT-2/Qwen-style ones; the manifest says which; the shipped models
keep the convention they were trained with (no BOS)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import moescope

_spec = importlib.util.spec_from_file_location("moescope_tests_conftest", Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_conftest)
make_byte_tokenizer, make_tiny_qwen3_moe = _root_conftest.make_byte_tokenizer, _root_conftest.make_tiny_qwen3_moe

TEXTS = ["short one", "a text of exactly thirty bytes", "x" * 47]
SEQ_LEN = 16
BOS = 2


def llama_style_tokenizer():
    """The byte tokenizer with a post-processor that puts BOS before every text, as Llama's does."""
    from tokenizers import processors

    tok = make_byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<2> $A", pair="<2> $A <2> $B", special_tokens=[("<2>", BOS)])
    return tok


def expected_sequences(tokenizer, texts, seq_len, start):
    """Each text's bare tokens cut into pieces of seq_len - len(start), every piece led by `start`."""
    out = []
    for text in texts:
        bare = tokenizer(text, add_special_tokens=False)["input_ids"]
        step = seq_len - len(start)
        out += [start + bare[i:i + step] for i in range(0, len(bare), step)]
    return out


def _captured(trace):
    rows = trace.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    return [list(group.sort_values("pos")["token_id"]) for _, group in rows.groupby("seq_id")], rows


@pytest.fixture(scope="module")
def model():
    return make_tiny_qwen3_moe()


def test_llama_style_tokenizer_gets_bos_at_the_start_of_every_sequence(model, tmp_path):
    tokenizer = llama_style_tokenizer()
    assert tokenizer("ab")["input_ids"] == [BOS, *tokenizer("ab", add_special_tokens=False)["input_ids"]]
    trace = moescope.capture(model, TEXTS, tokenizer=tokenizer, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(seq_len=SEQ_LEN))
    sequences, rows = _captured(trace)
    assert sequences == expected_sequences(tokenizer, TEXTS, SEQ_LEN, [BOS])
    assert sequences[0] == tokenizer(TEXTS[0])["input_ids"]  # a text that fits: exactly what tokenizer(text) gives
    assert trace.n_tokens == sum(len(t) for t in TEXTS) + 1 + 2 + 4  # one BOS per piece of <= 15: 9 B, 30 B, 47 B
    assert (rows[rows["pos"] == 0]["token_id"] == BOS).all() and (rows[rows["pos"] > 0]["token_id"] != BOS).all()
    assert trace.sql("SELECT count(*) AS n FROM routing WHERE pos = 0")["n"][0] == len(sequences) * trace.n_layers
    capture = trace.manifest["capture"]
    assert capture["bos"] is True and capture["bos_token_id"] == BOS and capture["start_token_ids"] == [BOS]


def test_gpt2_style_tokenizer_gets_nothing_added(model, tmp_path):
    tokenizer = make_byte_tokenizer()
    assert tokenizer("ab")["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"]
    trace = moescope.capture(model, TEXTS, tokenizer=tokenizer, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(seq_len=SEQ_LEN))
    sequences, _ = _captured(trace)
    assert sequences == expected_sequences(tokenizer, TEXTS, SEQ_LEN, [])
    assert trace.n_tokens == sum(len(t) for t in TEXTS)
    capture = trace.manifest["capture"]
    assert capture["bos"] is False and capture["bos_token_id"] is None and capture["start_token_ids"] == []


def test_max_tokens_counts_the_bos_tokens(model, tmp_path):
    trace = moescope.capture(model, TEXTS, tokenizer=llama_style_tokenizer(), out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(seq_len=SEQ_LEN, max_tokens=26))
    sequences, _ = _captured(trace)
    assert [len(s) for s in sequences] == [10, 16] and trace.n_tokens == 26


def test_pre_tokenised_input_is_recorded_as_given(model, tmp_path):
    import torch

    ids = torch.tensor([[BOS, 40, 41, 42], [50, 51, 52, 53]])
    trace = moescope.capture(model, input_ids=ids, out=tmp_path / "t", progress=False)
    assert _captured(trace)[0] == ids.tolist()
    assert trace.manifest["capture"]["bos"] is None  # not moescope's to say: the caller tokenised


def test_shipped_model_keeps_its_training_convention(tmp_path):
    from moescope.recording.loading import load_tokenizer

    trace = moescope.capture("moescope:tiny-moe", TEXTS[:2], out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(seq_len=64))
    tokenizer = load_tokenizer("moescope:tiny-moe")
    assert _captured(trace)[0] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    assert trace.manifest["capture"]["bos"] is False
