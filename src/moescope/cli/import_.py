"""`moescope import FILE --out TRACE [--format ...]`: turn routing JSONL, or an engine's own routing files, into a trace."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  moescope import routing.jsonl --out traces/imported
  moescope import responses.jsonl --format vllm --out traces/vllm-rollouts      # HTTP responses, return_token_ids
  moescope import routes.npz --format vllm --out traces/replayed                  # the replay layout (export --format replay)
  moescope import expert_distribution_recorder_1700000000.0_0.pt --format sglang --out traces/sglang
  moescope import expert_statistic/ --format trtllm --out load.parquet           # counts -> a load table
  moescope import c4_results.jsonl --format olmoe --out traces/olmoe
  moescope analyze traces/imported --out results/imported
"""

FORMATS = ("jsonl", "vllm", "sglang", "trtllm", "olmoe")


def add_parser(sub) -> None:
    p = add_command(sub, "import", help="import routing JSONL ({problem_id, layer, token_id, expert_ids, weights}) "
                                        "or an engine's own files (--format)", examples=EXAMPLES)
    p.add_argument("file", help="file (or folder, for sglang/trtllm) to read")
    p.add_argument("--out", required=True, help="trace folder to write (a .parquet load table for trtllm counts)")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl (default), vllm, sglang, trtllm or olmoe: see moescope/trace/formats/")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.format != "jsonl":
        from moescope.trace.formats import import_foreign

        print(import_foreign(args.format, args.file, args.out, overwrite=args.overwrite))
        return 0
    from moescope.trace.exchange import import_jsonl

    trace = import_jsonl(args.file, args.out, overwrite=args.overwrite)
    print(f"wrote {trace.folder}: {trace.n_tokens} tokens x {trace.n_layers} layers")
    return 0
