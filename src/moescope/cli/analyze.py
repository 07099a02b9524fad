"""`moescope analyze TRACE --out DIR`: every routing analysis, as tables and summary.json."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope analyze traces/run1 --out results/run1
  moescope analyze traces/run1 --out results/run1 --only load,cross_layer,expert_cache
  moescope analyze traces/imported --out results/imported --no-model     # routing-only analyses
  moescope analyze traces/big --out results/big --ray auto                 # shards accumulated on a Ray cluster
  moescope analyze load/ --out results/served                              # a load table (vLLM plugin, TensorRT-LLM)
"""


def add_parser(sub) -> None:
    p = add_command(sub, "analyze", help="compute load, confidence, co-activation, cross-layer, domain, token and cost analyses", examples=EXAMPLES)
    p.add_argument("trace")
    p.add_argument("--out", required=True, help="folder for the tables and summary.json")
    p.add_argument("--only", default=None, help="comma-separated analysis names")
    p.add_argument("--model", default=None, help="model to read router weights/tokenizer from (default: the trace's)")
    p.add_argument("--no-model", action="store_true", help="skip what needs the model")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="accumulate shards on a Ray cluster (an address, auto; alone: start one on this machine)")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import analyze, print_summary, print_warnings
    from moescope.errors import MoescopeError

    if args.model and args.no_model:
        raise MoescopeError("--model and --no-model contradict each other; give one")
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    summary = analyze(args.trace, only, args.model, out=args.out, use_model=not args.no_model, ray=args.ray).summary
    print_summary(summary)
    print_warnings(summary)
    print(f"tables and summary.json in {args.out}")
    return 0
