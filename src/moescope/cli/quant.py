"""`moescope quant MODEL --data CORPUS --out DIR`: how routing and quality suffer under low-bit weights."""

from __future__ import annotations

from moescope.cli._common import add_command, positive_int

EXAMPLES = """  moescope quant moescope:tiny-moe --data wiki --bits 2,3,4,8 --targets router,experts --dense-model moescope:tiny-dense --out results/quant
  moescope quant ./Qwen1.5-MoE-A2.7B --data wiki --bits 4 --targets router --scheme rtn-sym,nf4 --per-layer --out results/q
  moescope quant moescope:tiny-moe --data prompts.jsonl:text --bits 4 --targets router --out results/mine   # the whole file
(a sweep interrupted at any point resumes at the next configuration when rerun)
"""


def add_parser(sub) -> None:
    p = add_command(sub, "quant", help="quantization sensitivity of routers, experts and attention", examples=EXAMPLES)
    p.add_argument("model")
    p.add_argument("--data", required=True, help="corpus spec: built-in corpora give their eval split, your own data is used whole")
    p.add_argument("--split", choices=("all", "train", "eval"), default=None,
                   help="read this split of every source instead (default: eval for built-in corpora, all of your own data)")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--targets", default="router,experts,shared,attention,all")
    p.add_argument("--scheme", default="rtn-asym", help="rtn-asym, rtn-sym, nf4, fp4, nvfp4 (comma-separated)")
    p.add_argument("--granularity", default="auto", help="auto, tensor, channel or group:N (comma-separated)")
    p.add_argument("--per-layer", action="store_true", help="also quantize each layer alone")
    p.add_argument("--dense-model", default=None, help="dense control model sharing the tokenizer (e.g. moescope:tiny-dense)")
    p.add_argument("--max-tokens", type=positive_int, default=16384)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import quant_sweep

    sweep = quant_sweep(
        args.model, args.data, out=args.out, bits=args.bits, targets=args.targets, schemes=args.scheme,
        granularity=args.granularity, per_layer=args.per_layer, dense_model=args.dense_model,
        max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
        split=args.split, overwrite=args.overwrite, progress=not args.no_progress,
    )
    for answer in sweep.summary.get("router_vs_experts", []):
        print(answer["statement"])
    print(f"tables and summary.json in {args.out}")
    return 0
