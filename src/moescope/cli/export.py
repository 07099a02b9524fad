"""`moescope export TRACE --format jsonl|csv|replay --out FILE`."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope export traces/run1 --format jsonl --out run1.jsonl
  moescope export traces/run1 --format csv --out run1.csv
  moescope export traces/rollouts --format replay --out routes.npz   # per request int16 [tokens, MoE layers, k]
"""


def add_parser(sub) -> None:
    p = add_command(sub, "export", help="write a trace's routing as JSONL (one line per token and layer), CSV, or the routing-replay "
                                        "layout RL frameworks consume (.npz, per request [tokens, MoE layers, k])", examples=EXAMPLES)
    p.add_argument("trace")
    p.add_argument("--format", choices=("jsonl", "csv", "replay"), required=True)
    p.add_argument("--out", required=True, help="file to write (or an object-store URL, s3://bucket/name)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import export

    n = export(args.trace, args.out, format=args.format, overwrite=args.overwrite)
    print(f"wrote {n} {'sequences' if args.format == 'replay' else 'rows'} to {args.out}")
    return 0
