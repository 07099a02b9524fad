"""moescope.record(model): the routing of the user's own forward and generate() calls, as capture records it."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import moescope
from moescope.errors import MoescopeError, NoRouterFoundError
from moescope.recording.session import Recording


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _rows(shard) -> dict:
    """{(seq_id, pos): (token, generated, sorted ids per layer [L, k], weights in that order [L, k])}: a plain loop."""
    out = {}
    for t in range(shard.n_tokens):
        order = np.argsort(shard.topk_ids[:, t], axis=-1, kind="stable")
        out[(int(shard.seq_id[t]), int(shard.pos[t]))] = (
            int(shard.token_id[t]), bool(shard.generated[t]),
            np.take_along_axis(shard.topk_ids[:, t], order, -1), np.take_along_axis(shard.topk_weights[:, t], order, -1))
    return out


def _uneven_left_padded(pad: int = 0):
    """Three prompts of 7, 4 and 1 tokens, left-padded to 7."""
    g = torch.Generator().manual_seed(5)
    lengths = (7, 4, 1)
    ids = torch.full((3, 7), pad)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 7 - n:] = torch.randint(3, 256, (n,), generator=g)
        mask[row, 7 - n:] = 1
    return ids, mask, lengths


def test_generate_with_uneven_left_padded_prompts_equals_teacher_forced_capture(tiny_moe, tmp_path):
    model = tiny_moe
    ids, mask, lengths = _uneven_left_padded()
    with moescope.record(model) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    shard = next(rec.trace.shards())
    got = _rows(shard)
    # the teacher-forced reference: each prompt's real tokens + its generated tokens (all but the last, which
    # is never fed back), right-padded, through moescope.capture
    eos = model.generation_config.eos_token_id
    sequences = []
    for row, n in enumerate(lengths):  # a row ends at its first generated EOS (neither it nor what follows is routed)
        fed = out[row, 7 - n:-1].tolist()
        sequences.append(fed[:n + fed[n:].index(eos)] if eos in fed[n:] else fed)
    assert any(len(s) < n + 6 - 1 for s, n in zip(sequences, lengths))  # (this seed: a row does stop early)
    width = max(map(len, sequences))
    forced_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    forced_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    forced = _rows(next(moescope.capture(model, input_ids=forced_ids, attention_mask=forced_mask, out=tmp_path / "f",
                                         progress=False).shards()))
    assert sorted(got) == sorted(forced)  # same (sequence, position) pairs: prompt + fed generated tokens, no padding
    for key, (token, generated, top, weights) in got.items():
        f_token, _, f_top, f_weights = forced[key]
        assert token == f_token
        assert generated == (key[1] >= lengths[key[0]])
        np.testing.assert_array_equal(top, f_top, err_msg=str(key))
        np.testing.assert_allclose(weights, f_weights, atol=1e-3, err_msg=str(key))  # float16 storage
    assert rec.trace.manifest["capture"]["mode"] == "record"
    assert rec.trace.manifest["stats"]["forward_calls"] == 6  # the prefill and five decoding steps


def test_manual_decoding_loop_with_kv_cache_and_calls_in_between(tiny_moe):
    """A loop feeding `past_key_values` back continues its sequence; an unrelated call in between starts its own."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode(), moescope.record(tiny_moe) as rec:
        out = tiny_moe(input_ids=prompt)
        other = tiny_moe(input_ids=torch.tensor([[9, 10], [11, 12]]), use_cache=False)  # seq 1 and 2
        token = out.logits[:, -1:].argmax(-1)
        fed = [token.item()]
        for _ in range(3):
            out = tiny_moe(input_ids=token, past_key_values=out.past_key_values)
            token = out.logits[:, -1:].argmax(-1)
            fed.append(token.item())
        del out, other
    shard = next(rec.trace.shards())
    seq0 = shard.seq_id == 0
    assert shard.token_id[seq0].tolist() == [5, 6, 7, 8] + fed[:3]
    assert shard.pos[seq0].tolist() == list(range(7))
    assert shard.generated[seq0].tolist() == [False] * 4 + [True] * 3
    assert shard.seq_id.tolist() == [0] * 7 + [1, 1, 2, 2]
    assert shard.token_id[~seq0].tolist() == [9, 10, 11, 12] and not shard.generated[~seq0].any()


