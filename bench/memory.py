"""Peak resident memory of capture and of the full analysis, on a corpus and on one 10x larger (same model).

    python bench/memory.py [--model moescope:tiny-moe] [--data python-stdlib,wiki] [--tokens 8000] [--factor 10]
                           [--shard-tokens 2048] [--out bench/out/memory]

Each step runs as its own `moescope` process; its peak resident set size (ru_maxrss of exactly that child,
from os.wait4) is what is reported, next to the peak of a process that only imports moescope, torch and
transformers (the floor every step pays). Memory should be bounded by one shard, not by the corpus: the
larger run may not use meaningfully more. The token_specialisation analysis is also run alone, because its
state grows with the distinct (token, layer, expert set) triples seen (bounded by vocabulary x layers x
combinations, not by the trace's length).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def peak_rss_mib(argv: list[str]) -> tuple[float, float]:
    """(peak resident MiB, seconds) of one child process running `argv`; raises if it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started  # ru_maxrss is KiB on Linux


def moescope(*args: str) -> list[str]:
    return [sys.executable, "-m", "moescope.cli.main", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moescope:tiny-moe")
    parser.add_argument("--data", default="python-stdlib,wiki")
    parser.add_argument("--tokens", type=int, default=8000, help="tokens of the smaller corpus")
    parser.add_argument("--factor", type=int, default=10, help="the larger corpus is this many times larger")
    parser.add_argument("--shard-tokens", type=int, default=2048)
    parser.add_argument("--out", default="bench/out/memory")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    floor, _ = peak_rss_mib([sys.executable, "-c", "import moescope.api, torch, transformers"])
    rows = []
    for label, tokens in (("small", args.tokens), ("large", args.tokens * args.factor)):
        trace, results = out / f"trace-{label}", out / f"results-{label}"
        capture = peak_rss_mib(moescope("capture", args.model, "--data", args.data, "--out", str(trace),
                                        "--max-tokens", str(tokens), "--shard-tokens", str(args.shard_tokens),
                                        "--device", "cpu", "--no-progress"))
        analyze = peak_rss_mib(moescope("analyze", str(trace), "--out", str(results)))
        tokens_only = peak_rss_mib(moescope("analyze", str(trace), "--out", str(results) + "-tokens",
                                            "--only", "token_specialisation", "--no-model"))
        rows.append((label, tokens, capture, analyze, tokens_only))

    print(f"model {args.model}, corpus {args.data}, shards of {args.shard_tokens} tokens; "
          f"floor (imports only) {floor:.0f} MiB")
    print(f"{'run':<6} {'tokens':>8}  {'capture MiB':>11} {'(s)':>6}  {'analyze MiB':>11} {'(s)':>6}  "
          f"{'token_spec. alone MiB':>21}")
    for label, tokens, (c, cs), (a, as_), (t, _) in rows:
        print(f"{label:<6} {tokens:>8}  {c:>11.0f} {cs:>6.1f}  {a:>11.0f} {as_:>6.1f}  {t:>21.0f}")
    (_, _, (c0, _), (a0, _), (t0, _)), (_, _, (c1, _), (a1, _), (t1, _)) = rows
    print(f"large / small peak: capture {c1 / c0:.2f}x, analyze {a1 / a0:.2f}x, token_specialisation alone {t1 / t0:.2f}x "
          f"(above the floor: capture {c1 - c0:+.0f} MiB, analyze {a1 - a0:+.0f} MiB, token_specialisation {t1 - t0:+.0f} MiB)")


if __name__ == "__main__":
    main()
