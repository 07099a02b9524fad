"""Overhead of moescope's vLLM plugin: the same server with and without MOESCOPE_VLLM_METRICS=1, in one run.

    python bench/serve_overhead.py [--reps 5] [--requests 16] [--prompt-len 128] [--max-tokens 16] [--eager]

Starts two `vllm serve` processes of moescope:tiny-moe from .venv-vllm (scripts/setup-vllm.sh), identical but
for the plugin, both in vLLM's default compiled mode (--eager: both with --enforce-eager), float32, no prefix
caching; the plugin's server publishes the default per-layer series (--plugin-env to change). Each repetition sends the same burst of completions
(random token-id prompts, greedy, `--concurrency` at a time) to one server, then to the other, alternating which
goes first, so machine noise hits both alike; one server idles while the other is measured, and each burst waits
--settle seconds first. Without the wait, on 2 cores, the plugin's server ran about 4x slower (1,850 against
7,400 tokens/s) in every burst sent right after the plain server's, and as fast as plain after its own; the cause
was not pinned down (it stays with the plugin's publisher thread idle); with 3 s between bursts it is gone. Prints routed
tokens/s per server (median of reps) and the per-repetition slowdown plugin / plain with its min-max spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moescope.models import shipped_model_path
from moescope.serve.server_process import VllmServer

ROOT = Path(__file__).resolve().parents[1]


def complete(server: VllmServer, prompt: list[int], max_tokens: int) -> int:
    """One greedy completion; returns the tokens the server routed for it (prompt + generated - 1)."""
    body = json.dumps({"model": server.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"] - 1


def burst(server: VllmServer, prompts: list[list[int]], max_tokens: int, concurrency: int) -> float:
    """Routed tokens per second of one burst."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        routed = sum(pool.map(lambda p: complete(server, p, max_tokens), prompts))
    return routed / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait before each burst (lets the other server's processes go idle)")
    parser.add_argument("--eager", action="store_true", help="both servers with --enforce-eager")
    parser.add_argument("--vllm-env", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--plugin-env", action="append", default=[], metavar="NAME=VALUE",
                        help="more environment for the plugin's server, e.g. MOESCOPE_VLLM_INTERVAL_S=10")
    args = parser.parse_args()
    python = Path(args.vllm_env) / "bin" / "python"
    if not python.exists():
        print(f"no vLLM environment at {args.vllm_env}: run bash scripts/setup-vllm.sh", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 8000, args.prompt_len).tolist() for _ in range(args.requests)]
    logs = Path(tempfile.mkdtemp(prefix="moescope-bench-serve-"))
    env = {"OMP_NUM_THREADS": "1"}
    servers = {"plain": VllmServer(python, shipped_model_path("tiny-moe"), name="tiny-moe", env=env,
                                   log=logs / "plain.log", eager=args.eager),
               "plugin": VllmServer(python, shipped_model_path("tiny-moe"), name="tiny-moe",
                                    env={**env, "MOESCOPE_VLLM_METRICS": "1", **dict(kv.split("=", 1) for kv in args.plugin_env)},
                                    log=logs / "plugin.log", eager=args.eager)}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up: first requests pay one-off costs
            burst(server, prompts[:2], args.max_tokens, args.concurrency)
        rates = {name: [] for name in servers}
        for rep in range(args.reps):
            order = ["plain", "plugin"] if rep % 2 == 0 else ["plugin", "plain"]
            for name in order:
                time.sleep(args.settle)
                rates[name].append(burst(servers[name], prompts, args.max_tokens, args.concurrency))
    finally:
        for server in servers.values():
            server.stop()
    slowdown = [plain / plugin - 1 for plain, plugin in zip(rates["plain"], rates["plugin"])]  # time ratio - 1
    routed = args.requests * (args.prompt_len + args.max_tokens - 1)
    print(f"moescope:tiny-moe, {'eager' if args.eager else 'compiled'} servers, {args.reps} interleaved reps of {args.requests} requests x ({args.prompt_len} prompt + "
          f"{args.max_tokens} generated tokens), {args.concurrency} at a time, {args.settle:g} s settle before each: "
          f"{routed} routed tokens per burst")
    print(f"{'server':<18}{'routed tokens/s':>16}  (median; min-max)")
    for name, label in (("plain", "plain"), ("plugin", "moescope plugin")):
        r = rates[name]
        print(f"{label:<18}{statistics.median(r):>16,.0f}  ({min(r):,.0f}-{max(r):,.0f})")
    print("per rep, routed tokens/s plain | plugin: " + "  ".join(f"{a:,.0f} | {b:,.0f}" for a, b in zip(rates["plain"], rates["plugin"])))
    print(f"plugin overhead (time per burst, plugin / plain - 1): median {statistics.median(slowdown):+.1%}, "
          f"min {min(slowdown):+.1%}, max {max(slowdown):+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
