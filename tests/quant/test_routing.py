"""Routing-change metrics on hand-computed cases; the paired ΔNLL standard error against NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moescope.adapters.spec import MoELayer, RouterOutput, RouterSpec, Scoring
from moescope.quant.routing import RoutingDelta, router_log_probs
from moescope.quant.sweep import paired_delta


def _layer(**spec):
    spec = {"scoring": Scoring.SOFTMAX, **spec}
    return MoELayer(0, 0, "x", n_experts=4, top_k=2, spec=RouterSpec(family="t", **spec))


def test_flips_jaccard_kl_entropy_by_hand():
    ref_ids, ref_w = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    q_ids, q_w = torch.tensor([[1, 0], [3, 1]]), torch.tensor([[0.4, 0.6], [0.8, 0.2]])  # row 0: same set, same top-1
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    d = RoutingDelta()
    d.add(ref_ids, ref_w, q_ids, q_w, p.log(), q.log())
    r = d.result()
    assert r["n_tokens"] == 2
    assert r["flip_top1"] == 0.5  # row 1: 2 -> 3
    assert r["flip_topk_set"] == 0.5
    assert r["jaccard"] == pytest.approx((1 + 1 / 3) / 2)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert r["kl"] == pytest.approx(kl0 / 2, rel=1e-6)
    h = lambda ps: -sum(x * math.log(x) for x in ps)  # noqa: E731
    assert r["entropy_ref"] == pytest.approx((h([0.5, 0.5]) + h([0.9, 0.1])) / 2, rel=1e-6)
    assert r["entropy_delta"] == pytest.approx((h([0.25, 0.75]) - h([0.5, 0.5])) / 2, rel=1e-6)


def test_router_log_probs_of_logits_probabilities_and_sigmoid_scores():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.allclose(router_log_probs(logits, _layer()).exp(), logits.softmax(-1), atol=1e-6)
    probs = logits.softmax(-1)
    assert torch.allclose(router_log_probs(probs, _layer(router_output=RouterOutput.PROBS)), probs.log(), atol=1e-6)
    sig = router_log_probs(logits, _layer(scoring=Scoring.SIGMOID)).exp()
    assert torch.allclose(sig, logits.sigmoid() / logits.sigmoid().sum(), atol=1e-6)


def test_paired_delta_cluster_standard_error():
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(6), [5, 1, 7, 3, 4, 2])
    ref = rng.random(len(seq))
    quant = ref + rng.normal(0.1, 0.05, len(seq)) + 0.2 * (seq == 2)
    mean, se = paired_delta(torch.tensor(ref), torch.tensor(quant), torch.tensor(seq))
    d = quant - ref
    resid = np.array([d[seq == s].sum() - (seq == s).sum() * d.mean() for s in range(6)])
    assert mean == pytest.approx(d.mean())
    assert se == pytest.approx(math.sqrt(6 / 5 * (resid**2).sum()) / len(d))
    assert math.isnan(paired_delta(torch.ones(3), torch.zeros(3), torch.zeros(3, dtype=torch.long))[1])


def _configs(router, experts):
    import pandas as pd

    from moescope.quant.sweep import CONFIG_COLUMNS

    rows = []
    for target, (delta, se, n) in (("router", router), ("experts", experts)):
        row = dict.fromkeys(CONFIG_COLUMNS, float("nan"))
        row.update(config_id=target, model="moe", target=target, scheme="rtn-asym", bits=4, granularity="channel",
                   layer=-1, n_params=n, delta_nll=delta, delta_nll_se=se)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("router,experts,verdict", [
    ((0.010, 0.001, 1_000), (0.020, 0.001, 1_000_000), "yes"),  # 10 vs 0.02 per M
    ((0.001, 0.0001, 1_000_000), (0.010, 0.001, 1_000), "no"),
    ((0.0001, 0.001, 1_000), (0.020, 0.001, 1_000_000), "inconclusive"),  # router's ΔNLL is within noise of 0
])
def test_summary_verdict(router, experts, verdict):
    from moescope.quant.summary import summarize

    answer = summarize(_configs(router, experts), reference={})["router_vs_experts"][0]
    assert answer["router_costs_more_per_param"] == verdict
    assert answer["router"]["delta_nll_per_mparam"] == pytest.approx(router[0] / (router[2] / 1e6))
    assert f"{verdict}" in answer["statement"] and "4-bit rtn-asym" in answer["statement"]
