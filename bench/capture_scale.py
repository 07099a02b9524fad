"""Capture at a fine-grained MoE's shape: moescope.capture against the headless forward on a tiny random DeepSeek-V3.

    PYTHONPATH=src python bench/capture_scale.py                 # 9 layers (8 MoE), 256 experts, top-8; 4 x 8x256
    PYTHONPATH=src python bench/capture_scale.py --reps 9 --batches 8
    PYTHONPATH=src python bench/capture_scale.py --quick         # one small batch, one rep (what tests/bench runs)
    PYTHONPATH=/tmp/prev/src python bench/capture_scale.py       # an earlier release's src/ (git archive), same script

The model is built from transformers' DeepseekV3Config (no download): hidden size 64, 9 decoder layers of which
the first is dense (8 MoE layers), 256 routed experts in 8 groups (the best 4 kept), top-8, one shared expert,
routers and correction biases randomised so that the groups and the bias really decide. Three ways run
interleaved rep by rep in this process (bench/_timing.py), on the same --batches batches of --batch-size x
--seq-len random token ids:
  headless   the forward without the LM head over all positions (logits_to_keep=1): what moescope.capture runs
  hooks      the same forward with moescope's RoutingRecorder on, the chunks taken after each batch (no tables)
  capture    moescope.capture(model, input_ids=...) into a new temporary folder: hooks, tables, Parquet, manifest
Each way's wall time and CPU time (time.process_time: every thread of the process, torch's and the shard
writer's) are recorded per rep. Printed:
  overhead   capture / headless and hooks / headless, in wall time and in CPU time, paired per rep (under load
             from other processes, CPU time with --threads 1 is the steadier measure: a single-threaded forward
             never waits for a descheduled partner thread)
  own work   moescope's own work, in (token, MoE layer) rows per CPU-second, two ways:
               end to end: rows / (capture CPU - headless CPU), paired per rep (noisy: torch's threads'
                 CPU time varies from rep to rep as much as the difference)
               by parts, each measured alone on one thread (time.thread_time): the experts pre-hook called directly
                 on one batch's (ids, weights), times the calls of a run; then, from the chunks one run recorded,
                 each batch's block built and slot-ordered (recording/runner.py prepare_block), the shard's Arrow
                 tables (trace/block.py) and their Parquet encoding (trace/writer.py). File writes, fsyncs and the
                 manifest are not in it (they are mostly waiting, in the capture's wall time below)
  edges      wall time of the capture before its first forward and after its last one (stamped by plain model
             hooks of this script), where nothing overlaps moescope's work; with the hook calls, over the headless
             forward's wall time (paired per rep): the overhead of the capture that no forward pass hides, a steadier
             figure than the capture / headless ratio when the forward itself varies by more than the overhead
  inside     with --threads 1, the capture's CPU time outside its forwards (the calling thread's, less its CPU
             inside the forwards, plus every other thread's: moescope's writer and encoder threads), plus the hook
             calls: moescope's whole own work measured inside a real capture, in rows per CPU-second
  size       bytes per (token, MoE layer) row of the written trace: routing part alone and all three tables
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _timing import Spread, header, interleave, paired_ratios, verdict

import moescope
from moescope.adapters.discover import find_moe_layers
from moescope.recording.batches import Batch
from moescope.recording.hooks import RoutingRecorder
from moescope.recording.rows import block_from_forward
try:
    from moescope.recording.runner import prepare_block
except ImportError:  # a release before it (PYTHONPATH=<its src>): its tables ordered the slots
    prepare_block = None
from moescope.trace.block import Sequence, shard_tables
from moescope.trace.writer import _encode

# some earlier versions encoded a capture's last shard at a quicker zstd level (`fast`); others take one level for all
LAST_SHARD = {"fast": True} if "fast" in inspect.signature(_encode).parameters else {}


def make_model(*, layers: int, experts: int, top_k: int, groups: int, hidden: int, vocab: int):
    """A tiny random DeepSeek-V3 (eval, float32) whose routers and correction biases are randomised."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=experts, num_experts_per_tok=top_k,
        n_group=groups, topk_group=max(1, groups // 2), n_shared_experts=1, routed_scaling_factor=2.5,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False,
        pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            gate = model.get_submodule(layer.block_path).gate
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 1.5 / hidden**0.5)
            gate.e_score_correction_bias.copy_(torch.randn(experts, generator=g) * 0.3)
    return model


