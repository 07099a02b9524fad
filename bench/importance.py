"""Cost of the importance sweep (ΔNLL of every expert when dropped) against the naive sweep, in one run.

    python bench/importance.py [--model moescope:tiny-moe] [--tokens 2048] [--reps 3] [--threads 1]
    python bench/importance.py --depth 16       # a config-built Qwen3-MoE of 16 layers (random weights)

The prefix replay saves the decoder layers before the intervened one; the embedding and LM head always run
(in tiny-moe, hidden 128 and 8,192 tokens of vocabulary, the LM head and its log-softmax are about half of a
forward pass), so the saving grows with depth: run both.

Ways, interleaved rep by rep in a rotating order so machine noise hits each alike:
  eval pass    one forward pass over the evaluation batches (NLL): the unit
  replay       run_importance(prune=False): capture with expert norms, one reference pass keeping every decoder
               layer's output, then per (MoE layer, expert) only the decoder layers from that layer on
  naive        per (MoE layer, expert): a full forward pass over every batch with the expert dropped
               (moescope.intervene), NLL from the logits (what a notebook does)
Prints seconds (median of reps), multiples of the eval pass, the naive/replay speedup with its min-max over
reps, and the largest |ΔNLL difference| between the two sweeps (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import moescope
from moescope.adapters.discover import find_moe_layers
from moescope.intervention.importance import run_importance
from moescope.quant.reference import token_nll
from moescope.quant.sweep import make_batches


def nll(model, batches) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([token_nll(model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits,
                                    b, 0)[0] for b in batches])


def naive_sweep(model, batches) -> dict[tuple[int, int], float]:
    layers = find_moe_layers(model)
    reference = nll(model, batches).double()
    deltas = {}
    for layer in layers:
        for expert in range(layer.n_experts):
            with moescope.intervene(model, drop={layer.index: [expert]}, layers=layers):
                deltas[(layer.index, expert)] = float((nll(model, batches).double() - reference).mean())
    return deltas


def config_model(depth: int):
    """A random Qwen3-MoE of `depth` layers (hidden 128, 8 experts top-2, vocabulary 8,192) and a byte tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=depth,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=8192, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            torch.nn.init.normal_(module.weight, std=0.3)
    return model, ByteTokenizer()


class ByteTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b for b in text.encode("utf-8")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moescope:tiny-moe")
    parser.add_argument("--depth", type=int, default=None, help="use a config-built Qwen3-MoE of this many layers instead")
    parser.add_argument("--corpus", default="humaneval,wiki")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from moescope.recording.loading import load_model

    model, tokenizer = config_model(args.depth) if args.depth else load_model(args.model, device="cpu", dtype="float32")
    if args.depth:
        args.model = f"config-built Qwen3-MoE, {args.depth} layers"
    batches = make_batches(tokenizer, args.corpus, seq_len=args.seq_len, max_tokens=args.tokens,
                           batch_size=args.batch_size, split="eval")
    layers = find_moe_layers(model)
    n_configs = sum(layer.n_experts for layer in layers)
    n_tokens = int(sum(b.attention_mask.sum() for b in batches))
    print(f"model: {args.model}; {len(layers)} MoE layers; {n_configs} (layer, expert) drops; {n_tokens} tokens in "
          f"{len(batches)} batches; threads {args.threads}; reps {args.reps}")

    times: dict[str, list[float]] = {"eval pass": [], "replay": [], "naive": []}
    found: dict[str, dict] = {}
    nll(model, batches)  # warm-up

    def timed(way: str, tmp: str, rep: int) -> None:
        t = time.perf_counter()
        if way == "eval pass":
            nll(model, batches)
        elif way == "naive":
            found["naive"] = naive_sweep(model, batches)
        else:
            res = run_importance(model, tokenizer, args.corpus, out=f"{tmp}/replay-{rep}", prune=False, split="eval",
                                 max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
            found["replay"] = {(int(r.layer), int(r.expert)): float(r.delta_nll) for r in res.tables["experts"].itertuples()}
        times[way].append(time.perf_counter() - t)

    ways = list(times)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for way in ways[rep % len(ways):] + ways[: rep % len(ways)]:  # rotate: no way always runs first or last
                timed(way, tmp, rep)

    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["eval pass"]
    print(f"\n{'way':<12}{'seconds':>10}{'x eval pass':>14}{'per drop (x eval pass)':>26}")
    for way, seconds in med.items():
        per = "" if way == "eval pass" else f"{seconds / unit / n_configs:>26.3f}"
        print(f"{way:<12}{seconds:>10.3f}{seconds / unit:>14.2f}{per}")
    ratios = [n / r for n, r in zip(times["naive"], times["replay"])]
    print(f"\nall-expert ΔNLL sweep: naive / replay = {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} reps)")
    diff = max(abs(found["replay"][k] - found["naive"][k]) for k in found["naive"])
    print(f"replay vs naive ΔNLL: max |difference| {diff:.2e} over {len(found['naive'])} drops")


if __name__ == "__main__":
    main()
