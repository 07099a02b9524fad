"""Overhead of the vLLM backend on vLLM's generation throughput, both ways in one engine, interleaved.

    .venv-vllm/bin/python bench/vllm_capture.py [--model moescope:tiny-moe] [--prompts 64] [--prompt-len 128] [--generate 32] [--reps 5]

Ways, on the same engine (eager, no prefix caching: what --backend vllm runs) and the same prompts:
  plain      LLM.generate only (the baseline)
  moescope   the recorder installed at vLLM's expert-selection point; after generate, rows are fetched from
             the worker, put in (sequence, position) order and written as a Parquet shard (all of it timed)
Prints tokens/s (prompt + generated tokens processed) and the overhead of moescope over plain, as median
(min–max) over interleaved reps with the overhead paired within each rep (bench/_timing.py).
"""

from __future__ import annotations

import argparse
import tempfile

from _timing import compare_line, header, interleave

from moescope.adapters.discover import find_moe_layers
from moescope.recording import vllm_worker
from moescope.recording.batches import sequences_from_documents
from moescope.recording.loading import load_tokenizer, resolve_model_path
from moescope.recording.manifest_info import build_manifest
from moescope.recording.options import CaptureSettings
from moescope.recording.runner import ShardBuffer
from moescope.recording.loading import model_skeleton
from moescope.recording.vllm_backend import capture_chunk, sampling_params, start_engine
from moescope.trace.writer import TraceWriter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moescope:tiny-moe")
    ap.add_argument("--data", default="gsm-symbolic,humaneval,wiki")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    from moescope.corpora import iter_corpus

    path = resolve_model_path(args.model)
    opts = CaptureSettings(seq_len=args.prompt_len, generate=args.generate, backend="vllm")
    seqs = [s for s in sequences_from_documents(iter_corpus(args.data), load_tokenizer(path), seq_len=args.prompt_len,
                                                max_tokens=None) if len(s.token_ids) == args.prompt_len][: args.prompts]
    llm = start_engine(path, opts=opts, dtype=args.dtype, tensor_parallel_size=1, trust_remote_code=False)
    skeleton = model_skeleton(path, False)
    layers = find_moe_layers(skeleton)
    params = sampling_params(opts)
    # every generation runs to its full length, so both ways process the same tokens
    params.ignore_eos = True
    n_tokens = len(seqs) * (args.prompt_len + args.generate)

    def plain() -> None:
        from vllm import TokensPrompt

        llm.generate([TokensPrompt(prompt_token_ids=s.token_ids) for s in seqs], params, use_tqdm=False)

    def moescope() -> None:
        manifest = build_manifest(skeleton, layers, opts={"weights_dtype": "float16"}, model_info={}, corpus_info={})
        with tempfile.TemporaryDirectory() as tmp, TraceWriter(tmp, manifest) as writer:
            llm.collective_rpc(vllm_worker.install, args=([layer.decoder_layer for layer in layers], False))
            try:
                with ShardBuffer(writer, opts.shard_tokens) as buffer:
                    buffer.add(capture_chunk(llm, seqs, params, opts), seqs)
            finally:
                llm.collective_rpc(vllm_worker.uninstall)

    times = interleave({"plain": plain, "moescope": moescope}, args.reps)
    print(f"{args.model}: {len(seqs)} prompts x ({args.prompt_len} prompt + {args.generate} generated) tokens; {header(args.reps)}")
    for name, ts in times.items():
        print(compare_line(name, ts, times["plain"], width=9, work=n_tokens))


if __name__ == "__main__":
    main()
