"""Analysis at the shapes of today's fine-grained MoEs: rows per CPU-second and peak memory, against the previous
release and a DuckDB floor, on the same synthetic traces.

    PYTHONPATH=src python bench/scale.py                  # DeepSeek-V3, Kimi-K2, Qwen3-235B, Mixtral; 2 reps
    PYTHONPATH=src python bench/scale.py --shapes dsv3 --tokens 40000 --reps 3
    PYTHONPATH=src python bench/scale.py --quick           # tiny traces, one rep (what tests/bench runs)
    PYTHONPATH=src python bench/scale.py --shapes dsv3 --flatness 34483,344828 --keep-traces /tmp/traces

For each shape a routing-only trace (top-k ids and weights, no router logits; `analysis/synthetic.py`) is
written to a temporary folder in shards of --shard-tokens tokens. Then, interleaved for --reps repetitions
(bench/_timing.py), each in a fresh process:
  this code        the default `analyze` suite (run_analyses over every analysis), CPU seconds of the suite
                   (time.process_time around it; imports and start-up are reported apart), peak RSS of the process
  ... warm         the same suite run a second time in its process, timed alone: without the fixed costs of a
                   process's first run (the compiled kernels loaded from numba's cache, modules imported on first
                   use), what a long trace approaches
  previous release the same, from `git archive <--previous>` of this repository (default 16d7652, the last
                   release before this benchmark), imported from its own src/ by PYTHONPATH
  ... analyze      `moescope analyze --no-model` as the command runs it (pipeline.analyze.analyze_trace): the suite,
                   the summary and every table written to a temporary folder; CPU seconds and peak RSS (this code
                   and the previous release; --skip-files leaves these rows out)
  DuckDB floor     `SELECT layer, e, count(*) FROM (SELECT layer, unnest(topk_ids) e FROM routing) GROUP BY ALL`
                   over the same Parquet: the load alone, as a database computes it (CPU of all its threads)
Rows are (token, layer) rows. Then once, for this code only, every analysis alone in its own process: its CPU
seconds and rows per CPU-second, and its peak RSS (the process's, imports included).

--flatness A,B: instead, for each shape, `analyze` (files written) on a trace of A tokens and one of B tokens,
interleaved for --reps: peak RSS of each and their ratio (memory that does not grow with the trace: B/A near 1).
--keep-traces DIR keeps the traces (DIR/<shape>-<tokens>) and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from _timing import Spread, interleave, paired_ratios, verdict

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # MoE layers, routed experts, top-k (the models' published configurations)
    "dsv3": ("DeepSeek-V3", 58, 256, 8),
    "kimi-k2": ("Kimi-K2", 60, 384, 8),
    "qwen3-235b": ("Qwen3-235B-A22B", 94, 128, 8),
    "mixtral": ("Mixtral 8x7B", 32, 8, 2),
}
TOKENS = {"dsv3": 20000, "kimi-k2": 20000, "qwen3-235b": 12000, "mixtral": 200000}  # ~1.1-6.4 M rows each

# peak RSS of this process since exec (VmHWM; ru_maxrss would carry the forking parent's over exec)
PEAK_RSS = r"""
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

CHILD = PEAK_RSS + r"""
import json, sys, tempfile, time
started = time.process_time()
from moescope.analysis import run_analyses
from moescope.pipeline.analyze import analysis_context, analyze_trace
from moescope.trace.reader import open_trace
trace = open_trace(sys.argv[1])
ctx = analysis_context(trace)
only = None if sys.argv[2] in ("all", "files", "warm") else sys.argv[2].split(",")
timings = {}
if sys.argv[2] == "warm":  # the suite once untimed: the compiled kernels loaded, every module it imports imported
    run_analyses(trace.shards, ctx)
ready = time.process_time()
if sys.argv[2] == "files":  # what `moescope analyze --no-model` does: the suite, then every table and summary.json
    with tempfile.TemporaryDirectory() as out:
        analyze_trace(sys.argv[1], out + "/results", use_model=False)
        done = time.process_time()
else:
    run_analyses(trace.shards, ctx, only=only, timings=timings)
    done = time.process_time()
print(json.dumps({"cpu": done - ready, "startup": ready - started, "timings": timings,
                  "rows": trace.n_tokens * trace.n_layers, "rss": peak_rss()}))
"""

