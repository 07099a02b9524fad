"""`moescope replay-check TRACE --model M`: recompute the trace's routing in transformers and report the mismatch."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope replay-check traces/vllm-rollouts --model moescope:tiny-moe --dtype float32
  moescope replay-check traces/rollouts --model ./Qwen3-30B-A3B --dtype bfloat16 --device cuda --out results/replay
  # what `--out` holds: replay_check.csv/.parquet (per layer), flagged_rows.parquet (seq_id, pos, layer, kind)
"""


def add_parser(sub) -> None:
    p = add_command(sub, "replay-check", help="recompute a trace's routing with the model on the same tokens: the "
                    "share of tokens whose expert set / first choice differs, gate-weight differences, and rows "
                    "that are all zeros, duplicated or misaligned", examples=EXAMPLES)
    p.add_argument("trace")
    p.add_argument("--model", required=True, help="Hugging Face id, local folder or moescope:NAME to recompute with")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for the tables and flagged rows (default: print only)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import replay_check

    result = replay_check(args.trace, args.model, dtype=args.dtype, device=args.device, out=args.out,
                          trust_remote_code=args.trust_remote_code)
    print(result["text"])
    if args.out:
        print(f"tables and flagged rows in {args.out}")
    return 0
