"""Benchmark: the vectorised analysis suite against per-token Python loops, on a synthetic trace.

    PYTHONPATH=src python bench/analysis.py                      # 10M (token, layer) rows, Mixtral-like
    PYTHONPATH=src python bench/analysis.py --rows 2e6 --layers 16 --experts 64 --top-k 6

What it does, in one run:
  1. Builds a synthetic trace of >= --rows (token, layer) rows as a stream of shards (generated on the fly
     from a seed, never held whole), with router logits, output entropy, next-layer predictions and
     variable-size experts, and runs every analysis through run_analyses (the expert cache reads the
     stream twice, as it does on a real trace). Time is CPU seconds (time.process_time) spent inside the
     analyses; generating the shards is timed separately and not counted.
  2. Times the per-token loop implementations (moescope.analysis.reference, written the way the research
     notebooks write them) on a --loop-tokens subset of the same trace (the loops would take hours on the
     whole trace), and extrapolates per row. Each reference loop re-reads the rows; the row-conversion cost
     is measured and counted once, as a single notebook loop computing everything would pay it once.
     Steps 1 and 2 alternate for --reps repetitions (bench/_timing.py); every figure is the median
     (min–max) over them, the loop/fast ratio paired within a repetition.
  3. Checks that the fast suite and the loops agree on that subset.
  4. Measures peak traced memory (tracemalloc) for a small and the full trace with the same shard size:
     bounded memory means the two peaks are about equal and a small multiple of one shard's bytes. Token
     specialisation keeps per-token tables (they grow with the vocabulary seen), so it is shown apart.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
import tracemalloc

import numpy as np
from _timing import Spread, interleave, paired_ratios

from moescope.analysis import ANALYSES, run_analyses
from moescope.analysis.reference import REFERENCES
from moescope.analysis.reference.rows import token_rows
from moescope.analysis.synthetic import SyntheticSpec, synthetic_shard, synthetic_trace
from moescope.trace.shard import ShardData

# the analyses with a per-token reference loop (placement's per-event loops are timed in bench/simulate.py)
COMPARED = [name for name in ANALYSES if name in REFERENCES]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=float, default=10e6, help="(token, layer) rows in the trace (default 1e7)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shard-tokens", type=int, default=10_000)
    p.add_argument("--loop-tokens", type=int, default=1000, help="tokens of the subset the loops run on")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the fast suite and the loops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true", help="skip the two tracemalloc runs")
    return p.parse_args()


def make_spec(args) -> SyntheticSpec:
    half = args.experts // 2  # variable-size experts as in the seed: half large, half small
    sizes = tuple([2432] * (args.experts - half) + [128] * half)
    return SyntheticSpec(
        n_layers=args.layers,
        n_experts=args.experts,
        top_k=args.top_k,
        vocab_size=8192,
        seq_len=(32, 256),
        router_output="logits",
        output_entropy=True,
        predicted_next_ids=True,
        expert_sizes=sizes,
        hidden_size=640,
    )


def shard_bytes(shard: ShardData) -> int:
    return sum(v.nbytes for v in vars(shard).values() if isinstance(v, np.ndarray))


def time_fast(spec, n_tokens, args) -> tuple[dict[str, float], float, float]:
    """(CPU seconds per analysis, CPU seconds generating shards, wall seconds of the whole run)."""
    generation = {"cpu": 0.0}

    def shards():
        for i in range(math.ceil(n_tokens / args.shard_tokens)):
            start = time.process_time()
            shard = synthetic_shard(
                spec, min(args.shard_tokens, n_tokens - i * args.shard_tokens), seed=args.seed, shard_index=i
            )
            generation["cpu"] += time.process_time() - start
            yield shard
            del shard  # hold no shard while the next one is generated

    timings: dict[str, float] = {}
    wall = time.perf_counter()
    run_analyses(shards, spec.context(), only=COMPARED, timings=timings)
    return timings, generation["cpu"], time.perf_counter() - wall


def peak_memory(spec, n_tokens, args, only=None) -> int:
    """Peak bytes traced by tracemalloc while analysing a trace of n_tokens (shards generated on the fly)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    run_analyses(lambda: synthetic_trace(spec, n_tokens, args.shard_tokens, seed=args.seed), spec.context(), only=only)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def loop_subset(spec, args) -> list[ShardData]:
    """The first --loop-tokens tokens of the trace's first shard, cut at a sequence boundary, in 3 shards."""
    from_trace = synthetic_shard(spec, args.shard_tokens, seed=args.seed, shard_index=0)
    starts = np.flatnonzero(~from_trace.same_sequence_as_previous())
    end = int(starts[starts <= args.loop_tokens].max()) if (starts <= args.loop_tokens).sum() > 1 else args.loop_tokens
    cuts = sorted({0, *starts[(starts > 0) & (starts < end)][:2].tolist(), end})
    return [_cut(from_trace, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]


def _cut(shard: ShardData, lo: int, hi: int) -> ShardData:
    fields = {}
    for name, value in vars(shard).items():
        if isinstance(value, np.ndarray) and name != "layers":
            fields[name] = value[lo:hi] if value.ndim == 1 else value[:, lo:hi]
        else:
            fields[name] = value
    return ShardData(**fields)


def time_loops(subset, ctx) -> tuple[dict[str, float], dict[str, dict], float]:
    """(CPU seconds per reference loop, their outputs, CPU seconds of converting rows once)."""
    start = time.process_time()
    for _ in token_rows(subset):
        pass
    conversion = time.process_time() - start
    seconds, outputs = {}, {}
    for name, module in REFERENCES.items():
        start = time.process_time()
        outputs[name] = module.compute(subset, ctx)
        seconds[name] = time.process_time() - start
    return seconds, outputs, conversion


def agreement(fast: dict, loops: dict, ctx) -> dict[str, bool]:
    """Does each fast result equal its loop's on the subset (exact counts, floats to 1e-5)?"""

    def close(a, b):
        return np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-9, equal_nan=True)

    r, ok = fast, {}
    ok["load"] = r["load"].counts.tolist() == loops["load"]["counts"]
    ok["aux_losses"] = close(r["aux_losses"].load_balancing_loss, loops["aux_losses"]["load_balancing_loss"]) and close(
        r["aux_losses"].z_loss, loops["aux_losses"]["z_loss"]
    )
    conf, ref = r["router_confidence"], loops["router_confidence"]
    ok["router_confidence"] = (
        all(close(conf.mean(q)[:-1], ref["means"][q]) for q in conf.histograms)
        and all((conf.what_if_load[i] == np.array(ref["what_if_load"][m])).all() for i, m in enumerate(conf.what_if_k))
        and all(np.abs(h.counts - np.array(ref["histograms"][q])).sum() <= 2 for q, h in conf.histograms.items())
    )
    ok["coactivation"] = (r["coactivation"].counts == np.array(loops["coactivation"]["counts"])).all()
    cross = r["cross_layer"]
    got = {(x.predictor, x.hop, x.source_layer): [x.hits, x.targets] for x in cross.recall.itertuples() if x.targets}
    ok["cross_layer"] = (cross.transitions == np.array(loops["cross_layer"]["transitions"])).all() and got == {
        key: v for key, v in loops["cross_layer"]["recall"].items() if v[1]
    }
    cache, ref = r["expert_cache"], loops["expert_cache"]
    ok["expert_cache"] = list(cache.predictors) == ref["predictors"] and all(
        cache.hits[p, l, c] == ref["hits"][(name, l, int(capacity))]
        for p, name in enumerate(cache.predictors)
        for l in range(ctx.n_layers)
        for c, capacity in enumerate(cache.capacities)
    )
    ok["temporal_locality"] = all(
        close(v, loops["temporal_locality"][key]) for key, v in r["temporal_locality"].rates.items()
    )
    dom, ref = r["domain_specialisation"], loops["domain_specialisation"]
    ok["domain_specialisation"] = all(
        (dom.counts[dom.domain_names.index(n)] == np.array(c)).all() for n, c in ref["counts"].items()
    )
    tok, ref = r["token_specialisation"], loops["token_specialisation"]["tokens"]
    ok["token_specialisation"] = tok.token_ids.tolist() == sorted(ref) and all(
        close(
            [tok.top1_share[i], tok.flops_per_token[i], tok.mode_share[i].mean()],
            [ref[t]["top1_share"], ref[t]["flops_per_token"], np.mean(ref[t]["mode_share"])],
        )
        for i, t in enumerate(tok.token_ids.tolist())
    )
    cost, ref = r["token_cost"], loops["token_cost"]
    ok["token_cost"] = dict(zip(cost.size_values.tolist(), cost.size_counts.tolist())) == ref["distribution"] and close(
        cost.summary()["flops_entropy_pearson"], ref["flops_entropy_pearson"]
    )
    return {k: bool(v) for k, v in ok.items()}


