"""`moescope compare A B --out DIR`: two traces side by side."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope compare traces/code traces/math --out results/code-vs-math
  moescope compare traces/fp traces/int4 --out results/fp-vs-int4     # same texts: per-token agreement too
(per-token agreement covers the tokens both traces hold: sequences of the same text, up to their first differing token)
"""


def add_parser(sub) -> None:
    p = add_command(sub, "compare", help="compare the routing of two traces", examples=EXAMPLES)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out", required=True)
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import compare

    summary = compare(args.a, args.b, out=args.out)
    print(summary["per_token"])
    for key in ("mean_load_js_divergence", "mean_top1_agreement", "mean_topk_jaccard", "note"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"side-by-side tables in {args.out}")
    return 0
