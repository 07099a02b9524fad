"""`moescope report RESULTS... --out report.html`: one self-contained HTML page (and figure files)."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope report results/run1 --out report.html
  moescope report results/tiny-moe results/tiny-varmoe results/quant --out report.html --figures figures/
"""


def add_parser(sub) -> None:
    p = add_command(sub, "report", help="turn analysis and quantization results into one HTML report", examples=EXAMPLES)
    p.add_argument("results", nargs="+", help="folders written by `moescope analyze` or `moescope quant`")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--figures", default=None, help="also write every figure as PNG and SVG into this folder")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import report

    path = report(args.results, args.out, figures=args.figures)
    print(f"wrote {path}")
    return 0
