"""`moescope import FILE.jsonl --out TRACE`: turn routing JSONL into a trace."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope import routing.jsonl --out traces/imported
  moescope analyze traces/imported --out results/imported
"""


def add_parser(sub) -> None:
    p = add_command(sub, "import", help="import routing JSONL ({problem_id, layer, token_id, expert_ids, weights})", examples=EXAMPLES)
    p.add_argument("file", help="JSONL file")
    p.add_argument("--out", required=True, help="trace folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.trace.exchange import import_jsonl

    trace = import_jsonl(args.file, args.out, overwrite=args.overwrite)
    print(f"wrote {trace.folder}: {trace.n_tokens} tokens x {trace.n_layers} layers")
    return 0
