"""`moescope top URL`: a live terminal view of a vLLM server's expert load (moescope's vLLM plugin on /metrics)."""

from __future__ import annotations

from moescope.cli._common import add_command

EXAMPLES = """  MOESCOPE_VLLM_METRICS=1 python -m vllm.entrypoints.openai.api_server --model ./my-moe &
  MOESCOPE_VLLM_METRICS=1 MOESCOPE_VLLM_EXPERT_SERIES=4 python -m vllm.entrypoints.openai.api_server --model ./my-moe &
  moescope top localhost:8000                    # redraws every 2 s; Ctrl-C quits
  moescope top http://10.0.0.5:8000/metrics --interval 0.5
  moescope top localhost:8000 --once             # one frame (two scrapes --interval apart), for scripts and logs
"""


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def add_parser(sub) -> None:
    p = add_command(sub, "top", help="live per-layer balancedness, expert shares, entropies, tokens/s (and "
                                     "the hottest experts, where the server publishes them) of a vLLM server "
                                     "running moescope's plugin", examples=EXAMPLES)
    p.add_argument("url", help="the server (host:port, or its full /metrics URL)")
    p.add_argument("--interval", type=_seconds, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(run=run)


def run(args) -> int:
    from moescope.api import top

    return top(args.url, interval=args.interval, once=args.once)
