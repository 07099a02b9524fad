"""`moescope import FILE.jsonl --out TRACE`: turn routing JSONL into a trace."""

from __future__ import annotations

from moescope.cli._common import add_command, manifest_bytes, positive_int

EXAMPLES = """  moescope import routing.jsonl --out traces/imported --n-experts 64
  moescope import routing.jsonl --out traces/imported       # expert count inferred from the largest id (said on stderr)
  moescope analyze traces/imported --out results/imported
"""


def add_parser(sub) -> None:
    p = add_command(sub, "import", help="import routing JSONL ({problem_id, layer, token_id, expert_ids, weights})", examples=EXAMPLES)
    p.add_argument("file", help="JSONL file")
    p.add_argument("--out", required=True, help="trace folder to write")
    p.add_argument("--n-experts", type=positive_int, default=None, metavar="E",
                   help="routed experts per MoE layer (one value for every layer); without it the count is inferred "
                        "from the largest expert id seen, so experts never routed to are missing")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.trace.exchange import import_jsonl

    before = manifest_bytes(args.out)
    trace = import_jsonl(args.file, args.out, n_experts=args.n_experts, overwrite=args.overwrite)
    if not args.overwrite and before is not None and manifest_bytes(args.out) == before:
        print(f"{trace.folder} already holds this import ({trace.n_tokens} tokens x {trace.n_layers} layers): nothing written")
        return 0
    print(f"wrote {trace.folder}: {trace.n_tokens} tokens x {trace.n_layers} layers")
    return 0
