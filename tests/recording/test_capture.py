"""Capture records exactly what the model computed, skips padding, and removes its hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moescope
from moescope.adapters.discover import find_moe_layers
from moescope.recording.hooks import RoutingRecorder


def _router_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _reference_routing(model, ids, mask):
    """Independent: router inputs from plain hooks, then softmax -> top-2 -> renormalise in NumPy."""
    inputs = []
    handles = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
               for m in _router_modules(model)]
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    out_ids, out_w = [], []
    keep = mask.reshape(-1).bool().cpu().numpy()
    for x, router in zip(inputs, _router_modules(model)):
        logits = x.double().cpu().numpy() @ router.weight.detach().double().cpu().numpy().T  # [N, E]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
        w = np.take_along_axis(probs, top, -1)
        out_ids.append(top[keep])
        out_w.append((w / w.sum(-1, keepdims=True))[keep])
    return np.stack(out_ids), np.stack(out_w)  # [L, n, 2]


def test_capture_matches_independent_routing_and_drops_padding(tiny_moe, padded_batch, tmp_path):
    ids, mask = padded_batch
    trace = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(weights_dtype="float32"))
    shard = next(trace.shards())
    ref_ids, ref_w = _reference_routing(tiny_moe, ids, mask)
    assert shard.topk_ids.shape == (4, int(mask.sum()), 2)
    np.testing.assert_array_equal(np.sort(shard.topk_ids, -1), np.sort(ref_ids, -1))
    order = np.argsort(shard.topk_ids, -1)
    np.testing.assert_allclose(np.take_along_axis(shard.topk_weights, order, -1),
                               np.take_along_axis(ref_w, np.argsort(ref_ids, -1), -1), rtol=1e-5, atol=1e-6)
    # rows are the real tokens only, with their positions and vocabulary ids
    assert shard.seq_id.tolist() == [0] * 12 + [1] * 8 + [2] * 3
    assert shard.pos.tolist() == list(range(12)) + list(range(8)) + list(range(3))
    assert shard.token_id.tolist() == ids[mask.bool()].tolist()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_capture_over_many_batches_and_shards_matches_independent_routing(tiny_moe, padded_batch, tmp_path, device):
    """On a GPU the hooks' copies are asynchronous and blocks are built on the writer thread: same trace."""
    import copy

    ids, mask = padded_batch
    model = copy.deepcopy(tiny_moe).to(device)
    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(batch_size=1, shard_tokens=8, weights_dtype="float32"))
    shards = list(trace.shards())
    assert len(shards) == 3  # one per sequence: 12, 8 and 3 tokens
    got = np.concatenate([s.topk_ids for s in shards], axis=1)
    ref_ids, _ = _reference_routing(model, ids.to(device), mask.to(device))
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(ref_ids, -1))


def test_router_output_is_stored_and_detected_as_logits(tiny_moe, padded_batch, tmp_path):
    ids, mask = padded_batch
    trace = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(save_logits=True))
    shard = next(trace.shards())
    assert trace.manifest["router_output_kind"] == "logits"
    assert shard.router_output.shape == (4, int(mask.sum()), 8)
    # the top-2 of the stored logits are the recorded experts (softmax is monotone)
    top = np.sort(np.argsort(-shard.router_output, -1)[..., :2], -1)
    assert (top == np.sort(shard.topk_ids, -1)).mean() > 0.99


def test_hooks_removed_after_exit_and_after_exception(tiny_moe):
    layers = find_moe_layers(tiny_moe)
    count = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_moe.modules())
    assert count() == 0
    with RoutingRecorder(tiny_moe, layers, save_router_output=True):
        assert count() == 2 * len(layers)
    assert count() == 0
    with pytest.raises(RuntimeError, match="boom"):
        with RoutingRecorder(tiny_moe, layers):
            raise RuntimeError("boom")
    assert count() == 0


def test_generate_records_prompt_and_generated_tokens(tiny_moe, tmp_path):
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    trace = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "g", progress=False,
                             options=moescope.CaptureOptions(generate=5))
    shard = next(trace.shards())
    per_seq = {s: shard.generated[shard.seq_id == s] for s in (0, 1)}
    for flags in per_seq.values():  # 6 prompt tokens, then the 4 generated tokens that were fed back
        assert flags.tolist()[:6] == [False] * 6 and 1 <= flags[6:].sum() <= 4
    # generated tokens' routing equals a teacher-forced pass over the same tokens (same causal computation)
    seq0 = shard.token_id[shard.seq_id == 0]
    forced = moescope.capture(tiny_moe, input_ids=torch.tensor([seq0.tolist()]), out=tmp_path / "f", progress=False)
    f = next(forced.shards())
    agree = (np.sort(f.topk_ids, -1) == np.sort(shard.topk_ids[:, shard.seq_id == 0], -1)).all(-1).mean()
    assert agree > 0.95


