"""`moescope importance MODEL --data CORPUS --out DIR`: which experts matter, by dropping each one."""

from __future__ import annotations

from moescope.cli._common import add_command, positive_int

EXAMPLES = """  moescope importance moescope:tiny-moe --data humaneval,gsm-symbolic,wiki --out results/importance
  moescope importance ./Qwen1.5-MoE-A2.7B --data corpus.jsonl:text --layers 0,12,23 --max-tokens 4096 --out results/imp
  moescope importance moescope:tiny-moe --data wiki --no-prune --out results/imp-wiki   # ΔNLL and statistics only
(an interrupted sweep resumes at the next configuration when rerun; `moescope report DIR` draws it)
"""


def add_parser(sub) -> None:
    p = add_command(sub, "importance", help="ΔNLL of every expert when dropped, routing statistics and REAP against it, "
                    "pruning curves, specialisation by domain", examples=EXAMPLES)
    p.add_argument("model", help="Hugging Face id, local folder or moescope:NAME")
    p.add_argument("--data", required=True, help="corpus spec: built-in corpora give their eval split, your own data is used whole; a mixture (humaneval,wiki) adds the per-domain answers")
    p.add_argument("--out", required=True, help="folder for the trace, tables and summary.json")
    p.add_argument("--layers", default=None, help="MoE-layer indices to sweep, comma-separated (default: all)")
    p.add_argument("--split", choices=("all", "train", "eval"), default=None,
                   help="read this split of every source instead (default: eval for built-in corpora, all of your own data)")
    p.add_argument("--max-tokens", type=positive_int, default=8192)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--no-prune", action="store_true", help="skip the pruning curves (one pass per criterion and share)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import importance

    summary = importance(
        args.model, args.data, out=args.out, layers=args.layers, split=args.split, max_tokens=args.max_tokens,
        seq_len=args.seq_len, batch_size=args.batch_size, prune=not args.no_prune, device=args.device,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    for line in summary.get("statements", []):
        print(line)
    print(f"tables and summary.json in {args.out}")
    return 0