DUCKDB = PEAK_RSS + r"""
import json, sys, time
import duckdb
con = duckdb.connect()
started = time.process_time()
n = con.execute("SELECT count(*) FROM read_parquet(?)", [sys.argv[1]]).fetchone()[0]
con.execute("SELECT layer, e, count(*) FROM (SELECT layer, unnest(topk_ids) AS e FROM read_parquet(?)) GROUP BY ALL",
            [sys.argv[1]]).fetchall()
print(json.dumps({"cpu": time.process_time() - started, "rows": n, "rss": peak_rss()}))
"""


def run_child(code: str, src: Path | None, *argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src) if src else os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"child failed ({argv}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def previous_release(commit: str, work: Path) -> Path:
    """src/ of `commit`, extracted from this repository with git archive."""
    archive = work / "previous.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit, "src"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(work / "previous", filter="data")
    return work / "previous" / "src"


def write_trace(folder: Path, shape: str, tokens: int, shard_tokens: int) -> None:
    from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace

    _, L, E, k = SHAPES[shape]
    spec = SyntheticSpec(n_layers=L, n_experts=E, top_k=k, vocab_size=32000, seq_len=(32, 512), router_output=None,
                         output_entropy=False)
    write_synthetic_trace(folder, spec, tokens, shard_tokens)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}"


