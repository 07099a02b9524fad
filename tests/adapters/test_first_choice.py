"""Slot 0 is the first choice (issue 12, point 1) for families whose routers select with topk(sorted=False).

DeepSeek-V3, GLM-4.5 (glm4_moe) and LongCat hand their experts the chosen ids in no particular order, so
the order the experts received is meaningless; the trace must order every row by gate weight, descending
(ties: lower id first). Checked against what the experts modules received, read by the test's own hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moescope
from .experts_inputs import experts_inputs, first_choice
from .tiny_configs import build_tiny_model

UNSORTED_TOPK = ("deepseek_v3", "glm4_moe", "longcat_flash")


def uneven_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 24] ids, right-padded rows of 24, 17 and 5 real tokens (pad id 0)."""
    ids = torch.randint(3, 256, (3, 24), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    mask[1, 17:], mask[2, 5:] = 0, 0
    return ids * mask, mask


@pytest.mark.parametrize("family", UNSORTED_TOPK)
@pytest.mark.parametrize("weights_dtype", ["float32", "float16"])
def test_slot_zero_is_the_largest_gate_weight_on_every_row(family, weights_dtype, tmp_path):
    model = build_tiny_model(family)
    ids, mask = uneven_batch()
    received = experts_inputs(model, ids, mask)
    keep = mask.reshape(-1).bool().numpy()
    # the experts really receive unsorted slots, else this test proves nothing
    unsorted = np.mean([(r.weights[keep, 0] < r.weights[keep].max(-1)).mean() for r in received])
    assert unsorted > 0.15, f"{family}: only {unsorted:.0%} of rows arrive unsorted"

    trace = moescope.capture(model, input_ids=ids, attention_mask=mask, out=tmp_path / "t", progress=False,
                             options=moescope.CaptureOptions(weights_dtype=weights_dtype))
    shard = next(trace.shards())
    for layer, got in enumerate(received):
        ids_in, w_in = got.ids[keep], got.weights[keep]
        if weights_dtype == "float16":  # ties are judged on the stored (rounded) weights
            w_in = w_in.astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(shard.topk_ids[layer, :, 0], first_choice(ids_in, w_in), err_msg=f"{family} layer {layer}")
        # the whole row: the experts' (id, weight) pairs, sorted by weight descending then id
        order = np.lexsort((ids_in, -w_in), axis=-1)
        np.testing.assert_array_equal(shard.topk_ids[layer], np.take_along_axis(ids_in, order, -1))
        np.testing.assert_allclose(shard.topk_weights[layer], np.take_along_axis(w_in, order, -1), rtol=1e-6)
    assert trace.manifest["schema_version"] == 2
    # and the README's SQL reads the same first choice
    first = trace.sql("SELECT layer, seq_id, pos, topk_ids[1] AS first_expert FROM routing ORDER BY layer, seq_id, pos")
    np.testing.assert_array_equal(first["first_expert"].to_numpy(), shard.topk_ids[..., 0].reshape(-1))
