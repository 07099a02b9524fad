"""Capture and analysis on Ray against in-process, on the same corpus and the same trace, in one run.

    python bench/scale.py [--tokens 60000] [--analysis-tokens 500000] [--reps 2]

1. Capture of the shipped tiny-moe over a real corpus: in-process (torch on all cores) against Ray with
   1 and 2 workers (1 thread each) on a local cluster started here. Wall time of the whole call, worker
   start-up (model load) included; the traces are checked equal.
2. The full analysis suite over a synthetic trace written to disk (8 layers, 64 experts, top-4), in-process
   against Ray (per-shard accumulate on the workers, tree merge); the results are checked equal.
Prints seconds, tokens (or rows) per second and the ratio to in-process (median of reps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import moescope
from moescope.analysis import run_analyses
from moescope.analysis.synthetic import SyntheticSpec, synthetic_trace
from moescope.recording.batches import Sequence
from moescope.recording.rows import TokenBlock, routing_table, sequences_table, tokens_table
from moescope.trace.writer import TraceWriter


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_synthetic_trace(folder: Path, spec: SyntheticSpec, n_tokens: int, shard_tokens: int) -> None:
    """The synthetic shards as a real trace folder, so Ray workers read them from disk like any trace."""
    layers = [{"moe_layer": i, "decoder_layer": i, "n_experts": spec.n_experts, "top_k": spec.top_k} for i in range(spec.n_layers)]
    manifest = {"model": {"id": "synthetic"}, "layers": layers, "capture": {}, "corpus": {}, "weights_dtype": "float32",
                "router_output_kind": None, "versions": {}, "shards": []}
    with TraceWriter(folder, manifest, overwrite=True) as writer:
        for shard in synthetic_trace(spec, n_tokens, shard_tokens):
            block = TokenBlock(seq_id=shard.seq_id, pos=shard.pos, token_id=shard.token_id, generated=shard.generated,
                               output_entropy=np.full(shard.n_tokens, np.nan, np.float32), topk_ids=shard.topk_ids,
                               topk_weights=shard.topk_weights, router_output=None)
            ids, first = np.unique(shard.seq_id, return_index=True)
            seqs = [Sequence(int(i), [], "synthetic", shard.domain_names[shard.domain[f]], str(i), "")
                    for i, f in zip(ids, first)]
            counts = dict(zip(*np.unique(shard.seq_id, return_counts=True)))
            tables = {"routing": routing_table(block), "tokens": tokens_table(block),
                      "sequences": sequences_table(seqs, {int(k): int(v) for k, v in counts.items()})}
            writer.write_shard(tables, seq_id_min=int(ids.min()), seq_id_max=int(ids.max()))
        writer.finish()


def bench_capture(args, work: Path) -> None:
    opts = dict(data="humaneval,gsm-symbolic,wiki", max_tokens=args.tokens, seq_len=256, shard_tokens=8192, progress=False)

    def run(name: str, **extra):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        moescope.capture("moescope:tiny-moe", out=out, **opts, **extra)

    ways = {"in-process": {}, "ray 1 worker": {"ray": "local", "workers": 1}, "ray 2 workers": {"ray": "local", "workers": 2}}
    times = {name: median_time(lambda name=name, extra=extra: run(name.replace(" ", "-"), **extra), args.reps)
             for name, extra in ways.items()}
    same = [moescope.open_trace(work / n.replace(" ", "-")).sql(
        "SELECT seq_id, pos, layer, topk_ids FROM routing ORDER BY ALL").equals(
        moescope.open_trace(work / "in-process").sql("SELECT seq_id, pos, layer, topk_ids FROM routing ORDER BY ALL"))
        for n in ways]
    print(f"capture: moescope:tiny-moe, {args.tokens:,} tokens of real text, median of {args.reps} (worker start-up included)")
    for name, seconds in times.items():
        print(f"  {name:14s} {seconds:7.2f} s {args.tokens / seconds:9,.0f} tokens/s   {times['in-process'] / seconds:5.2f}x in-process")
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
    times = {}
    for name, runner in ways.items():
        times[name] = median_time(lambda runner=runner, name=name: results.__setitem__(
            name, run_analyses(trace.shards, ctx, run_pass=runner)), args.reps)
    same = all(json.dumps(results["in-process"][n].summary(), sort_keys=True, default=str)
               == json.dumps(results["ray"][n].summary(), sort_keys=True, default=str) for n in results["in-process"])
    print(f"analysis: all analyses, synthetic trace of {rows:,} rows ({trace.n_tokens:,} tokens x {trace.n_layers} layers, "
          f"{len(trace.manifest['shards'])} shards), median of {args.reps}")
    for name, seconds in times.items():
        print(f"  {name:14s} {seconds:7.2f} s {rows / seconds:12,.0f} rows/s   {times['in-process'] / seconds:5.2f}x in-process")
    print(f"  results equal: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=60000)
    ap.add_argument("--analysis-tokens", type=int, default=500000)
    ap.add_argument("--reps", type=int, default=2)
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
