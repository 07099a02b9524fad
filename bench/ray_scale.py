"""Capture and analysis on Ray against in-process, on the same corpus and the same trace, in one run.

    python bench/ray_scale.py [--tokens 60000] [--analysis-tokens 500000] [--reps 3]

1. Capture of the shipped tiny-moe over a real corpus: in-process (torch on all cores) against Ray with
   1 and 2 workers (1 thread each) on a local cluster started here. Wall time of the whole call, worker
   start-up (model load) included; the traces are checked equal.
2. The full analysis suite over a synthetic trace written to disk (8 layers, 64 experts, top-4), in-process
   against Ray (per-shard accumulate on the workers, reduced as in process); the results are checked equal.
Prints seconds, tokens (or rows) per second and the ratio to in-process, as median (min–max) over reps run
interleaved, the ratio paired within each rep (bench/_timing.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _timing import Spread, interleave, paired_ratios, verdict

import moescope
from moescope.analysis import run_analyses
from moescope.analysis.synthetic import SyntheticSpec, write_synthetic_trace


def report(times: dict[str, list[float]], work: float, unit: str, base: str = "in-process") -> None:
    for name, seconds in times.items():
        speedup = paired_ratios(times[base], seconds)
        judged = "the base" if name == base else f"{speedup.text('.2f')}x {base} ({verdict(speedup, 'faster', 'slower')})"
        print(f"  {name:14s} {Spread.of(seconds).text('.2f')} s {Spread.of([work / s for s in seconds]).text(',.0f')} {unit}"
              f"   {judged}")


def bench_capture(args, work: Path) -> None:
    opts = dict(data="humaneval,gsm-symbolic,wiki", max_tokens=args.tokens, seq_len=256, shard_tokens=8192, progress=False)

    def run(name: str, **extra):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        moescope.capture("moescope:tiny-moe", out=out, **opts, **extra)

    ways = {"in-process": {}, "ray 1 worker": {"ray": "local", "workers": 1}, "ray 2 workers": {"ray": "local", "workers": 2}}
    times = interleave({name: lambda name=name, extra=extra: run(name.replace(" ", "-"), **extra) for name, extra in ways.items()},
                       args.reps)  # a warm-up round first: the first capture of a process pays one-time costs
    same = [moescope.open_trace(work / n.replace(" ", "-")).sql(
        "SELECT seq_id, pos, layer, topk_ids FROM routing ORDER BY ALL").equals(
        moescope.open_trace(work / "in-process").sql("SELECT seq_id, pos, layer, topk_ids FROM routing ORDER BY ALL"))
        for n in ways]
    print(f"capture: moescope:tiny-moe, {args.tokens:,} tokens of real text, median (min–max) of {args.reps} interleaved "
          "reps (worker start-up included)")
    report(times, args.tokens, "tokens/s")
    print(f"  traces equal to the in-process one: {all(same)}")


def bench_analysis(args, work: Path) -> None:
    from moescope.distributed.analyze import ray_pass

    spec = SyntheticSpec(n_layers=8, n_experts=64, top_k=4, vocab_size=8192, router_output=None, output_entropy=False)
    folder = work / "synthetic"
    write_synthetic_trace(folder, spec, args.analysis_tokens, shard_tokens=25000)
    trace = moescope.open_trace(folder)
    ctx = spec.context(router_output_kind=None)
    rows = trace.n_tokens * trace.n_layers
    results = {}
    ways = {"in-process": None, "ray": ray_pass(folder, None)}
    times = interleave({name: lambda runner=runner, name=name: results.__setitem__(
        name, run_analyses(trace.shards, ctx, run_pass=runner)) for name, runner in ways.items()}, args.reps)
    same = all(json.dumps(results["in-process"][n].summary(), sort_keys=True, default=str)
               == json.dumps(results["ray"][n].summary(), sort_keys=True, default=str) for n in results["in-process"])
    print(f"analysis: all analyses, synthetic trace of {rows:,} rows ({trace.n_tokens:,} tokens x {trace.n_layers} layers, "
          f"{len(trace.manifest['shards'])} shards), median (min–max) of {args.reps} interleaved reps")
    report(times, rows, "rows/s")
    print(f"  results equal: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=60000)
    ap.add_argument("--analysis-tokens", type=int, default=500000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import os

    import ray

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    work = Path(tempfile.mkdtemp(prefix="moescope-scale-"))
    try:
        print(f"machine: {cpus} CPUs; Ray local cluster with {cpus} CPU slots")
        bench_capture(args, work)
        bench_analysis(args, work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
