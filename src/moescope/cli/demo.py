"""`moescope demo`: capture the shipped tiny models over the built-in corpora and run everything."""

from __future__ import annotations

from moescope.cli._common import add_command, positive_int

EXAMPLES = """  moescope demo --out moescope-demo
  moescope demo --out /tmp/quick --max-tokens 4000 --steps capture,analyze
"""


def add_parser(sub) -> None:
    p = add_command(sub, "demo", help="run the whole pipeline offline on the shipped tiny models", examples=EXAMPLES)
    p.add_argument("--out", default="moescope-demo", help="folder for everything (default moescope-demo)")
    p.add_argument("--max-tokens", type=positive_int, default=24000, help="tokens captured per model")
    p.add_argument("--quant-tokens", type=positive_int, default=4096, help="evaluation tokens of the quantization sweep")
    p.add_argument("--steps", default="capture,analyze,quant,report", help="comma-separated subset of the steps")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import demo

    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    demo(args.out, max_tokens=args.max_tokens, quant_tokens=args.quant_tokens, steps=steps, progress=not args.no_progress)
    return 0