_RUNS = itertools.count()  # numbers the capture folders


def run_headless(model, ids: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            model(input_ids=ids[i : i + batch], use_cache=False, logits_to_keep=1)


def run_hooks(model, layers, ids: torch.Tensor, batch: int) -> list:
    """The forward with moescope's hooks on; each batch's chunks taken as the capture loop takes them."""
    taken = []
    with RoutingRecorder(model, layers) as rec, torch.inference_mode():
        for i in range(0, len(ids), batch):
            model(input_ids=ids[i : i + batch], use_cache=False, logits_to_keep=1)
            taken.append(rec.take(synchronize=False))
    return taken


class Stamps:
    """Wall-clock and thread-CPU stamps of a capture's model calls, from a plain forward pre-hook and hook of the
    bench's own: `head` is the capture's wall time before its first forward starts (trace folder, manifest,
    layers), `tail` after its last forward ends (the last batch's block, the shard's tables, Parquet, fsyncs, the
    finishing manifest); `forward_cpu` the calling thread's CPU seconds inside the forwards (moescope's hooks
    included)."""

    def __init__(self, model):
        self.model, self.starts, self.ends, self.forward_cpu = model, [], [], 0.0

    def _start(self, *_):
        self.starts.append(time.perf_counter())
        self._cpu = time.thread_time()

    def _end(self, *_):
        self.forward_cpu += time.thread_time() - self._cpu
        self.ends.append(time.perf_counter())

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._start), self.model.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def run_capture(model, ids: torch.Tensor, batch: int, parent: Path, edges: list | None = None):
    """A whole capture into a new folder under `parent` (deleting the previous one would be timed too); appended
    to `edges`: {head, tail (wall s, see Stamps), own_cpu (CPU s of the capture outside its forwards: its own
    thread's plus every other thread's, which with --threads 1 are moescope's writer and encoder threads only)}."""
    with Stamps(model) as stamps:
        started, main_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        trace = moescope.capture(model, input_ids=ids, out=parent / f"trace-{next(_RUNS)}", progress=False,
                                 options=moescope.CaptureOptions(batch_size=batch))
        ended, main_cpu, process_cpu = time.perf_counter(), time.thread_time() - main_cpu, time.process_time() - process_cpu
    if edges is not None:
        own = (main_cpu - stamps.forward_cpu) + (process_cpu - main_cpu)
        edges.append({"head": stamps.starts[0] - started, "tail": ended - stamps.ends[-1], "own_cpu": own,
                      "own_main": main_cpu - stamps.forward_cpu})
    return trace


def hook_seconds(model, layers, ids: torch.Tensor, batch: int, calls: int = 50) -> float:
    """Thread CPU seconds of one call of moescope's experts pre-hook on one batch's (ids, weights) as the experts
    of the first MoE layer receive them (the hook called directly, as the module would call it)."""
    experts = getattr(model.get_submodule(layers[0].block_path), layers[0].spec.experts_attr)
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    with torch.inference_mode():
        model(input_ids=ids[:batch], use_cache=False, logits_to_keep=1)
    handle.remove()
    args, kwargs = seen[0]
    with RoutingRecorder(model, layers) as rec, torch.inference_mode():
        hook = list(experts._forward_pre_hooks.values())[-1]  # the recorder's, just added
        started = time.thread_time()
        for _ in range(calls):
            hook(experts, args, kwargs)
        seconds = (time.thread_time() - started) / calls
        rec.take()
    return seconds


