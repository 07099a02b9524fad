"""Every declared family routes exactly as its RouterSpec says.

For each family: build a tiny random model (routers randomised), run one padded batch, and compare the
ids and weights each experts module actually received with the independent NumPy reference computed
from the router's input and weights. Also check that the router output is what the spec says it is
(logits, or probabilities whose rows sum to 1) and sits at the declared index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moescope.adapters.families import FAMILIES, UNSUPPORTED
from moescope.adapters.spec import RouterOutput

from .reference_routing import (
    config_top_k,
    is_probability_rows,
    reference_routing,
    router_inputs_and_expert_args,
)
from .tiny_configs import CAUSAL_MOE_FAMILIES, OVERRIDES, build_tiny_model

TIE_MARGIN = 1e-5  # reference scores closer than this at the k-th place may legitimately swap


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, 7] ids with right padding in row 1 (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _sorted_by_id(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def assert_same_routing(got_ids, got_w, ref, k: int, where: str) -> None:
    """ids equal as sets per token, weights allclose aligned by id; differing sets only at near-ties."""
    got_ids, got_w = _sorted_by_id(got_ids.astype(np.int64), got_w)
    ref_ids, ref_w = _sorted_by_id(ref.ids, ref.weights)
    differ = (got_ids != ref_ids).any(-1)
    if differ.any():
        ranked = -np.sort(-ref.selection_scores[differ], axis=-1)
        margin = ranked[:, k - 1] - ranked[:, k] if ranked.shape[-1] > k else np.zeros(len(ranked))
        assert (margin < TIE_MARGIN).all(), (
            f"{where}: expert sets differ for tokens {np.flatnonzero(differ).tolist()} with no near-tie: "
            f"model {got_ids[differ].tolist()} vs reference {ref_ids[differ].tolist()}"
        )
    same = ~differ
    np.testing.assert_allclose(got_w[same], ref_w[same], rtol=1e-4, atol=1e-5, err_msg=f"{where}: weights")


def test_every_causal_family_is_declared_or_unsupported():
    undeclared = [f for f in CAUSAL_MOE_FAMILIES if f not in FAMILIES and f not in UNSUPPORTED]
    assert not undeclared
    assert not set(FAMILIES) & set(UNSUPPORTED)
    for family, spec in FAMILIES.items():
        assert spec.family == family


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f in OVERRIDES))
def test_reference_matches_model(family):
    spec = FAMILIES[family]
    model = build_tiny_model(family)
    input_ids, mask = padded_batch()
    records = router_inputs_and_expert_args(model, spec, input_ids, mask)
    assert records, f"{family}: no MoE block found"
    k = config_top_k(model.config)
    n_tokens = input_ids.numel()
    for record in records:
        where = f"{family} {record.block_path}"
        assert record.ids.shape == (n_tokens, k), where
        ref = reference_routing(
            spec, model.config, record.router_input, record.params, top_k=k, extra_inputs=record.extra_inputs
        )
        assert_same_routing(record.ids, record.weights, ref, k, where)

        out = record.router_output
        assert out.shape == ref.router_output.shape, where
        np.testing.assert_allclose(out, ref.router_output, rtol=1e-4, atol=1e-4, err_msg=f"{where}: router output")
        if spec.router_output == RouterOutput.PROBS:
            assert is_probability_rows(out), f"{where}: declared probs, rows do not sum to 1"
        else:
            assert not is_probability_rows(out), f"{where}: declared logits, router returns probabilities"

    # the randomised routers really spread tokens, else the comparison above proves little
    used = np.unique(np.concatenate([r.ids.reshape(-1) for r in records]))
    assert len(used) >= 3, f"{family}: all tokens go to experts {used.tolist()}"
