"""Padding really reaches the model and never changes what is recorded (issue 12, point 15).

A left-padded batch given to `moescope.capture(model, input_ids=..., attention_mask=...)` is fed to the
model left-padded, as the caller's own forward pass would be, and each row's trace equals that row captured
alone, unpadded. Under `generate`, prompts of different lengths (left-padded for generation) are recorded
as a teacher-forced pass over each row's prompt and generated tokens routes them.
"""

from __future__ import annotations

import numpy as np
import torch

import moescope

LENGTHS = (9, 4, 1, 6)  # uneven prompts, one of a single token


def _rows(seed: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g) for n in LENGTHS]


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def _fed_masks(model) -> tuple[list, object]:
    """The attention masks the model's forward receives (the test's own pre-hook) and the hook's handle."""
    fed = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["attention_mask"].clone()),
                                             with_kwargs=True)
    return fed, handle


def _alone(model, row: torch.Tensor, out, **kw):
    """One row captured by itself: no padding anywhere."""
    options = moescope.CaptureOptions(weights_dtype="float32", **kw)
    return next(moescope.capture(model, input_ids=row[None], out=out, progress=False, options=options).shards())


def _near_tie(router_output: np.ndarray, k: int) -> np.ndarray:
    """bool [L, T]: the k-th and (k+1)-th router logits within float noise (their order may flip)."""
    ranked = -np.sort(-router_output, axis=-1)
    return ranked[..., k - 1] - ranked[..., k] < 1e-3


def test_left_padded_input_is_fed_left_padded_and_recorded_as_each_row_alone(tiny_moe, tmp_path):
    rows = _rows()
    ids, mask = _left_padded(rows)
    fed, handle = _fed_masks(tiny_moe)
    try:
        trace = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "left", progress=False,
                                 options=moescope.CaptureOptions(weights_dtype="float32"))
    finally:
        handle.remove()
    assert len(fed) == 1 and torch.equal(fed[0], mask), "capture must feed the batch as given: left-padded"
    assert trace.manifest["capture"]["padding_side"] == "left"
    shard = next(trace.shards())
    for seq, row in enumerate(rows):
        alone = _alone(tiny_moe, row, tmp_path / f"alone{seq}", save_logits=True)
        here = shard.seq_id == seq
        assert shard.pos[here].tolist() == list(range(len(row))) and shard.token_id[here].tolist() == row.tolist()
        stable = ~_near_tie(alone.router_output, 2)  # [L, n]
        np.testing.assert_array_equal(shard.topk_ids[:, here][stable], alone.topk_ids[stable])
        np.testing.assert_allclose(shard.topk_weights[:, here][stable], alone.topk_weights[stable], rtol=1e-4, atol=1e-5)


def test_uneven_prompts_under_generate_route_as_a_teacher_forced_pass(tiny_moe, tmp_path):
    rows = _rows(9)
    ids, mask = _left_padded(rows)
    fed, handle = _fed_masks(tiny_moe)
    try:
        trace = moescope.capture(tiny_moe, input_ids=ids, attention_mask=mask, out=tmp_path / "gen", progress=False,
                                 options=moescope.CaptureOptions(weights_dtype="float32", generate=5))
    finally:
        handle.remove()
    assert (fed[0] == 0).any(), "the prefill must see the left padding of the shorter prompts"
    shard = next(trace.shards())
    for seq, row in enumerate(rows):
        here = shard.seq_id == seq
        n = int(here.sum())
        generated = shard.generated[here]
        assert generated[: len(row)].tolist() == [False] * len(row) and generated[len(row):].all() and n > len(row)
        tokens = shard.token_id[here]
        assert tokens[: len(row)].tolist() == row.tolist() and shard.pos[here].tolist() == list(range(n))
        forced = _alone(tiny_moe, torch.tensor(tokens), tmp_path / f"forced{seq}", save_logits=True)
        stable = ~_near_tie(forced.router_output, 2)
        np.testing.assert_array_equal(shard.topk_ids[:, here][stable], forced.topk_ids[stable], err_msg=f"row {seq}")
        np.testing.assert_allclose(shard.topk_weights[:, here][stable], forced.topk_weights[stable], rtol=1e-4, atol=1e-5)
