"""Cost of a router-only per-layer quantization sweep, as a multiple of one unquantized evaluation pass.

    python bench/quant.py [--model moescope:tiny-moe] [--tokens 8192] [--reps 3] [--threads 1]

Configurations: every MoE layer's router alone, plus all routers together, x bits 2,3,4,8, one scheme
(rtn-asym, per channel). Ways, interleaved rep by rep in a rotating order so machine noise hits each alike:
  eval pass    one unquantized forward pass over the evaluation batches (NLL): the unit
  local        run_quant_sweep(end_to_end=False): one reference pass, then each router re-applied to its
               cached inputs (routing only; tables and summary written)
  naive        one reference pass, then per configuration: patch, full forward over every batch recording
               the routing (and NLL from the same logits), compare (what a notebook does)
  full         run_quant_sweep(end_to_end=True): local + NLL + end-to-end routing, unquantized prefix
               layers replayed from the reference
  full/noreplay  the same without prefix replay
Prints wall time as multiples of the eval pass and the speedups, each as median (min–max) over the reps with
ratios paired within a repetition (bench/_timing.py), and checks that local and naive agree on each router's
own layer (its input is unchanged there, so they must).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _timing import Spread, interleave, paired_ratios, verdict

from moescope.adapters.discover import find_moe_layers
from moescope.quant import make_format, quantized, run_quant_sweep
from moescope.quant.reference import token_nll
from moescope.quant.routing import RoutingDelta
from moescope.quant.sweep import make_batches
from moescope.recording.hooks import RoutingRecorder

BITS = (2, 3, 4, 8)
SCHEME = "rtn-asym"


class ByteTokenizer:
    """For a config-built model without a tokenizer: UTF-8 bytes as ids."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b for b in text.encode("utf-8")]}


def make_model(name: str | None):
    if name:
        from moescope.recording.loading import load_model

        return load_model(name, device="cpu", dtype="float32")
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=8192, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.3)
    return model, ByteTokenizer()


def eval_pass(model, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            token_nll(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits, batch, 0)


def _routing(model, layers, batches):
    """Routing of every batch, and NLL from the same forward (the naive way gets quality for free)."""
    with RoutingRecorder(model, layers, weights_dtype=torch.float32) as rec, torch.inference_mode():
        out = []
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            token_nll(logits, batch, 0)
            keep = batch.attention_mask.reshape(-1).bool()
            out.append([(torch.cat(c.ids)[keep].long(), torch.cat(c.weights)[keep]) for c in rec.take()])
    return out


def naive_sweep(model, batches) -> dict[tuple[int, int], float]:
    """Reference pass, then a full forward per configuration; returns top-k set flip rate on each router's own layer."""
    layers = find_moe_layers(model)
    reference = _routing(model, layers, batches)
    flips = {}
    for bits in BITS:
        for scope in [-1, *[layer.decoder_layer for layer in layers]]:
            fmt = make_format(SCHEME, bits, "channel")
            with quantized(model, "router", fmt, layers=None if scope < 0 else scope):
                routed = _routing(model, layers, batches)
                for i, layer in enumerate(layers):
                    if scope >= 0 and layer.decoder_layer != scope:
                        continue
                    delta = RoutingDelta()
                    for ref_b, q_b in zip(reference, routed):
                        delta.add(*ref_b[i], *q_b[i])
                    if scope >= 0:
                        flips[(bits, scope)] = delta.result()["flip_topk_set"]
    return flips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="e.g. moescope:tiny-moe (default: shipped tiny-moe if present, "
                        "else a config-built Qwen3-MoE of the same shape)")
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    name = args.model
    if name is None:
        from moescope.models import WEIGHTS_DIR

        name = "moescope:tiny-moe" if (WEIGHTS_DIR / "tiny-moe" / "config.json").is_file() else None
    model, tokenizer = make_model(name)
    from moescope.corpora import load_corpus

    docs = load_corpus(args.corpus, split="eval")
    batches = make_batches(tokenizer, docs, seq_len=args.seq_len, max_tokens=args.tokens, batch_size=args.batch_size)
    layers = find_moe_layers(model)
    n_configs = len(BITS) * (len(layers) + 1)
    n_tokens = int(sum(b.attention_mask.sum() for b in batches))
    print(f"model: {name or 'config-built Qwen3-MoE (hidden 128, 4 layers, 8 experts top-2)'}; {len(layers)} MoE layers; "
          f"{n_tokens} tokens in {len(batches)} batches; {n_configs} configurations "
          f"(each router alone + all routers, bits {','.join(map(str, BITS))}, {SCHEME}/channel); "
          f"threads {args.threads}; reps {args.reps}")

    sweep_kw = dict(targets="router", bits=BITS, schemes=SCHEME, granularity="channel", per_layer=True,
                    max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, overwrite=True,
                    progress=False)
    flips: dict[str, dict] = {}

    def sweep(way: str, tmp: str) -> None:
        if way == "naive":
            flips["naive"] = naive_sweep(model, batches)
            return
        res = run_quant_sweep(model, tokenizer, docs, out=f"{tmp}/{way.replace('/', '-')}", end_to_end=way != "local",
                              reuse_prefix=way == "full", **sweep_kw)
        if way == "local":
            pl = res.per_layer[(res.per_layer["mode"] == "local") & (res.per_layer["layer"] >= 0)]
            flips["local"] = {(int(r.bits), int(r.layer)): float(r.flip_topk_set) for r in pl.itertuples()}

    with tempfile.TemporaryDirectory() as tmp:
        ways = {"eval pass": lambda: eval_pass(model, batches),
                **{way: lambda way=way: sweep(way, tmp) for way in ("local", "naive", "full", "full/noreplay")}}
        times = interleave(ways, args.reps)  # a warm-up round first, unmeasured

    unit = times["eval pass"]
    print(f"\n{'way':<16}{'seconds':>26}{'x eval pass (paired)':>26}")
    for way, seconds in times.items():
        print(f"{way:<16}{Spread.of(seconds).text('.3f'):>26}{paired_ratios(seconds, unit).text('.2f'):>26}")
    speedup = paired_ratios(times["naive"], times["local"])
    print(f"\nrouter-only per-layer sweep, routing only: local {paired_ratios(times['local'], unit).text('.2f')}x vs naive "
          f"{paired_ratios(times['naive'], unit).text('.2f')}x one eval pass -> speedup {speedup.text('.1f')}x "
          f"({verdict(speedup, 'local faster', 'local slower')})")
    speedup = paired_ratios(times["naive"], times["full"])
    print(f"with quality (NLL) and end-to-end routing: full {paired_ratios(times['full'], unit).text('.2f')}x "
          f"(no replay {paired_ratios(times['full/noreplay'], unit).text('.2f')}x) vs naive -> speedup {speedup.text('.2f')}x "
          f"({verdict(speedup, 'full faster', 'full slower')}); prefix replay: "
          f"{verdict(paired_ratios(times['full/noreplay'], times['full']), 'faster', 'slower')}")
    diff = max(abs(flips["local"][k] - flips["naive"][k]) for k in flips["naive"])
    print(f"local vs naive top-k set flip rate on each router's own layer: max |difference| {diff:.2e} "
          f"over {len(flips['naive'])} configurations")


if __name__ == "__main__":
    main()