def after_forward_parts(taken: list, ids: torch.Tensor, batch: int) -> dict[str, float]:
    """Thread CPU seconds of each step after the forward, on this thread: each batch's block built and its slots
    ordered (what the capture does on its writer thread as batches arrive), the shard's Arrow tables, their
    Parquet encoding as the capture encodes its last shard (in the capture, the three tables are encoded
    concurrently)."""
    seconds = {}
    started = time.thread_time()
    blocks, sequences = [], []
    for b, chunks in enumerate(taken):
        rows = ids[b * batch : (b + 1) * batch]
        seqs = [Sequence(b * batch + i, [], "bench", "bench", str(b * batch + i), "") for i in range(len(rows))]
        pos = torch.arange(rows.shape[1]).expand_as(rows)
        block = block_from_forward(Batch(seqs, rows, torch.ones_like(rows), pos), chunks, None)
        blocks.append(prepare_block(block) if prepare_block else block)
        sequences += seqs
    seconds["blocks and slot order"] = time.thread_time() - started
    started = time.thread_time()
    tables = shard_tables(blocks, sequences)
    seconds["tables"] = time.thread_time() - started
    started = time.thread_time()
    for name, table in tables.items():
        _encode(name, table, **LAST_SHARD)
    seconds["parquet"] = time.thread_time() - started
    return seconds


