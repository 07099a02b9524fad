"""Benchmark: expert placement and offload simulation on a 10 M-row trace of DeepSeek-V3's shape, against
per-event Python loops.

    PYTHONPATH=src python bench/simulate.py                        # 58 MoE layers x 256 experts, top-8, 1e7 rows
    PYTHONPATH=src python bench/simulate.py --rows 1e6 --reps 2    # a quicker look

What it does, in one run:
  1. Builds (once; cached in --cache) a synthetic trace with the structure of real routing
     (moescope.analysis.synthetic: skewed experts, token/domain/sequence affinity, correlated layers) of
     >= --rows (token, layer) rows, in shards of --shard-tokens tokens (capture's default), a quarter of the
     tokens marked generated. Not timed.
  2. Times, --reps times interleaved with the loops: `moescope placement`'s evaluation (DeepSeek-V3's
     prefill layout: 32 GPUs on 4 nodes, 32 redundant slots, 8 expert groups; staleness windows of an eighth
     of the trace; fan-out of every token under every placement) and `moescope offload`'s (lru, lfu, arc,
     belady; a cache of 2k = 16 experts per layer; no prefetch), reading the shards one at a time.
  3. Times the per-event Python loops (moescope.simulate.reference) on the first --loop-tokens tokens and
     prints the ratio of time per row (loop / vectorised) per repetition, as min - median - max; checks that
     the two agree on that subset.
  4. Measures peak traced memory (tracemalloc) on an eighth of the trace and on the whole: bounded memory
     means about equal peaks (one shard at a time).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

from moescope.analysis.context import AnalysisContext
from moescope.analysis.placement import place_trace
from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard
from moescope.simulate.offload import OffloadOptions, simulate_trace
from moescope.analysis.placement_policies import PlacementOptions
from moescope.simulate.reference import offload as offload_loop
from moescope.analysis.reference import placement as placement_loop
from moescope.trace.shard import ShardData

FIELDS = ("seq_id", "pos", "token_id", "generated", "domain", "topk_ids", "topk_weights")
CHUNK = 2048  # tokens generated at a time (the generator holds [L, chunk, E] logits)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=float, default=1e7, help="(token, layer) rows (default 1e7)")
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--capacity", type=int, default=16, help="expert slots per layer (default 2k)")
    p.add_argument("--loop-tokens", type=int, default=150, help="tokens the per-event loops run on")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache", default="bench/out/simulate-trace", help="folder the synthetic shards are kept in")
    p.add_argument("--skip-memory", action="store_true")
    return p.parse_args()


def make_spec(args) -> SyntheticSpec:
    return SyntheticSpec(n_layers=args.layers, n_experts=args.experts, top_k=args.top_k, vocab_size=8192,
                         seq_len=(64, 1024), router_output=None, output_entropy=False, generated_fraction=0.25)


def build_trace(spec: SyntheticSpec, n_tokens: int, args) -> list[Path]:
    """Shards of whole sequences as .npz files (generated once per shape and size)."""
    folder = Path(args.cache) / f"L{spec.n_layers}-E{spec.n_experts}-k{spec.top_k}-T{n_tokens}-S{args.shard_tokens}"
    n_shards = math.ceil(n_tokens / args.shard_tokens)
    paths = [folder / f"shard-{i:05d}.npz" for i in range(n_shards)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    chunk_index = 0
    for i, path in enumerate(paths):
        tokens = min(args.shard_tokens, n_tokens - i * args.shard_tokens)
        parts = []
        while tokens > 0:  # whole sequences per chunk, ids unique across chunks
            parts.append(synthetic_shard(spec, min(CHUNK, tokens), seed=0, shard_index=chunk_index))
            tokens -= parts[-1].n_tokens
            chunk_index += 1
        arrays = {name: np.concatenate([getattr(s, name) for s in parts], axis=1 if name.startswith("topk") else 0)
                  for name in FIELDS}
        arrays["topk_weights"] = arrays["topk_weights"].astype(np.float16)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.rename(path)
        print(f"  generated shard {i + 1}/{n_shards} ({time.perf_counter() - started:.0f} s)", flush=True)
    return paths


def load_shard(path: Path, spec: SyntheticSpec, limit: int | None = None) -> ShardData:
    with np.load(path) as data:
        arrays = {name: data[name] for name in FIELDS}
    if limit is not None:
        arrays = {n: (a[:, :limit] if n.startswith("topk") else a[:limit]) for n, a in arrays.items()}
    arrays["topk_weights"] = arrays["topk_weights"].astype(np.float32)
    return ShardData(layers=np.arange(spec.n_layers, dtype=np.int16), domain_names=tuple(spec.domains), **arrays)


def fast(paths, spec, ctx, args, n_tokens) -> dict[str, float]:
    """CPU seconds of the placement and offload evaluations over the whole trace."""
    shards = lambda: (load_shard(p, spec) for p in paths)  # noqa: E731 (one shard in memory at a time)
    placement = PlacementOptions(spec.n_experts, 32, 4, 32, 8)
    start = time.process_time()
    place_trace(shards, ctx, placement, max(1, n_tokens // 8))
    seconds = {"placement": time.process_time() - start}
    start = time.process_time()
    simulate_trace(shards, ctx, OffloadOptions((args.capacity,), ("lru", "lfu", "arc", "belady"), ("none",), "layer"))
    seconds["offload"] = time.process_time() - start
    return seconds


def loops(subset, ctx, args) -> tuple[dict[str, float], dict]:
    """CPU seconds of the per-event loops on the subset, and what they computed."""
    from moescope.analysis.placement_policies import POLICIES, place

    load = np.zeros((ctx.n_layers, ctx.n_experts), np.int64)
    for s in subset:  # the placements to follow are computed once either way (per layer, not per event)
        ids = s.topk_ids.astype(np.int64)
        for l in range(ctx.n_layers):
            load[l] += np.bincount(ids[l][(ids[l] >= 0) & (ids[l] < ctx.n_experts)], minlength=ctx.n_experts)
    options = PlacementOptions(ctx.n_experts, 32, 4, 32, 8)
    p2l = {policy: place(policy, load, options).physical_to_logical.tolist() for policy in POLICIES}
    start = time.process_time()
    placed = placement_loop.compute(subset, ctx, p2l, 32, 4, max(1, sum(s.n_tokens for s in subset) // 8))
    seconds = {"placement": time.process_time() - start}
    start = time.process_time()
    cached = {policy: offload_loop.compute(subset, ctx, policy=policy, capacity=args.capacity)
              for policy in ("lru", "lfu", "arc", "belady")}
    seconds["offload"] = time.process_time() - start
    return seconds, {"placement": placed, "offload": cached}


def agree(subset, ctx, args, outputs) -> bool:
    n = sum(s.n_tokens for s in subset)
    placement = place_trace(lambda: subset, ctx, PlacementOptions(ctx.n_experts, 32, 4, 32, 8), max(1, n // 8))
    ok = placement.load.tolist() == outputs["placement"]["load"]
    ok &= all(placement.fanout[p][0].tolist() == outputs["placement"]["fanout"][p] for p in placement.fanout)
    state = simulate_trace(lambda: subset, ctx, OffloadOptions((args.capacity,), ("lru", "lfu", "arc", "belady"), ("none",), "layer"))
    for p, policy in enumerate(("lru", "lfu", "arc", "belady")):
        hits = sum(v[1] for v in outputs["offload"][policy]["counts"].values())
        ok &= int(state.counts[0, p, 0, :, :, 1].sum()) == hits
    return bool(ok)


def peak_memory(paths, spec, ctx, args, n_tokens) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fast(paths, spec, ctx, args, n_tokens)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def spread(values) -> str:
    return f"{min(values):,.0f}x - {statistics.median(values):,.0f}x - {max(values):,.0f}x"


def main() -> None:
    args = parse_args()
    spec = make_spec(args)
    ctx = AnalysisContext(n_experts=spec.n_experts, top_k=spec.top_k, n_layers=spec.n_layers)
    n_tokens = math.ceil(args.rows / spec.n_layers)
    print(f"trace: {n_tokens:,} tokens x {spec.n_layers} MoE layers = {n_tokens * spec.n_layers:,} rows; "
          f"{spec.n_experts} experts, top-{spec.top_k}; shards of {args.shard_tokens:,} tokens")
    paths = build_trace(spec, n_tokens, args)
    first = load_shard(paths[0], spec)
    end = int(np.flatnonzero(~first.same_sequence_as_previous())[1])  # whole sequences: the first one, cut
    subset = [load_shard(paths[0], spec, limit=min(args.loop_tokens, end))]
    loop_rows = subset[0].n_tokens * spec.n_layers
    rows = n_tokens * spec.n_layers
    ratios = {"placement": [], "offload": []}
    totals = []
    outputs = None
    for rep in range(args.reps):  # interleaved: vectorised whole trace, then the loops on the subset
        seconds = fast(paths, spec, ctx, args, n_tokens)
        loop_seconds, outputs = loops(subset, ctx, args)
        totals.append(sum(seconds.values()))
        for name in ratios:
            ratios[name].append((loop_seconds[name] / loop_rows) / (seconds[name] / rows))
        print(f"  rep {rep + 1}: placement {seconds['placement']:.1f} s, offload {seconds['offload']:.1f} s "
              f"(CPU, {rows:,} rows); loops {loop_seconds['placement']:.2f} s + {loop_seconds['offload']:.2f} s on {loop_rows:,} rows",
              flush=True)
    print(f"placement + offload, whole trace: {min(totals):.1f} - {statistics.median(totals):.1f} - {max(totals):.1f} s CPU "
          f"(min - median - max of {args.reps}); under 60 s: {'yes' if statistics.median(totals) < 60 else 'no'}")
    for name, values in ratios.items():
        print(f"{name:<10} per-event loop / vectorised, time per row: {spread(values)}")
    print(f"vectorised and loops agree on the {subset[0].n_tokens}-token subset: {agree(subset, ctx, args, outputs)}")
    if not args.skip_memory:
        small = peak_memory(paths[: max(1, len(paths) // 8)], spec, ctx, args, n_tokens // 8)
        large = peak_memory(paths, spec, ctx, args, n_tokens)
        print(f"peak traced memory: {small / 2**20:,.0f} MiB for {max(1, len(paths) // 8)} shard(s), "
              f"{large / 2**20:,.0f} MiB for {len(paths)} ({large / small:.2f}x)")


if __name__ == "__main__":
    main()
