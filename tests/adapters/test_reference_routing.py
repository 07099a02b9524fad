"""Every family routes as the reference says, its RouterSpec says the same, and every MoE family is declared.

For each family: build a tiny random model (routers randomised), run one padded batch, and compare the
ids and weights each experts module actually received (for Llama4/JetMoE: the routing the block applied,
decoded from the router's return value) with the independent NumPy reference (reference_routing.py, its
policy table keyed by model_type) computed from the router's input and weights. Also check that the router
output is what the reference says it is (logits, or probabilities whose rows sum to 1) and sits at its
index. Then the two declarations — moescope's families.py and the reference's table — must agree on every
field they share, so a wrong RouterSpec shows.
"""

from __future__ import annotations

import pathlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moescope.adapters.families import FAMILIES, UNSUPPORTED
from moescope.adapters.spec import RouterOutput, Scoring, Selection

from .reference_routing import (
    as_experts_receive,
    config_top_k,
    is_probability_rows,
    policy_of,
    reference_routing,
    router_inputs_and_expert_args,
)
from .tiny_configs import (
    CAUSAL_MOE_FAMILIES,
    COMPOSITE_TEXT_TYPES,
    MULTIMODAL_TEXT_FAMILIES,
    build_tiny_model,
)

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


# Model types whose modeling file mentions router_logits but that hold no routed experts.
NOT_MOE = {
    "gemma4_unified": "only forwards output_router_logits record keys; its decoder has no experts",
    "gemma4_unified_text": "only forwards output_router_logits record keys; its decoder has no experts",
}


def _causal_types_mentioning_router_logits() -> list[str]:
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        folder = root / model_type_to_module_name(model_type)
        if any("router_logits" in p.read_text() for p in folder.glob("modeling_*.py")):
            found.append(model_type)
    return found


def test_every_causal_moe_family_is_declared_or_unsupported():
    causal = _causal_types_mentioning_router_logits()
    assert len(causal) > 60
    missing = [t for t in causal if t not in FAMILIES and t not in UNSUPPORTED and t not in NOT_MOE]
    assert not missing, f"MoE causal LMs with neither a RouterSpec nor a reason: {missing}"
    assert not set(FAMILIES) & set(UNSUPPORTED)
    assert all(spec.family == family for family, spec in FAMILIES.items())
    assert all(f in FAMILIES or f in UNSUPPORTED for f in CAUSAL_MOE_FAMILIES + MULTIMODAL_TEXT_FAMILIES)


@pytest.mark.parametrize("composite", sorted(COMPOSITE_TEXT_TYPES))
def test_composite_types_route_like_their_text_decoder(composite):
    text_type = COMPOSITE_TEXT_TYPES[composite]
    assert CONFIG_MAPPING[composite]().get_text_config().model_type == text_type
    assert replace(FAMILIES[composite], family=text_type) == FAMILIES[text_type]


TESTED = sorted(f for f in CAUSAL_MOE_FAMILIES + MULTIMODAL_TEXT_FAMILIES if f in FAMILIES)


@pytest.mark.parametrize("family", TESTED)
def test_reference_matches_model(family):
    policy = policy_of(family)
    model = build_tiny_model(family)
    input_ids, mask = padded_batch()
    records = router_inputs_and_expert_args(model, input_ids, mask)
    assert records, f"{family}: no MoE block found"
    k = config_top_k(model.config)
    n_tokens = input_ids.numel()
    for record in records:
        where = f"{family} {record.block_path}"
        assert record.ids.shape == (n_tokens, k), where
        ref = reference_routing(model.config, record.router_input, record.params, top_k=k, extra_inputs=record.extra_inputs)
        assert_same_routing(record.ids, record.weights, as_experts_receive(ref, model.config), k, where)

        out = record.router_output
        assert out.shape == ref.router_output.shape, where
        np.testing.assert_allclose(out, ref.router_output, rtol=1e-4, atol=1e-4, err_msg=f"{where}: router output")
        if policy.output_is_probs:
            assert is_probability_rows(out), f"{where}: declared probs, rows do not sum to 1"
        else:
            assert not is_probability_rows(out), f"{where}: declared logits, router returns probabilities"

    # the randomised routers really spread tokens, else the comparison above proves little
    used = np.unique(np.concatenate([r.ids.reshape(-1) for r in records]))
    assert len(used) >= 3, f"{family}: all tokens go to experts {used.tolist()}"


def test_collection_hooks_are_removed_after_success_and_after_an_exception():
    model = build_tiny_model("mixtral")

    def n_hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    router_inputs_and_expert_args(model, *padded_batch())
    assert n_hooks() == 0
    with pytest.raises(IndexError):
        router_inputs_and_expert_args(model, torch.full((1, 3), 10_000))  # id beyond the vocabulary
    assert n_hooks() == 0


_CUSTOM_POLICIES = {"gemma4", "inkling", "zaya"}  # RouterSpec says Scoring.CUSTOM for these


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_declared_spec_agrees_with_the_reference_table(family):
    """families.py and the reference's own table are two declarations of each family's routing; a field
    they disagree on is a bug in one of them."""
    spec, policy = FAMILIES[family], policy_of(family)
    declared = {
        "scoring": "custom" if policy.scoring in _CUSTOM_POLICIES else policy.scoring,
        "router_attr": policy.router,
        "router_output_index": policy.output_index,
        "router_output": RouterOutput.PROBS if policy.output_is_probs else RouterOutput.LOGITS,
        "experts_attr": policy.experts,
        "selection": Selection.ROUTER_TOPK if policy.from_router_output else Selection.EXPERTS_INPUT,
        "renormalize": policy.renormalize,
        "bias_attr": policy.bias,
        "scaling_attr": policy.scale,
        "output_scale_attr": policy.output_scale,
        "scoring_attr": policy.scoring_attr,
        "grouped": policy.grouped,
        "shared_experts_attr": policy.shared,
        "non_compute": policy.non_compute,
    }
    got = {name: getattr(spec, name) for name in declared}
    got["scoring"] = str(spec.scoring)
    got["non_compute"] = None if spec.non_compute is None else (str(spec.non_compute.kind), spec.non_compute.count)
    assert got == declared
    assert (spec.scoring == Scoring.CUSTOM) == (policy.scoring in _CUSTOM_POLICIES)
