"""`moescope placement TRACE --gpus G --out DIR`: expert-parallel placements of the trace's load, side by side."""

from __future__ import annotations

from moescope.cli._common import add_command, positive_int

EXAMPLES = """  moescope placement traces/run1 --gpus 4 --out results/placement
  moescope placement traces/run1 --gpus 8 --nodes 2 --redundant 8 --out results/placement-2x4
  moescope placement traces/run1 --gpus 4 --redundant 0 --window 2048 --out results/placement-w2k
  moescope placement traces/gen --gpus 4 --decode-batch 8 --out results/placement-decode
  moescope placement served-load/ --gpus 8 --out results/placement-served   # a load table (vLLM plugin, trtllm import)
  moescope report results/placement --out placement.html
(writes the load matrix as EPLB takes it, load_matrix.npy [layers, experts], and each policy's
physical_to_logical_<policy>.npy [layers, slots] / logical_to_physical_<policy>.npy [layers, experts, X])
"""


def add_parser(sub) -> None:
    p = add_command(sub, "placement", help="place experts on GPUs (static, greedy, DeepSeek EPLB, co-activation) and "
                    "compare balance, staleness, replica budgets, the LP split bound and all-to-all fan-out", examples=EXAMPLES)
    p.add_argument("trace", help="a trace folder, or a load table (a .parquet file or folder of them: its windows are kept)")
    p.add_argument("--gpus", type=positive_int, required=True, help="GPUs holding the experts (expert-parallel size)")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes the GPUs are spread over (default 1)")
    p.add_argument("--redundant", type=int, default=None, metavar="R",
                   help="redundant expert slots per layer (default: one per GPU); 0 <= R <= experts")
    p.add_argument("--groups", type=positive_int, default=None,
                   help="expert groups for EPLB's hierarchical policy (default: one per node)")
    p.add_argument("--window", type=positive_int, default=None, metavar="TOKENS",
                   help="staleness window in tokens (default: an eighth of the trace)")
    p.add_argument("--decode-batch", type=positive_int, default=None, metavar="B",
                   help="distinct experts per layer in decode batches of B requests, drawn at random and grouped by "
                        "the requests' prefill routing (needs generated tokens)")
    p.add_argument("--out", required=True, help="folder for the tables, .npy maps and summary.json")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import placement, print_summary

    summary = placement(args.trace, out=args.out, gpus=args.gpus, nodes=args.nodes, redundant=args.redundant,
                            groups=args.groups, window=args.window,
                            decode_batch=args.decode_batch)
    print_summary(summary)
    print(f"tables, .npy maps and summary.json in {args.out}")
    return 0
