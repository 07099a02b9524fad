"""`moescope import FILE --out TRACE [--format ...]`: turn routing JSONL, or an engine's own routing files, into a trace."""

from __future__ import annotations

from moescope.cli._common import add_command, manifest_bytes, positive_int

EXAMPLES = """  moescope import routing.jsonl --out traces/imported --n-experts 64
  moescope import routing.jsonl --out traces/imported       # expert count inferred from the largest id (said on stderr)
  moescope import responses.jsonl --format vllm --out traces/vllm-rollouts --n-experts 64  # HTTP responses, return_token_ids
  moescope import routes.npz --format vllm --out traces/replayed                  # the replay layout (export --format replay)
  moescope import expert_distribution_recorder_1700000000.0_0.pt --format sglang --out traces/sglang
  moescope import expert_statistic/ --format trtllm --out load.parquet           # counts -> a load table
  moescope import expert_statistic/ --format trtllm --slot-map eplb.yaml --out load.parquet  # load balancer on: slots
  moescope import c4_results.jsonl --format olmoe --out traces/olmoe
  moescope analyze traces/imported --out results/imported
"""

FORMATS = ("jsonl", "vllm", "sglang", "trtllm", "olmoe")


def add_parser(sub) -> None:
    p = add_command(sub, "import", help="import routing JSONL ({problem_id, layer, token_id, expert_ids, weights}) "
                                        "or an engine's own files (--format)", examples=EXAMPLES)
    p.add_argument("file", help="file (or folder, for sglang/trtllm) to read; an s3:// URL is downloaded first")
    p.add_argument("--out", required=True, help="trace folder to write (a .parquet load table for trtllm counts)")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl (default), vllm, sglang, trtllm or olmoe: see moescope/trace/formats/")
    p.add_argument("--n-experts", type=positive_int, default=None, metavar="E",
                   help="routed experts per MoE layer (one value for every layer); without it the count is what the "
                        "files declare or else inferred from the largest expert id seen, so experts never routed to are missing")
    p.add_argument("--slot-map", default=None, metavar="FILE",
                   help="trtllm with its MoE load balancer on: the YAML/JSON slot assignment it was given "
                        "(initial_global_assignments), to count logical experts instead of slots")
    p.add_argument("--moe-layers", type=layer_list, default=None, metavar="LIST",
                   help="vllm: the MoE decoder layers, e.g. 1,3,5 (default: the layers with a non-zero expert id; "
                        "needed only when a top-1 layer routed every token to expert 0)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def layer_list(text: str) -> list[int]:
    import argparse

    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: layer numbers are 0 or more")
    return layers


def run(args) -> int:
    before = manifest_bytes(args.out)
    from moescope.api import import_trace

    written = import_trace(args.file, args.out, format=args.format, n_experts=args.n_experts, overwrite=args.overwrite,
                           slot_map=args.slot_map, moe_layers=args.moe_layers)
    if not args.overwrite and before is not None and manifest_bytes(args.out) == before:
        print(f"{args.out} already holds this import: nothing written")
        return 0
    print(written)
    return 0