def main() -> None:
    args = parse_args()
    spec = make_spec(args)
    n_tokens = math.ceil(args.rows / args.layers)
    rows = n_tokens * args.layers
    one_shard = synthetic_shard(spec, args.shard_tokens, seed=args.seed)
    print(
        f"trace: {rows:,} (token, layer) rows = {n_tokens:,} tokens x {args.layers} MoE layers, E={args.experts}, top-{args.top_k}"
    )
    print(
        f"       {math.ceil(n_tokens / args.shard_tokens)} shards of {args.shard_tokens:,} tokens, {shard_bytes(one_shard) / 2**20:.1f} MiB each"
        " (router logits, weights, ids, predictions, entropy)\n"
    )

    subset = loop_subset(spec, args)
    ctx = spec.context()
    sub_rows = sum(s.n_tokens for s in subset) * args.layers
    fast_runs, loop_runs = [], []  # per repetition: (timings, generation CPU, wall) and (seconds, outputs, conversion)

    def fast() -> float:
        fast_runs.append(time_fast(spec, n_tokens, args))
        return sum(fast_runs[-1][0].values())

    def loops() -> float:
        loop_runs.append(time_loops(subset, ctx))
        seconds, _, conversion = loop_runs[-1]
        return sum(seconds.values()) - (len(seconds) - 1) * conversion  # rows read once

    totals = interleave({"fast": fast, "loops": loops}, args.reps, measure=lambda way: way(), warmup=False)
    fast_total = Spread.of(totals["fast"])
    print(
        f"fast suite: {fast_total.text('.1f')} CPU s for all analyses = {Spread.of([rows / t / 1e6 for t in totals['fast']]).text('.2f')} M rows/s"
        f"   (+ {Spread.of([r[1] for r in fast_runs]).text('.1f')} CPU s generating shards, not counted; wall "
        f"{Spread.of([r[2] for r in fast_runs]).text('.1f')} s for both); median (min–max) of {args.reps} interleaved repetitions"
    )
    fast_subset = run_analyses(subset, ctx, only=COMPARED)
    agrees = agreement(fast_subset, loop_runs[-1][1], ctx)
    conversion = Spread.of([r[2] / sub_rows * 1e6 for r in loop_runs])
    print(
        f"loops: on a {sub_rows:,}-row subset ({sum(s.n_tokens for s in subset)} tokens, {len(subset)} shards); "
        f"reading rows costs {conversion.text('.1f')} us/row, counted once\n"
    )

    print("per analysis: the loop alone, as a notebook computing only that statistic runs it (reading rows included)")
    print(f"{'analysis':24s} {'fast us/row':>22s} {'loop us/row':>24s} {'ratio (paired)':>20s}  agree")
    for name in COMPARED:
        fast_per_row = [r[0].get(name, 0.0) / rows * 1e6 for r in fast_runs]
        loop_per_row = [r[0][name] / sub_rows * 1e6 for r in loop_runs]
        agree = "yes" if agrees[name] else "NO"
        print(f"{name:24s} {Spread.of(fast_per_row).text('.3f'):>22s} {Spread.of(loop_per_row).text('.2f'):>24s} "
              f"{paired_ratios(loop_per_row, fast_per_row).text('.0f'):>19s}x  {agree}")
    ratio = paired_ratios([t / sub_rows for t in totals["loops"]], [t / rows for t in totals["fast"]])
    print(
        f"{'all, rows read once':24s} {Spread.of([t / rows * 1e6 for t in totals['fast']]).text('.3f'):>22s} "
        f"{Spread.of([t / sub_rows * 1e6 for t in totals['loops']]).text('.2f'):>24s} {ratio.text('.0f'):>19s}x  "
        f"{'yes' if all(agrees.values()) else 'NO'}"
    )
    loop_hours = Spread.of([t / sub_rows * rows / 3600 for t in totals["loops"]])
    print(
        f"\nspeed: the loop would need {loop_hours.text('.2f')} h for this trace, the suite took {fast_total.text('.0f')} s;"
        f" ratio {ratio.text('.0f')}x (target >= 100x: {'met over the whole range' if ratio.lo >= 100 else 'NOT met over the whole range'})"
    )

    if not args.skip_memory:
        small_tokens = max(args.shard_tokens, n_tokens // 8)
        bounded = [name for name in COMPARED if name != "token_specialisation"]
        print(
            f"\nmemory, tracemalloc peak (one shard = {shard_bytes(one_shard) / 2**20:.1f} MiB; includes generating it; "
            "one run each: the same seed allocates the same bytes):"
        )
        for label, only in (("all analyses", None), ("all but token_specialisation", bounded)):
            small = peak_memory(spec, small_tokens, args, only)
            full = peak_memory(spec, n_tokens, args, only)
            print(
                f"  {label:30s} {small_tokens * args.layers:>11,} rows: {small / 2**20:5.0f} MiB"
                f"   {rows:>11,} rows: {full / 2**20:5.0f} MiB   (x{full / small:.2f} for x{n_tokens / small_tokens:.0f} the rows)"
            )
        print(
            "  token_specialisation keeps one count per distinct (token, layer, expert set): bounded by vocabulary x"
            " layers x sets, not by trace length; with many experts the sets rarely repeat and it nears one per row"
        )
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    print(f"load average at the end (other work on this {os.cpu_count()}-core machine): {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
