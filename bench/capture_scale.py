"""Capture at a fine-grained MoE's shape: moescope.capture against the headless forward on a tiny random DeepSeek-V3.

    PYTHONPATH=src python bench/capture_scale.py                 # 9 layers (8 MoE), 256 experts, top-8; 4 x 8x256
    PYTHONPATH=src python bench/capture_scale.py --reps 9 --batches 8
    PYTHONPATH=src python bench/capture_scale.py --quick         # one small batch, one rep (what tests/bench runs)

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
  overhead   capture / headless and hooks / headless, wall time, paired per rep
  own work   moescope's own work, in (token, MoE layer) rows per CPU-second, two ways:
               end to end: rows / (capture CPU - headless CPU), paired per rep (noisy: torch's threads'
                 CPU time varies from rep to rep as much as the difference)
               by parts: the hooks' share (hooks CPU - headless CPU, paired per rep) plus, measured alone on one
                 thread (time.thread_time) from the chunks one forward recorded, the work after the forward:
                 blocks from chunks (recording/rows.py), the shard's Arrow tables (slot order included,
                 trace/block.py) and their Parquet encoding (trace/writer.py), reported separately
  size       bytes per (token, MoE layer) row of the written trace: routing part alone and all three tables
"""

from __future__ import annotations

import argparse
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
from moescope.trace.block import Sequence, shard_tables
from moescope.trace.writer import _encode


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


def run_capture(model, ids: torch.Tensor, batch: int, parent: Path) -> moescope.open_trace:
    """A whole capture into a new folder under `parent` (deleting the previous one would be timed too)."""
    return moescope.capture(model, input_ids=ids, out=parent / f"trace-{next(_RUNS)}", progress=False,
                            options=moescope.CaptureOptions(batch_size=batch))


def after_forward_parts(taken: list, ids: torch.Tensor, batch: int) -> dict[str, float]:
    """Thread CPU seconds of each step after the forward, on this thread: blocks, tables, Parquet encoding."""
    seconds = {}
    started = time.thread_time()
    blocks, sequences = [], []
    for b, chunks in enumerate(taken):
        rows = ids[b * batch : (b + 1) * batch]
        seqs = [Sequence(b * batch + i, [], "bench", "bench", str(b * batch + i), "") for i in range(len(rows))]
        pos = torch.arange(rows.shape[1]).expand_as(rows)
        blocks.append(block_from_forward(Batch(seqs, rows, torch.ones_like(rows), pos), chunks, None))
        sequences += seqs
    seconds["blocks"] = time.thread_time() - started
    started = time.thread_time()
    tables = shard_tables(blocks, sequences)
    seconds["tables"] = time.thread_time() - started
    started = time.thread_time()
    for name, table in tables.items():
        _encode(name, table)
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
    try:
        results: dict[str, list[dict]] = {"headless": [], "hooks": [], "capture": []}
        ways = {"headless": lambda: run_headless(model, ids, args.batch_size),
                "hooks": lambda: taken.append(run_hooks(model, layers, ids, args.batch_size)),
                "capture": lambda: run_capture(model, ids, args.batch_size, work)}

        def measure(way: str) -> float:
            results[way].append(timed(ways[way]))
            return results[way][-1]["wall"]

        interleave({way: way for way in ways}, args.reps, measure=measure)
        for way in results:
            del results[way][0]  # the warm-up
        parts = [after_forward_parts(taken[-1], ids, args.batch_size) for _ in range(args.reps)]
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
    print(f"  {'':10s} {'wall ms':>22s} {'CPU ms':>22s}   wall / headless")
    for way in results:
        ratio = paired_ratios(wall[way], wall["headless"])
        judged = "the base" if way == "headless" else f"{ratio.text('.3f')}  {verdict(ratio)}"
        print(f"  {way:10s} {Spread.of(wall[way]).text('.1f', 1e3):>22s} {Spread.of(cpu[way]).text('.1f', 1e3):>22s}   "
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
    hooks_median = Spread.of(hooks).median
    print(f"  by parts, CPU ms: hooks (hooks - headless, paired) {Spread.of(hooks).text('.1f', 1e3)}; after the "
          f"forward, alone on one thread: " + ", ".join(f"{n} {s.text('.1f', 1e3)}" for n, s in after.items())
          + f"; total {after_total.text('.1f', 1e3)}")
    own = max(hooks_median, 0.0) + after_total.median
    print(f"  moescope's own work by parts (median hooks + median after-forward): {own * 1e3:.1f} CPU ms = "
          f"{rows / own:,.0f} rows per CPU-second" if own > 0 else "  moescope's own work by parts: below the noise")
    print(f"  trace size: routing {routing_bytes / rows:.2f} B per row; all tables {all_bytes / rows:.2f} B per row "
          f"({all_bytes:,} bytes)")


if __name__ == "__main__":
    main()
