"""Shared by the simulation tests: real tiny-moe traces (captured once per session) and small shards."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard
from moescope.pipeline.analyze import analysis_context
from moescope.trace.shard import ShardData

# shapes that exercise the code paths: top-1, invalid ids (dropped -1 and zero-compute ids >= E), E > 64
SPECS = {
    "k2": SyntheticSpec(n_layers=3, n_experts=6, top_k=2, seq_len=(1, 30), predicted_next_ids=True,
                        generated_fraction=0.3, router_output=None, vocab_size=40),
    "k1": SyntheticSpec(n_layers=2, n_experts=5, top_k=1, seq_len=(1, 9), router_output=None, vocab_size=30,
                        generated_fraction=0.5),
    "k3_invalid": SyntheticSpec(n_layers=4, n_experts=7, top_k=3, seq_len=(2, 20), router_output=None, output_entropy=False,
                                invalid_fraction=0.1, vocab_size=25, predicted_next_ids=True, generated_fraction=0.2),
    "wide": SyntheticSpec(n_layers=2, n_experts=70, top_k=4, seq_len=(1, 40), predicted_next_ids=True, router_output=None,
                          vocab_size=50, generated_fraction=0.4),
}
LAYOUTS = {"one_token": [1], "seven_tokens": [7], "256_tokens_uneven": [100, 1, 7, 148]}


def shards_of(spec: SyntheticSpec, layout: list[int], seed: int = 0) -> list[ShardData]:
    return [synthetic_shard(spec, n, seed=seed, shard_index=i) for i, n in enumerate(layout)]


def ids_list(shards: list[ShardData]) -> list[list[list[int]]]:
    """[L][T][k] expert ids of the shards, concatenated in trace order."""
    return np.concatenate([s.topk_ids for s in shards], axis=1).astype(int).tolist()


@pytest.fixture(scope="session")
def generated_trace(tmp_path_factory):
    """moescope:tiny-moe on code and math prompts with 12 generated tokens each (prefill + decode), 2 shards."""
    import moescope

    out = tmp_path_factory.mktemp("traces") / "gen"
    moescope.capture("moescope:tiny-moe", "humaneval,gsm-symbolic", out=out, progress=False,
                     options=moescope.CaptureOptions(max_tokens=700, seq_len=40, generate=12, shard_tokens=300, device="cpu"))
    return out


@pytest.fixture(scope="session")
def lookahead_trace(tmp_path_factory):
    """moescope:tiny-moe prompts with the next layer's router prediction (--predict-next-layer)."""
    import moescope

    out = tmp_path_factory.mktemp("traces") / "pred"
    moescope.capture("moescope:tiny-moe", "wiki,humaneval", out=out, progress=False,
                     options=moescope.CaptureOptions(max_tokens=500, seq_len=64, predict_next_layer=True, device="cpu"))
    return out


def trace_shards(folder):
    """(shards, analysis context) of a trace folder."""
    from moescope.trace.reader import open_trace

    trace = open_trace(folder)
    return list(trace.shards()), analysis_context(trace)
