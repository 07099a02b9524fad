"""offload --lossy --model: the model run with cache-dependent routing, against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from simulate_helpers import trace_shards

from moescope.cli.main import main
from moescope.simulate.reference import offload as reference

TEXT = "\n\n".join(
    f"def function_{i}(values):\n    total = 0\n    for value in values:\n        total += value * {i}\n    return total\n"
    f"Paragraph {i}: the experts of a mixture route each token to a few of many feed-forward blocks." for i in range(12))


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    import moescope

    root = tmp_path_factory.mktemp("quality")
    (root / "text.txt").write_text(TEXT)
    moescope.capture("moescope:tiny-moe", str(root / "text.txt"), out=root / "trace", progress=False,  # float32: the lossy run's
                     options=moescope.CaptureOptions(max_tokens=100, seq_len=25, device="cpu", dtype="float32"))  # precision
    argv = ["offload", root / "trace", "--capacity", "2,3", "--lossy", "drop-cold:0.8,topk:1", "--model", "moescope:tiny-moe",
            "--data", root / "text.txt", "--max-tokens", 100, "--seq-len", 25, "--device", "cpu", "--out", root / "out"]
    assert main([str(a) for a in argv]) == 0
    return root


def test_the_lossless_knob_changes_nothing_and_topk_equals_a_top1_model(quality_run):
    table = pd.read_parquet(quality_run / "out" / "offload__lossy.parquet")
    model = table[table["source"] == "model"]
    assert (model[model["knob"] == "lru"]["delta_nll"] == 0.0).all()
    top1 = model[model["knob"] == "topk:1"]
    assert top1["delta_nll"].nunique() == 1  # topk does not depend on the cache
    # independent: the same model with its routers set to top-1 (weights renormalised to 1), NLL by a plain loop
    from moescope.quant.sweep import make_batches
    from moescope.recording.loading import load_model

    net, tokenizer = load_model("moescope:tiny-moe", device="cpu", dtype="float32")  # as the lossy run loads it
    batches = make_batches(tokenizer, str(quality_run / "text.txt"), seq_len=25, max_tokens=100, batch_size=1)

    def nll() -> np.ndarray:
        out = []
        with torch.no_grad():
            for batch in batches:
                logits = net(input_ids=batch.input_ids).logits[0, :-1].double()
                out.append(-torch.log_softmax(logits, -1).gather(1, batch.input_ids[0, 1:, None])[:, 0].numpy())
        return np.concatenate(out)

    before = nll()
    gates = [m for name, m in net.named_modules() if name.endswith("mlp.gate")]
    for gate in gates:
        gate.top_k = 1
    after = nll()
    assert top1["delta_nll"].iloc[0] == pytest.approx(float((after - before).mean()), abs=1e-5)
    assert top1["tokens_scored"].iloc[0] == len(before)
    assert (model[model["knob"] == "drop-cold:0.8"]["delta_nll_se"] > 0).all()


def test_the_models_first_layer_caches_equal_the_per_event_loop(quality_run):
    """Layer 0's routing is the recorded one (nothing before it changed), so its cache in the model run holds
    what the per-event loop over the trace of the same sequences holds."""
    shards, ctx = trace_shards(quality_run / "trace")
    table = pd.read_parquet(quality_run / "out" / "offload__lossy.parquet")
    model = table[(table["source"] == "model") & (table["layer"] == 0)]
    for row in model.itertuples():
        kind, _, value = row.knob.partition(":")
        expected = reference.compute_lossy(shards, ctx, knob=kind, value=float(value or 0), capacity=row.capacity)
        lookups, used, hits, tokens, discarded = expected["counts"][(0, 0)]
        assert (row.lookups, row.used, row.hits) == (lookups, used, hits), row.knob
        assert row.weight_discarded == pytest.approx(discarded / tokens, rel=1e-3)  # the trace holds float16-rounded weights
        trace_rows = table[(table["source"] == "trace") & (table["layer"] == 0) & (table["knob"] == row.knob)
                           & (table["capacity"] == row.capacity)]
        assert trace_rows["hits"].iloc[0] == hits