def test_generation_stops_recording_at_eos_whatever_the_other_rows_do(tiny_moe, tmp_path):
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    free = next(moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "free", progress=False,
                                 options=moescope.CaptureOptions(generate=5)).shards())
    row0 = free.token_id[(free.seq_id == 0) & free.generated]  # tokens generated by row 0 and fed back
    eos = int(row0[2])  # make row 0's third generated token its EOS; row 1 goes on generating
    assert eos not in row0[:2].tolist()
    saved = tiny_moe.generation_config.eos_token_id
    tiny_moe.generation_config.eos_token_id = eos
    try:
        stopped = next(moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "eos", progress=False,
                                        options=moescope.CaptureOptions(generate=5)).shards())
    finally:
        tiny_moe.generation_config.eos_token_id = saved
    gen0 = stopped.token_id[(stopped.seq_id == 0) & stopped.generated]
    assert gen0.tolist() == row0[:2].tolist()  # the EOS is never recorded as a fed token, nor the padding after it


def test_next_layer_prediction_is_the_next_router_on_this_layers_input(tiny_moe, padded_batch, tmp_path):
    ids, mask = padded_batch
    trace = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(predict_next_layer=True))
    shard = next(trace.shards())
    inputs = []
    routers = _router_modules(tiny_moe)
    handles = [r.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]))) for r in routers]
    with torch.inference_mode():
        tiny_moe(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    keep = mask.reshape(-1).bool()
    for layer in range(3):
        logits = inputs[layer][keep] @ routers[layer + 1].weight.T
        expected = np.sort(logits.topk(2, dim=-1).indices.numpy(), -1)
        np.testing.assert_array_equal(np.sort(shard.predicted_next_ids[layer], -1), expected)
    assert (shard.predicted_next_ids[3] == -1).all()


def test_capture_skips_the_lm_head_over_all_positions_unless_it_needs_the_logits(tiny_moe, padded_batch, tmp_path):
    """Routing never depends on the LM head, so capture asks for the last position's logits only (a 64 MB
    allocation and the head's matmul saved per 8x256 batch of an 8k vocabulary); --output-entropy needs all."""
    ids, mask = padded_batch
    seen = []
    handle = tiny_moe.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        headless = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "a", progress=False)
        assert seen == [1]
        full = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "b", progress=False,
                                options=moescope.CaptureOptions(output_entropy=True))
        assert seen == [1, ids.shape[1]]
    finally:
        handle.remove()
    a, b = next(headless.shards()), next(full.shards())
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.topk_weights, b.topk_weights)


def test_every_part_is_zstd_with_dictionary_ids_and_split_weights(tiny_moe, tmp_path):
    """The encodings the trace's size rests on, read back from every part's Parquet metadata: zstd everywhere,
    expert ids dictionary-encoded, gate weights split into byte planes."""
    import pyarrow.parquet as pq

    from moescope.trace.schema import TABLES

    ids = torch.randint(3, 256, (6, 64), generator=torch.Generator().manual_seed(2))
    trace = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(batch_size=2, shard_tokens=128))
    shards = trace.manifest["shards"]
    assert len(shards) == 3
    for shard in shards:
        for name in TABLES:
            meta = pq.ParquetFile(tmp_path / "t" / shard["files"][name]["path"]).metadata
            columns = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c)
                       for c in range(meta.num_columns)}
            assert {c.compression for c in columns.values()} == {"ZSTD"}, (name, shard["index"])
            if name == "routing":
                assert "RLE_DICTIONARY" in columns["topk_ids.list.element"].encodings
                assert "BYTE_STREAM_SPLIT" in columns["topk_weights.list.element"].encodings


def test_a_failing_capture_still_commits_its_full_shards(tiny_moe, tmp_path):
    """A shard filled before the loop fails is written (a rerun resumes after it); the failure is reported."""
    import json

    ids = torch.randint(3, 256, (6, 64), generator=torch.Generator().manual_seed(2))
    calls = []

    def fail_on_third_batch(*_):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = tiny_moe.register_forward_pre_hook(fail_on_third_batch)
    with pytest.raises(RuntimeError, match="boom"):
        moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False,
                         options=moescope.CaptureOptions(batch_size=2, shard_tokens=128))
    handle.remove()
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert [(s["seq_id_min"], s["seq_id_max"]) for s in manifest["shards"]] == [(0, 1), (2, 3)]
    assert not manifest.get("complete")
    trace = moescope.capture(tiny_moe, input_ids=ids, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(batch_size=2, shard_tokens=128))
    assert [(s["seq_id_min"], s["seq_id_max"]) for s in trace.manifest["shards"]] == [(0, 1), (2, 3), (4, 5)]
