import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moescope.analysis import analyze_router_weights
from moescope.errors import MoescopeError


def test_hand_made_router_matrices():
    W = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # experts 0 and 1 point the same way
    result = analyze_router_weights({0: W, 1: W[::-1]})
    assert result.layers == (0, 1)
    np.testing.assert_allclose(result.norm[0], [1, 2, 1])
    np.testing.assert_allclose(result.cosine[0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)
    per_expert = result.to_pandas()["per_expert"]
    assert per_expert.query("layer == 0 and expert == 0")["most_similar"].item() == 1
    top = result.pairs().iloc[0]
    assert (top.layer, top.expert_a, top.expert_b) == (0, 0, 1) and top.cosine == pytest.approx(1.0)
    assert result.summary()["max_offdiagonal_cosine"] == pytest.approx(1.0)


def test_matches_the_seed_notebook_computation():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 16))
    result = analyze_router_weights({3: W})
    w = torch.from_numpy(W)
    np.testing.assert_allclose(result.norm[0], torch.norm(w, dim=1).numpy())
    np.testing.assert_allclose(result.std[0], w.std(dim=1).numpy())  # torch.std: ddof = 1
    unit = F.normalize(w, dim=1)
    np.testing.assert_allclose(result.cosine[0], (unit @ unit.T).numpy(), atol=1e-12)


def test_rejects_empty_or_ragged_input():
    with pytest.raises(MoescopeError):
        analyze_router_weights({})
    with pytest.raises(MoescopeError):
        analyze_router_weights({0: np.ones((4, 3)), 1: np.ones((5, 3))})
