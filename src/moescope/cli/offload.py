"""`moescope offload TRACE --capacity C[,C...] --out DIR`: expert caches and prefetchers replayed on a trace."""

from __future__ import annotations

import argparse

from moescope.cli._common import add_command, positive_int

EXAMPLES = """  moescope offload traces/run1 --capacity 2,4,6,8 --out results/offload
  moescope offload traces/gen --capacity 4 --policy lru,belady --prefetch none,same-index,popularity --out results/offload-gen
  moescope offload traces/pred --capacity 4 --prefetch router-lookahead --link nvlink4 --out results/offload-nvlink
  moescope offload traces/run1 --capacity 16,32 --scope global --bandwidth 25 --latency-us 15 --out results/offload-global
  moescope offload traces/gen --capacity 4 --phase decode --dtype bf16 --out results/offload-decode
  moescope offload traces/gen --capacity 2,4 --lossy drop-cold:0.5,topk:1 --out results/offload-lossy
  moescope offload traces/gen --capacity 2,4 --lossy drop-cold:0.5,topk:1 --model moescope:tiny-moe --data humaneval --max-tokens 2048 --out results/offload-quality
  moescope report results/offload --out offload.html
(policies: lru, lfu, arc, belady, static (the C most used experts learned on the other fold of documents),
static-oracle (the best fixed set in hindsight); prefetch: none, same-index, transition, popularity, router-lookahead;
links: pcie3x16, pcie4x16, pcie5x16, nvlink3, nvlink4)
"""


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _capacities(text: str) -> tuple[int, ...]:
    try:
        capacities = tuple(int(c) for c in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not capacities:  # "" or ",": leave the option out for the default capacities
        raise argparse.ArgumentTypeError(f"{text!r} names no capacity; give integers such as 2,4 or leave --capacity out")
    return capacities


def add_parser(sub) -> None:
    p = add_command(sub, "offload", help="simulate expert caches (lru, lfu, arc, belady) and prefetchers on a trace: "
                    "hit rate, bytes moved, stall time, decode tokens/s bound", examples=EXAMPLES)
    p.add_argument("trace")
    p.add_argument("--capacity", type=_capacities, default=None, metavar="C[,C...]",
                   help="expert slots per layer (--scope layer) or in all (global); default k, 2k, 4k, ... and E")
    p.add_argument("--policy", type=_names, default=None, help="comma-separated (default all six)")
    p.add_argument("--prefetch", type=_names, default=("none",), help="comma-separated predictors (default none)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="a cache per MoE layer (default) or one budget over all layers")
    p.add_argument("--phase", type=_names, default=None,
                   help="prefill, decode or both (default: both when the trace has generated tokens)")
    p.add_argument("--window", type=positive_int, default=8, metavar="TOKENS",
                   help="tokens per working-set window in offload__coverage (default 8)")
    p.add_argument("--lossy", default=None, metavar="KNOB[,KNOB...]",
                   help="cache-aware lossy routing per capacity: drop-cold:F (skip a non-resident expert whose "
                        "renormalised weight is below F/k), topk:K (route only the K best), rerank:B (add B to "
                        "resident experts' router scores; needs --save-logits); e.g. drop-cold:0.5,topk:1")
    p.add_argument("--model", default=None, help="with --lossy: run this model (the trace's) with the lossy routing "
                   "and report ΔNLL ± standard error")
    p.add_argument("--data", default=None, help="with --model: the text to score (a built-in corpus, file or folder)")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="with --model: tokens scored (default 4096)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="with --model: tokens per sequence (default 256)")
    p.add_argument("--device", default="auto", help="with --model: cpu, cuda, ... (default auto)")
    p.add_argument("--link", default="pcie4x16", help="link preset (default pcie4x16)")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBPS", help="link bandwidth in GB/s (overrides the preset's)")
    p.add_argument("--latency-us", type=float, default=None, help="latency per expert transfer in microseconds")
    p.add_argument("--expert-bytes", type=float, default=None, help="bytes of one expert's weights (default: from the model config)")
    p.add_argument("--dtype", default=None, help="dtype of the expert weights (default: the model config's), e.g. bf16, fp8")
    p.add_argument("--out", required=True, help="folder for the tables and summary.json")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import offload, print_summary

    summary = offload(args.trace, out=args.out, capacities=args.capacity, policies=args.policy, prefetch=args.prefetch,
                          scope=args.scope, window=args.window, phases=args.phase, link=args.link, bandwidth_gbps=args.bandwidth,
                          latency_us=args.latency_us, expert_bytes_each=args.expert_bytes, dtype=args.dtype,
                          lossy=args.lossy, model=args.model, data=args.data, max_tokens=args.max_tokens,
                          seq_len=args.seq_len, device=args.device)
    print_summary(summary)
    print(f"tables and summary.json in {args.out}")
    return 0