def timed(fn) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=9, help="decoder layers (the first dense)")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one batch of 2 x 32, one rep (a smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.batch_size, args.seq_len, args.reps = 1, 2, 32, 1
    torch.set_num_threads(args.threads)
    model = make_model(layers=args.layers, experts=args.experts, top_k=args.top_k, groups=args.groups,
                       hidden=args.hidden, vocab=args.vocab)
    layers = find_moe_layers(model)
    ids = torch.randint(1, args.vocab, (args.batches * args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    rows = ids.numel() * len(layers)
    work = Path(tempfile.mkdtemp(prefix="moescope-capture-scale-"))
    taken: list = []
    edges: list[tuple[float, float]] = []
    try:
        results: dict[str, list[dict]] = {"headless": [], "hooks": [], "capture": []}
        ways = {"headless": lambda: run_headless(model, ids, args.batch_size),
                "hooks": lambda: taken.append(run_hooks(model, layers, ids, args.batch_size)),
                "capture": lambda: run_capture(model, ids, args.batch_size, work, edges)}

        def measure(way: str) -> float:
            results[way].append(timed(ways[way]))
            return results[way][-1]["wall"]

        interleave({way: way for way in ways}, args.reps, measure=measure)
        for way in results:
            del results[way][0]  # the warm-up
        del edges[0]
        parts = [after_forward_parts(taken[-1], ids, args.batch_size) for _ in range(args.reps)]
        hook = Spread.of([hook_seconds(model, layers, ids, args.batch_size) for _ in range(args.reps)])
        last = Path(run_capture(model, ids, args.batch_size, work).folder)
        routing_bytes = sum(p.stat().st_size for p in (last / "routing").glob("*.parquet"))
        all_bytes = sum(p.stat().st_size for p in last.rglob("*.parquet"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"model: DeepSeek-V3 from config (hidden {args.hidden}, {args.layers} decoder layers = {len(layers)} MoE, "
          f"{args.experts} experts in {args.groups} groups, top-{args.top_k}); {args.threads} threads, "
          f"{os.cpu_count()} CPUs on the machine")
    print(f"{args.batches} batches of {args.batch_size}x{args.seq_len} = {ids.numel():,} tokens = {rows:,} (token, "
          f"MoE layer) rows per run; {header(args.reps)}")
    wall = {w: [r["wall"] for r in rs] for w, rs in results.items()}
    cpu = {w: [r["cpu"] for r in rs] for w, rs in results.items()}
    print(f"  {'':10s} {'wall ms':>24s} {'CPU ms':>24s}   {'wall / headless':<34s} CPU / headless")
    for way in results:
        if way == "headless":
            judged = f"{'the base':<34s} the base"
        else:
            by_wall, by_cpu = paired_ratios(wall[way], wall["headless"]), paired_ratios(cpu[way], cpu["headless"])
            judged = f"{by_wall.text('.3f') + '  ' + verdict(by_wall):<34s} {by_cpu.text('.3f')}  {verdict(by_cpu)}"
        print(f"  {way:10s} {Spread.of(wall[way]).text('.1f', 1e3):>24s} {Spread.of(cpu[way]).text('.1f', 1e3):>24s}   "
              f"{judged}")
    extra = [c - h for c, h in zip(cpu["capture"], cpu["headless"])]
    hooks = [c - h for c, h in zip(cpu["hooks"], cpu["headless"])]
    extra_wall = [c - h for c, h in zip(wall["capture"], wall["headless"])]
    print(f"  capture - headless: wall {Spread.of(extra_wall).text('.1f', 1e3)} ms = "
          f"{Spread.of(extra_wall).text('.2f', 1e6 / rows)} µs per row; CPU {Spread.of(extra).text('.1f', 1e3)} ms")
    rate = Spread.of([rows / s for s in extra if s > 0]) if any(s > 0 for s in extra) else None
    print("  moescope's own work, end to end (rows / (capture CPU - headless CPU), paired per rep): "
          + (f"{rate.text(',.0f')} rows per CPU-second" if rate else "below the noise (CPU difference <= 0)"))
    after = {name: Spread.of([p[name] for p in parts]) for name in parts[0]}
    after_total = Spread.of([sum(p.values()) for p in parts])
    n_calls = len(layers) * args.batches
    print(f"  hooks, CPU: hooks - headless (paired) {Spread.of(hooks).text('.1f', 1e3)} ms; one call alone "
          f"{hook.text('.1f', 1e6)} µs x {n_calls} calls = {hook.median * n_calls * 1e3:.2f} ms")
    print(f"  after the forward, CPU ms alone on one thread: " + ", ".join(f"{n} {s.text('.1f', 1e3)}" for n, s in after.items())
          + f"; total {after_total.text('.1f', 1e3)}")
    head, tail = Spread.of([e["head"] for e in edges]), Spread.of([e["tail"] for e in edges])
    print(f"  capture's wall ms before its first forward {head.text('.1f', 1e3)}, after its last forward "
          f"{tail.text('.1f', 1e3)} (last batch's block, tables, Parquet, writes, fsyncs, manifest)")
    edge_share = paired_ratios([e["head"] + e["tail"] + hook.median * n_calls for e in edges], wall["headless"])
    print(f"  what nothing overlaps (before the first forward + after the last + hook calls) / headless wall: "
          f"{edge_share.text('.3f')}")
    own_cpu, own_main = Spread.of([e["own_cpu"] for e in edges]), Spread.of([e["own_main"] for e in edges])
    if args.threads == 1:
        print(f"  moescope's own work, inside the capture (CPU outside the forwards, all threads; + hook calls): "
              f"{own_cpu.text('.1f', 1e3)} ms, of it on the capture's own thread {own_main.text('.1f', 1e3)} ms = "
              f"{Spread.of([rows / (e['own_cpu'] + hook.median * n_calls) for e in edges]).text(',.0f')} rows per CPU-second")
    else:
        print(f"  capture's own thread, CPU outside the forwards: {own_main.text('.1f', 1e3)} ms (other threads: "
              "with --threads > 1 torch's workers are among them; run --threads 1 for moescope's whole share)")
    own = hook.median * n_calls + after_total.median
    print(f"  moescope's own work by parts (hook calls + after-forward work, medians): {own * 1e3:.1f} CPU ms = "
          f"{rows / own:,.0f} rows per CPU-second")
    print(f"  trace size: routing {routing_bytes / rows:.2f} B per row; all tables {all_bytes / rows:.2f} B per row "
          f"({all_bytes:,} bytes)")


if __name__ == "__main__":
    main()
