"""Peak resident memory: capture and analysis on a corpus and on one 10x larger, and the analyses' fixed-size
states at DeepSeek-V3 scale against the number of shards.

    python bench/memory.py [--part model|states|all] [--reps 3]
        model:  [--model moescope:tiny-moe] [--data python-stdlib,wiki] [--tokens 8000] [--factor 10] [--shard-tokens 2048]
        states: [--state-shards 4,8,16] [--state-shard-tokens 256]

Every measurement is one child process; its peak resident set size (ru_maxrss of exactly that child, from
os.wait4) is what is reported, as median (min–max) over --reps repetitions run interleaved (bench/_timing.py).
  model   `moescope capture` and `moescope analyze` of the shipped model on a corpus and on one --factor times
          larger, next to a process that only imports moescope, torch and transformers (the floor every step
          pays) and to the capture's forward passes alone (same model, dtype, corpus and batches, no moescope:
          what the model's own forward adds as the corpus grows; in bfloat16 on the CPU that grows with the
          number of distinct batch shapes). Capture's own memory should be bounded by one shard, not by the corpus. token_specialisation also runs alone:
          its state grows with the distinct (token, layer, expert set) triples seen (bounded by vocabulary x
          layers x combinations, not by the trace's length).
  states  the analyses whose states are fixed-size sums (load, aux_losses, coactivation, cross_layer,
          expert_cache, temporal_locality, domain_specialisation) over a synthetic trace shaped like
          DeepSeek-V3 (58 MoE layers, 256 experts, top-8; analysis/synthetic.py, generated shard by shard), for
          several shard counts: as moescope runs them (one running state, added into in place) and, for
          comparison, merged in a binary-counter tree as before (log2(shards) partial states). One cross_layer
          state is 261 MiB here, so a tree's peak climbs by about that per doubling of the shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _timing import Spread, interleave

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DEEPSEEK_V3 = dict(n_layers=58, n_experts=256, top_k=8)  # routed experts of its 58 MoE layers (3 dense layers first)


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


def bench_model(args, out: Path) -> None:
    floor = Spread.of(interleave({"floor": [sys.executable, "-c", "import moescope.api, torch, transformers"]}, args.reps,
                                 measure=lambda argv: peak_rss_mib(argv)[0], warmup=False)["floor"])
    sizes = {"small": args.tokens, "large": args.tokens * args.factor}
    seconds: dict[str, list[float]] = {}

    def run(step: tuple[str, list[str], Path | None]) -> float:
        name, argv, clear = step
        if clear is not None:
            shutil.rmtree(clear, ignore_errors=True)
        peak, took = peak_rss_mib(argv)
        seconds.setdefault(name, []).append(took)
        return peak

    captures = {f"capture {label}": (f"capture {label}", moescope(
        "capture", args.model, "--data", args.data, "--out", str(out / f"trace-{label}"), "--max-tokens", str(tokens),
        "--shard-tokens", str(args.shard_tokens), "--device", "cpu", "--no-progress"), out / f"trace-{label}")
        for label, tokens in sizes.items()}
    captures.update({f"forward {label}": (f"forward {label}", [sys.executable, __file__, "--child-forward", str(tokens),
                                                               "--model", args.model, "--data", args.data], None)
                     for label, tokens in sizes.items()})
    analyses = {}
    for label in sizes:
        trace, results = out / f"trace-{label}", out / f"results-{label}"
        analyses[f"analyze {label}"] = (f"analyze {label}", moescope("analyze", str(trace), "--out", str(results)), results)
        analyses[f"token_spec. {label}"] = (f"token_spec. {label}", moescope(
            "analyze", str(trace), "--out", f"{results}-tokens", "--only", "token_specialisation", "--no-model"),
            Path(f"{results}-tokens"))
    peaks = {**interleave(captures, args.reps, measure=run, warmup=False),  # leaves the traces the analyses read
             **interleave(analyses, args.reps, measure=run, warmup=False)}
    print(f"model {args.model}, corpus {args.data}, shards of {args.shard_tokens} tokens; floor (imports only) "
          f"{floor.text('.0f')} MiB; median (min–max) of {args.reps} interleaved repetitions")
    print(f"{'step':<22} {'tokens':>8} {'peak MiB':>20} {'seconds':>20}")
    for name, values in peaks.items():
        label = name.split()[-1]
        print(f"{name:<22} {sizes[label]:>8} {Spread.of(values).text('.0f'):>20} {Spread.of(seconds[name]).text('.1f'):>20}")
    for label in sizes:  # what moescope adds to the model's own forward passes, per rep
        added = [c - f for c, f in zip(peaks[f"capture {label}"], peaks[f"forward {label}"])]
        print(f"capture - forward, {label:<6} {Spread.of(added).text('+.0f')} MiB (moescope's hooks, buffers and writer)")
    for step in ("forward", "capture", "analyze", "token_spec."):
        small, large = (Spread.of(peaks[f"{step} {label}"]) for label in sizes)
        print(f"large / small peak, {step:<12} {large.median / small.median:.2f}x "
              f"(range {large.lo / small.hi:.2f}–{large.hi / small.lo:.2f}x; {large.median - small.median + 0.0:+.0f} MiB)")


def forward_child(tokens: int, model_name: str, data: str) -> None:
    """The capture's forward passes alone (same model, dtype, corpus, batches and call; no hooks, nothing written): what
    the model itself adds to the peak as the corpus grows (in a child process)."""
    import torch

    from moescope.pipeline.capture import documents_of
    from moescope.recording.batches import batched, make_batch, sequences_from_documents, start_tokens
    from moescope.recording.loading import load_model
    from moescope.recording.options import CaptureSettings
    from moescope.recording.runner import forward_call

    opts = CaptureSettings()  # the capture's default batches
    model, tokenizer = load_model(model_name, device="cpu")  # and its default dtype
    docs, _ = documents_of(data, None)
    sequences = sequences_from_documents(docs, tokenizer, seq_len=opts.seq_len, max_tokens=tokens,
                                         start=list(start_tokens(tokenizer)))
    forward = forward_call(model, need_logits=opts.output_entropy)  # the capture's own call (last position's logits)
    with torch.inference_mode():
        for group in batched(sequences, opts.batch_size):
            batch = make_batch(group, tokenizer.pad_token_id or 0)
            forward(batch.input_ids, batch.attention_mask)


def states_child(n_shards: int, shard_tokens: int, reduce: str) -> None:
    """Run the fixed-size analyses over n_shards synthetic DeepSeek-V3-shaped shards (in a child process)."""
    from moescope.analysis import ANALYSES, run_analyses
    from moescope.analysis import runner
    from moescope.analysis.synthetic import SyntheticSpec, synthetic_trace

    if reduce == "tree":  # the reduce before running states were folded: a binary-counter tree for every analysis
        runner.reducer_for = lambda module, merge=None: runner._TreeReduce(merge or module.merge)
    spec = SyntheticSpec(**DEEPSEEK_V3, vocab_size=4096, seq_len=(32, 128), router_output="logits", output_entropy=False)
    names = [name for name, module in ANALYSES.items() if runner.folds_in_place(module)]
    run_analyses(lambda: synthetic_trace(spec, shard_tokens * n_shards, shard_tokens), spec.context(), only=names)


def bench_states(args) -> None:
    counts = [int(n) for n in args.state_shards.split(",")]
    ways = {(reduce, n): [sys.executable, __file__, "--child-states", str(n), "--reduce", reduce,
                          "--state-shard-tokens", str(args.state_shard_tokens)]
            for n in counts for reduce in ("fold", "tree")}
    floor = [sys.executable, "-c", "import moescope.analysis.runner, moescope.analysis.synthetic"]
    peaks = interleave({**ways, "floor": floor}, args.reps, measure=lambda argv: peak_rss_mib(argv)[0], warmup=False)
    L, E, k = DEEPSEEK_V3.values()
    state = (3 * 3 * L * E * E * 8) / 2**20  # cross_layer at max_hop 3: transitions [3, L, E, E] + by fold [2, 3, L, E, E]
    print(f"fixed-size analyses over a synthetic DeepSeek-V3-shaped trace ({L} MoE layers, {E} experts, top-{k}; shards of "
          f"{args.state_shard_tokens} tokens); one cross_layer state {state:.0f} MiB; floor (imports only) "
          f"{Spread.of(peaks['floor']).text('.0f')} MiB; peak RSS median (min–max) of {args.reps} interleaved repetitions")
    print(f"{'shards':>7} {'one running state (moescope) MiB':>34} {'merge tree (before) MiB':>26}")
    for n in counts:
        print(f"{n:>7} {Spread.of(peaks[('fold', n)]).text('.0f'):>34} {Spread.of(peaks[('tree', n)]).text('.0f'):>26}")
    first, last = counts[0], counts[-1]
    for reduce, label in (("fold", "running state"), ("tree", "merge tree")):
        a, b = Spread.of(peaks[(reduce, first)]), Spread.of(peaks[(reduce, last)])
        print(f"{label:>14}: {last} shards / {first} shards peak {b.median / a.median:.2f}x "
              f"(range {b.lo / a.hi:.2f}–{b.hi / a.lo:.2f}x, {b.median - a.median + 0.0:+.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("model", "states", "all"), default="all")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default="moescope:tiny-moe")
    parser.add_argument("--data", default="python-stdlib,wiki")
    parser.add_argument("--tokens", type=int, default=8000, help="tokens of the smaller corpus")
    parser.add_argument("--factor", type=int, default=10, help="the larger corpus is this many times larger")
    parser.add_argument("--shard-tokens", type=int, default=2048)
    parser.add_argument("--state-shards", default="4,8,16", help="shard counts of the states part")
    parser.add_argument("--state-shard-tokens", type=int, default=256)
    parser.add_argument("--out", default="bench/out/memory")
    parser.add_argument("--child-states", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-forward", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reduce", choices=("fold", "tree"), default="fold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_states is not None:
        return states_child(args.child_states, args.state_shard_tokens, args.reduce)
    if args.child_forward is not None:
        return forward_child(args.child_forward, args.model, args.data)
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.part in ("model", "all"):
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        bench_model(args, out)
    if args.part in ("states", "all"):
        bench_states(args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
