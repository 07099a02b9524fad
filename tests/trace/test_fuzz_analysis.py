"""Property-based: traces whose routing holds what real models and damaged captures produce — NaN, infinite and
negative gate weights, expert ids of -1 (dropped) or beyond the expert count (zero-compute experts), unknown
token ids, one-token sequences, many domains — go through every analysis (`moescope analyze`, no model) to
tables and a JSON summary, or to one MoescopeError; never another exception."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from moescope.errors import MoescopeError
from moescope.pipeline.analyze import analyze_trace
from moescope.trace.block import TokenBlock, routing_table, tokens_table
from moescope.trace.schema import SEQUENCES_SCHEMA
from moescope.trace.writer import TraceWriter

WEIGHTS = st.one_of(st.floats(0, 1, width=16), st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 0.0, 2.5, 65504.0]))


@st.composite
def hostile_trace(draw):
    n_layers, n_experts = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    k = draw(st.integers(1, min(3, n_experts)))
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))  # tokens per sequence
    T = sum(lengths)
    seq_id = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    ids = np.array(draw(st.lists(st.integers(-1, n_experts + 1), min_size=n_layers * T * k, max_size=n_layers * T * k)),
                   np.int16).reshape(n_layers, T, k)
    weights = np.array(draw(st.lists(WEIGHTS, min_size=ids.size, max_size=ids.size)), np.float32).reshape(ids.shape)
    token_id = np.array(draw(st.lists(st.integers(-1, 40), min_size=T, max_size=T)), np.int32)
    entropy = np.array(draw(st.lists(st.one_of(st.floats(0, 10, width=32), st.just(np.nan)), min_size=T, max_size=T)),
                       np.float32)
    domains = [draw(st.sampled_from(["code", "math", "prose", "ünïcode", ""])) for _ in lengths]
    block = TokenBlock(seq_id, pos, token_id, np.zeros(T, bool), entropy, ids, weights, None)
    layers = [{"moe_layer": i, "decoder_layer": i, "module": f"layers.{i}.mlp", "n_experts": n_experts, "top_k": k,
               "n_shared_experts": 0, "expert_sizes": None, "scoring": "softmax", "spec": None} for i in range(n_layers)]
    sequences = pa.Table.from_pylist([dict(seq_id=i, source="fuzz", domain=d, doc_id=str(i), n_tokens=n, text_sha1="")
                                      for i, (d, n) in enumerate(zip(domains, lengths))], schema=SEQUENCES_SCHEMA)
    return layers, block, sequences


@given(case=hostile_trace())
def test_every_analysis_survives_hostile_routing(tmp_path_factory, case):
    layers, block, sequences = case
    root = tmp_path_factory.mktemp("fuzz") / uuid.uuid4().hex
    manifest = {"model": {"id": "fuzz", "hidden_size": None}, "layers": layers, "capture": {}, "corpus": {"spec": "fuzz"}}
    with TraceWriter(root / "trace", manifest) as writer:
        writer.write_shard({"routing": routing_table(block), "tokens": tokens_table(block), "sequences": sequences},
                           seq_id_min=0, seq_id_max=int(block.seq_id.max()))
        writer.finish()
    try:
        summary = analyze_trace(root / "trace", root / "results", use_model=False)
    except MoescopeError as err:
        assert str(err) and "\n" not in str(err)
        return
    json.dumps(summary, allow_nan=True)  # the summary is what summary.json holds
    assert json.loads((root / "results" / "summary.json").read_text())["trace"]["tokens"] == block.n_tokens
