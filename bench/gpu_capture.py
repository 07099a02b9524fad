"""Capture against plain inference on a GPU, on a random-initialised model of realistic size.

    python bench/gpu_capture.py [--config qwen1.5-moe-a2.7b] [--batches 8] [--batch 16] [--prompt-len 512]
                                [--generate 64] [--shard-tokens 16384] [--zstd-level 15] [--reps 3]

The model is Qwen1.5-MoE-A2.7B's architecture (24 layers, 60 experts top-4 plus a shared expert, 14.3 B
parameters) with random weights in bfloat16 on the GPU: no download, and the routing work is the real size.
Ways, interleaved rep by rep, on the same prompts:
  prefill: plain forward passes over all batches  vs  moescope.capture (hooks + Parquet trace written, all timed;
           shards are written on a background thread while the next batches run)
  generate: plain model.generate(greedy) on 2 batches  vs  moescope.capture(generate=N) of them
Prints tokens/s of each and the overhead of capture, as median (min–max) over interleaved reps with the
overhead paired within each rep (bench/_timing.py; each way's time ends with a device synchronisation).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from _timing import compare_line, header, interleave, wall_seconds

import moescope

CONFIGS = {
    # https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json (architecture fields only)
    "qwen1.5-moe-a2.7b": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, vocab_size=151936,
                              norm_topk_prob=False, max_position_embeddings=8192, decoder_sparse_step=1),
}


def make_model(name: str):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    config = Qwen2MoeConfig(**CONFIGS[name], pad_token_id=0, eos_token_id=None)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # every row generates its full length in both ways
    return model


def writer_level() -> int:
    from moescope.trace import writer

    return writer.ZSTD_LEVEL


def timed(fn) -> float:
    """Wall seconds of fn, from an idle device to an idle device."""
    torch.cuda.synchronize()
    return wall_seconds(lambda: (fn(), torch.cuda.synchronize()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen1.5-moe-a2.7b", choices=sorted(CONFIGS))
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--zstd-level", type=int, default=None, help="override the trace writer's zstd level")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.zstd_level is not None:
        from moescope.trace import writer

        writer.ZSTD_LEVEL = args.zstd_level

    model = make_model(args.config)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(1, model.config.vocab_size, (args.batches * args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    gen_ids = ids[: 2 * args.batch]
    work = Path(tempfile.mkdtemp(prefix="moescope-gpu-"))

    def capture(inputs: torch.Tensor, generate: int):
        shutil.rmtree(work / "t", ignore_errors=True)
        moescope.capture(model, input_ids=inputs, out=work / "t", progress=False,
                         options=moescope.CaptureOptions(batch_size=args.batch, generate=generate, shard_tokens=args.shard_tokens))

    def plain_forward():
        with torch.inference_mode():
            for batch in ids.split(args.batch):
                model(input_ids=batch.cuda(), use_cache=False)

    def plain_generate():
        with torch.inference_mode():
            for batch in gen_ids.split(args.batch):
                model.generate(input_ids=batch.cuda(), attention_mask=torch.ones_like(batch).cuda(),
                               max_new_tokens=args.generate, do_sample=False, pad_token_id=0)

    ways = {"prefill plain": plain_forward, "prefill moescope": lambda: capture(ids, 0),
            "generate plain": plain_generate, "generate moescope": lambda: capture(gen_ids, args.generate)}
    tokens = {"prefill": ids.numel(), "generate": len(gen_ids) * (args.prompt_len + args.generate)}
    times = interleave(ways, args.reps, measure=timed)
    print(f"{args.config} (random weights, bf16, {n_params / 1e9:.1f} B parameters) on {torch.cuda.get_device_name()}: "
          f"{args.batches} batches of {args.batch} x {args.prompt_len} prompt tokens (generate: 2 batches, {args.generate} new "
          f"tokens); shards of {args.shard_tokens} tokens, zstd level {writer_level()}; {header(args.reps)}")
    for name, ts in times.items():
        kind = name.split()[0]
        print(compare_line(name, ts, times[f"{kind} plain"], work=tokens[kind]))
    trace = moescope.open_trace(work / "t")
    print(f"  trace of the last capture: {trace.n_tokens} tokens x {trace.n_layers} layers, "
          f"{sum(f.stat().st_size for f in (work / 't').rglob('*.parquet')) / trace.n_tokens / trace.n_layers:.2f} B/(token, layer)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