def test_generate_without_cache_records_each_position_once(tiny_moe):
    ids, mask, _ = _uneven_left_padded()
    runs = {}
    for use_cache in (True, False):
        with torch.inference_mode(), moescope.record(tiny_moe) as rec:
            tiny_moe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              use_cache=use_cache)
        runs[use_cache] = next(rec.trace.shards())
    a, b = runs[True], runs[False]
    assert a.seq_id.tolist() == b.seq_id.tolist() and a.pos.tolist() == b.pos.tolist()
    assert a.token_id.tolist() == b.token_id.tolist() and a.generated.tolist() == b.generated.tolist()
    same = (np.sort(a.topk_ids, -1) == np.sort(b.topk_ids, -1)).all(-1).mean()
    assert same > 0.98  # a KV cache changes only float rounding


def test_sequence_ids_increase_across_calls_and_layers_and_sampling(tiny_moe):
    batches = [torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with torch.inference_mode(), moescope.record(tiny_moe, layers=[1, 3], sample_every=2) as rec:
        for ids in batches:
            tiny_moe(input_ids=ids, use_cache=False)
    shard = next(rec.trace.shards())
    # calls 0, 2 and 4 are recorded: their rows become sequences 0..5 in call order
    assert shard.seq_id.tolist() == np.repeat(np.arange(6), 5).tolist()
    assert shard.token_id.tolist() == torch.cat([batches[0], batches[2], batches[4]]).reshape(-1).tolist()
    assert [layer["module"] for layer in rec.trace.layers] == ["model.layers.1.mlp", "model.layers.3.mlp"]
    assert [layer["moe_layer"] for layer in rec.trace.layers] == [0, 1] and shard.n_layers == 2
    with torch.inference_mode(), moescope.record(tiny_moe) as full:
        tiny_moe(input_ids=batches[2], use_cache=False)
    whole = next(full.trace.shards())
    np.testing.assert_array_equal(shard.topk_ids[:, 10:20], whole.topk_ids[[1, 3]])
    assert rec.trace.manifest["stats"]["forward_calls"] == 5 and rec.trace.manifest["stats"]["recorded_calls"] == 3


def test_out_folder_holds_the_same_trace_as_memory_and_memory_spills(tiny_moe, tmp_path):
    batches = [torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run(out=None, memory_tokens=262144, shard_tokens=65536):
        options = moescope.CaptureOptions(save_logits=True, shard_tokens=shard_tokens)
        with torch.inference_mode(), Recording(tiny_moe, out, options=options, memory_tokens=memory_tokens) as rec:
            for ids in batches:
                tiny_moe(input_ids=ids, use_cache=False)
        return rec.trace

    memory = run()
    folder = run(out=tmp_path / "rec", shard_tokens=12)  # one shard per call
    spilled = run(memory_tokens=20, shard_tokens=12)
    assert memory.folder is None and folder.folder == tmp_path / "rec" and spilled.folder is not None
    assert len(folder.manifest["shards"]) == 4 and folder.complete and spilled.complete
    assert folder.manifest["router_output_kind"] == memory.manifest["router_output_kind"] == "logits"
    rows = lambda trace, name: sorted(trace.table(name).to_pylist(), key=lambda r: (r["seq_id"], r.get("pos", 0), r.get("layer", 0)))
    for name in ("routing", "tokens", "sequences"):  # shards differ (routing is layer-major per shard); rows do not
        assert rows(memory, name) == rows(folder, name) == rows(spilled, name)
    assert memory.sql("SELECT count(*) AS n FROM routing")["n"][0] == 48 * 4 // 4 * 4
    temp = spilled.folder
    del spilled
    gc.collect()
    assert not temp.exists()  # the temporary folder goes with its trace
    saved = memory.save(tmp_path / "saved")
    assert saved.table("routing").to_pylist() == memory.table("routing").to_pylist()
    from moescope.trace.verify import verify_trace

    assert verify_trace(tmp_path / "saved").ok and verify_trace(tmp_path / "rec").ok


def test_hooks_removed_on_exit_and_on_exception_and_model_left_as_it_was(tiny_moe):
    tiny_moe.train()
    before = {k: v.clone() for k, v in tiny_moe.state_dict().items()}
    attributes = {name: set(vars(m)) for name, m in tiny_moe.named_modules()}
    with moescope.record(tiny_moe, options=moescope.CaptureOptions(save_logits=True)):
        assert _hook_count(tiny_moe) > 0
        tiny_moe(input_ids=torch.tensor([[3, 4, 5]]))
    assert _hook_count(tiny_moe) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with moescope.record(tiny_moe) as rec:
            tiny_moe(input_ids=torch.tensor([[3, 4, 5]]))
            raise RuntimeError("boom")
    assert _hook_count(tiny_moe) == 0
    assert rec.trace.n_tokens == 3 and not rec.trace.complete  # what ran before the error is kept, marked incomplete
    assert tiny_moe.training  # not switched to eval
    assert all(torch.equal(before[k], v) for k, v in tiny_moe.state_dict().items())
    assert {name: set(vars(m)) for name, m in tiny_moe.named_modules()} == attributes


def test_bad_input_is_one_moescope_error_and_leaves_the_model_alone(tiny_moe, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    dense = AutoModelForCausalLM.from_config(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(NoRouterFoundError, match="no MoE layers"):
        moescope.record(dense)
    with pytest.raises(MoescopeError, match="MoE layer 4 is out of range: this model has 4 MoE layers"):
        moescope.record(tiny_moe, layers=[0, 4])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MoescopeError, match="sample_every must be a whole number >= 1"):
            moescope.record(tiny_moe, sample_every=bad)
    with moescope.record(tiny_moe):
        with pytest.raises(MoescopeError, match="already being recorded"):
            with moescope.record(tiny_moe):
                pass
        assert _hook_count(tiny_moe) > 0  # the outer block still records
    assert _hook_count(tiny_moe) == 0
    with moescope.record(tiny_moe, out=tmp_path / "t"):
        tiny_moe(input_ids=torch.tensor([[3, 4]]))
    manifest = (tmp_path / "t" / "manifest.json").read_bytes()
    with pytest.raises(MoescopeError, match="already holds a trace"):
        with moescope.record(tiny_moe, out=tmp_path / "t"):
            pass
    assert (tmp_path / "t" / "manifest.json").read_bytes() == manifest and _hook_count(tiny_moe) == 0


def test_custom_router_model_generate(tmp_path):
    """A custom PyTorch MoE (CustomRouter declared on its class): the shipped tiny-varmoe."""
    from moescope.models import default_custom_router
    from moescope.recording.loading import load_model

    model, tokenizer = load_model("moescope:tiny-varmoe", device="cpu")
    router = default_custom_router("tiny-varmoe")
    ids = torch.tensor([tokenizer("def add(a, b):")["input_ids"]])
    with torch.inference_mode(), moescope.record(model, tokenizer=tokenizer, options=moescope.CaptureOptions(router=router)) as rec:
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    shard = next(rec.trace.shards())
    fed = out[0, :-1]
    forced = next(moescope.capture(model, input_ids=fed[None], out=tmp_path / "f", progress=False,
                                   options=moescope.CaptureOptions(router=router)).shards())
    assert shard.token_id.tolist() == fed.tolist() and shard.generated.sum() == fed.shape[0] - ids.shape[1]
    np.testing.assert_array_equal(np.sort(shard.topk_ids, -1), np.sort(forced.topk_ids, -1))


def test_a_cache_filled_before_the_block_gives_positions_after_it(tiny_moe):
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        out = tiny_moe(input_ids=prompt)  # not recorded
        with moescope.record(tiny_moe) as rec:
            step = tiny_moe(input_ids=torch.tensor([[10]]), past_key_values=out.past_key_values)
            tiny_moe(input_ids=torch.tensor([[11]]), past_key_values=step.past_key_values)
            del step
    shard = next(rec.trace.shards())
    assert shard.pos.tolist() == [5, 6] and shard.token_id.tolist() == [10, 11] and shard.seq_id.tolist() == [0, 0]
    assert shard.generated.tolist() == [False, True]  # the first call starts the sequence; the second decodes it


def test_generate_honours_an_eos_and_pad_passed_to_the_call(tiny_moe):
    """`generate(..., eos_token_id=X, pad_token_id=P)`: a row ends at X (neither X nor the padding after it is recorded)."""
    model = tiny_moe
    ids, mask, lengths = _uneven_left_padded()
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos_x = int(free[0, 7 + 1])  # what row 0 generates second: made the EOS of the next call
    pad_p = next(p for p in range(1, 10) if p not in (eos_x, model.generation_config.eos_token_id))
    assert eos_x != model.generation_config.eos_token_id
    with moescope.record(model) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             eos_token_id=eos_x, pad_token_id=pad_p)
    expected = {}
    for row, n in enumerate(lengths):  # fed tokens: the prompt, then generated ones up to (not with) the first X
        fed = out[row, 7 - n:-1].tolist()
        fed = fed[:n + fed[n:].index(eos_x)] if eos_x in fed[n:] else fed
        expected.update({(row, pos): token for pos, token in enumerate(fed)})
    assert eos_x in out[0, 7:].tolist() and pad_p in out[0, 7:].tolist()  # row 0 stopped and was padded with P
    shard = next(rec.trace.shards())
    got = {(int(s), int(p)): int(t) for s, p, t in zip(shard.seq_id, shard.pos, shard.token_id)}
    assert got == expected