def trace_folder(shape: str, tokens: int, args, work: Path) -> Path:
    """A synthetic trace of `tokens` tokens at `shape`: written under --keep-traces (reused when there) or `work`."""
    folder = (Path(args.keep_traces) if args.keep_traces else work) / f"{shape}-{tokens}"
    if not (folder / "manifest.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_trace(folder, shape, tokens, args.shard_tokens)
    return folder


def bench_flatness(shape: str, args, work: Path) -> None:
    """Peak RSS of `analyze` (files written) on a short and a long trace of one shape, interleaved."""
    name, L, E, k = SHAPES[shape]
    sizes = [int(n) for n in args.flatness.split(",")]
    folders = {n: trace_folder(shape, n, args, work) for n in sizes}
    results: dict[int, list[dict]] = {n: [] for n in sizes}

    def measure(n: int) -> float:
        results[n].append(run_child(CHILD, ROOT / "src", str(folders[n]), "files"))
        return results[n][-1]["rss"]

    interleave({n: n for n in sizes}, args.reps, measure=measure, warmup=False)
    print(f"\n{name}: {L} MoE layers x {E} experts, top-{k}; `analyze` (files written), peak RSS by trace length; "
          f"median (min–max) of {args.reps} interleaved reps")
    print(f"  {'tokens':>10s} {'(token, layer) rows':>20s} {'peak RSS MiB':>22s} {'rows per CPU-s':>28s}   ratio to the first")
    base = [r["rss"] for r in results[sizes[0]]]
    for n in sizes:
        rss = [r["rss"] for r in results[n]]
        ratio = paired_ratios(rss, base)
        print(f"  {n:>10,d} {n * L:>20,d} {Spread.of(rss).text(',.0f', 1 / 2**20):>22s} "
              f"{Spread.of([n * L / r['cpu'] for r in results[n]]).text(',.0f'):>28s}   {ratio.text('.3f')}x")
    if not args.keep_traces:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


def bench_shape(shape: str, args, work: Path, previous: Path | None) -> dict:
    name, L, E, k = SHAPES[shape]
    tokens = args.tokens or (600 if args.quick else TOKENS[shape])
    folder = trace_folder(shape, tokens, args, work)
    rows = tokens * L
    commands = {"this code": (CHILD, ROOT / "src", str(folder), "all"),
                "this code, warm": (CHILD, ROOT / "src", str(folder), "warm")}
    if previous is not None:
        commands["previous release"] = (CHILD, previous, str(folder), "all")
    if not args.skip_files:
        commands["this code, analyze"] = (CHILD, ROOT / "src", str(folder), "files")
        if previous is not None:
            commands["previous, analyze"] = (CHILD, previous, str(folder), "files")
    commands["DuckDB floor"] = (DUCKDB, None, str(folder / "routing" / "*.parquet"))
    results: dict[str, list[dict]] = {way: [] for way in commands}

    def measure(way: str) -> float:  # one fresh process; its record is kept, its CPU seconds returned
        results[way].append(run_child(*commands[way]))
        return results[way][-1]["cpu"]

    interleave({way: way for way in commands}, args.reps, measure=measure, warmup=False)
    print(f"\n{name}: {L} MoE layers x {E} experts, top-{k}; {tokens:,} tokens = {rows:,} (token, layer) rows, "
          f"shards of {args.shard_tokens:,} tokens; median (min–max) of {args.reps} interleaved reps, each a fresh process")
    cpu = {w: [r["cpu"] for r in rs] for w, rs in results.items() if rs}
    print(f"  {'':18s} {'rows per CPU-s':>28s} {'CPU-s':>22s} {'peak RSS MiB':>22s}   ratio to this code")
    for way, seconds in cpu.items():
        rss = Spread.of([r["rss"] for r in results[way]])
        base = "this code, analyze" if way == "previous, analyze" else "this code"
        ratio = paired_ratios(seconds, cpu[base])
        judged = "the base" if way == base else f"{ratio.text('.2f')}x the CPU of {base} ({verdict(ratio, 'more', 'less')})"
        print(f"  {way:18s} {Spread.of([rows / s for s in seconds]).text(',.0f'):>28s} {Spread.of(seconds).text('.2f'):>22s} "
              f"{rss.text(',.0f', 1 / 2**20):>22s}   {judged}")
    startup = Spread.of([r["startup"] for r in results["this code"]])
    print(f"  (start-up of this code's process, not counted above: {startup.text('.2f')} CPU-s)")
    per = {}
    if not args.skip_per_analysis:
        from moescope.analysis import ANALYSES

        print(f"  {'analysis':24s} {'CPU-s':>8s} {'rows per CPU-s':>16s} {'peak RSS MiB':>13s}   (alone, one process each)")
        for analysis in ANALYSES:
            one = run_child(CHILD, ROOT / "src", str(folder), analysis)
            per[analysis] = one
            print(f"  {analysis:24s} {one['cpu']:8.2f} {rows / one['cpu']:16,.0f} {mib(one['rss']):>13s}")
    if not args.keep_traces:
        shutil.rmtree(folder, ignore_errors=True)
    return {"shape": name, "rows": rows, "results": results, "per_analysis": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per trace (default: per shape, ~1-6 M rows)")
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--previous", default="16d7652", help="commit of the previous release ('' to skip it)")
    ap.add_argument("--skip-per-analysis", action="store_true", help="only the suite")
    ap.add_argument("--skip-files", action="store_true", help="leave out the `analyze` rows (tables written)")
    ap.add_argument("--flatness", default=None, metavar="A,B",
                    help="peak RSS of `analyze` on traces of A and B tokens per shape, instead of the comparison")
    ap.add_argument("--keep-traces", default=None, metavar="DIR", help="keep (and reuse) the traces in DIR")
    ap.add_argument("--quick", action="store_true", help="600-token traces, one rep, Mixtral and DeepSeek-V3 only, no "
                    "previous release (a smoke test)")
    args = ap.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if args.quick:
        args.reps, args.previous = 1, ""
        shapes = [s for s in shapes if s in ("mixtral", "dsv3")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    work = Path(tempfile.mkdtemp(prefix="moescope-scale-"))
    try:
        previous = previous_release(args.previous, work) if args.previous and not args.flatness else None
        print(f"machine: {os.cpu_count()} CPUs; routing-only synthetic traces (no router logits)")
        for shape in shapes:
            if args.flatness:
                bench_flatness(shape, args, work)
            else:
                bench_shape(shape, args, work, previous)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
