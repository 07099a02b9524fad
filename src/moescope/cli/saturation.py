"""`moescope saturation CKPT... --final CKPT --data SPEC --out DIR`: routing across checkpoints against the final one."""

from __future__ import annotations

from moescope.cli._common import add_command, positive_int

EXAMPLES = """  moescope saturation run/checkpoint-100 run/checkpoint-200 run/checkpoint-400 --final run/final \\
      --data humaneval,wiki --out results/saturation
  moescope saturation ckpts/step-* --final ckpts/step-1000 --data notes.txt --out results/sat --max-tokens 4096
  moescope report results/saturation --out report.html            # the figure and table in the report
"""


def add_parser(sub) -> None:
    p = add_command(sub, "saturation", examples=EXAMPLES,
                    help="top-1 agreement and top-k overlap of each checkpoint's routing with the final checkpoint's")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="model folders (or ids) of the earlier checkpoints")
    p.add_argument("--final", required=True, help="the final checkpoint: its tokenizer makes the tokens all are run on")
    p.add_argument("--data", required=True, help="corpus spec (see `moescope capture --help`)")
    p.add_argument("--out", required=True, help="folder for the table, summary.json and each checkpoint's trace")
    p.add_argument("--max-tokens", type=positive_int, default=8192)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--split", default="all", choices=("all", "train", "eval"))
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import saturation

    summary = saturation(args.checkpoints, args.final, args.data, out=args.out, max_tokens=args.max_tokens,
                             seq_len=args.seq_len, batch_size=args.batch_size, split=args.split, device=args.device)
    s = summary["saturation"]
    for label in s["checkpoints"]:
        print(f"{label}: top-1 agreement {s['top1_agreement'][label]:.1%}, top-k overlap {s['topk_overlap'][label]:.1%}")
    print(f"table and summary.json in {args.out}; `moescope report {args.out} --out report.html` draws the figure")
    return 0
