"""The quant sweep's local routing re-routes by each family's declared policy, not by top-k of the logits.

Local routing re-runs each router on its cached inputs; with unquantized weights it must reproduce, token by
token, the ids and gate weights the experts received in the reference pass (recorded at the experts' input),
including for routers that take the block's correction bias as an argument, hash-routed layers, L_p
renormalisation (DBRX) and a DeepSeek-V3 whose correction biases decide most choices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from quant_models import ByteTokenizer, documents
from moescope.adapters.discover import find_moe_layers
from moescope.quant import run_quant_sweep
from moescope.quant.reference import reference_pass
from moescope.quant.sweep import make_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.adapters.test_policy import _biased_deepseek_v3, by_id  # noqa: E402
from tests.adapters.tiny_configs import build_tiny_model  # noqa: E402

DOCS = documents(4, 30)


@pytest.mark.parametrize("family", ["afmoe", "hy_v3", "minimax_m2", "lfm2_moe", "deepseek_v4", "dbrx", "gemma4_text",
                                    "deepseek_v3-biased"])
def test_local_routing_reproduces_what_the_experts_received(family):
    model = _biased_deepseek_v3() if family == "deepseek_v3-biased" else build_tiny_model(family)
    layers = find_moe_layers(model)
    batches = make_batches(ByteTokenizer(), DOCS, seq_len=24, max_tokens=120, batch_size=3)
    ref = reference_pass(model, batches, layers, layer_list=None, keep_outputs=False)
    for i in range(len(layers)):
        recorded_ids, recorded_w = by_id(torch.cat([b.ids[i] for b in ref.batches]), torch.cat([b.weights[i] for b in ref.batches]))
        ids, weights = by_id(*ref.local[i][:2])
        assert torch.equal(ids, recorded_ids), f"{family} MoE layer {i}"
        torch.testing.assert_close(weights, recorded_w.float(), rtol=1e-5, atol=1e-6)
        assert ref.local_agreement[i] == 1.0


def test_router_only_sweep_runs_on_a_router_that_takes_the_blocks_bias(tmp_path):
    res = run_quant_sweep(build_tiny_model("afmoe"), ByteTokenizer(), DOCS, out=tmp_path, targets="router", bits=(2, 8),
                          end_to_end=False, max_tokens=120, seq_len=24, batch_size=3, progress=False)
    assert res.summary["reference"]["moe"]["local_reference_agreement"] == [1.0, 1.0, 1.0]
    flips = res.configs.set_index("bits")["flip_topk_set_local"]
    assert flips.loc[2] > flips.loc[8] >= 0
