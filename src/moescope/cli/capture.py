"""`moescope capture MODEL --data CORPUS --out TRACE`: record routing into a trace folder."""

from __future__ import annotations

import re

from moescope.cli._common import add_command, manifest_bytes, positive_int
from moescope.cli.inspect import add_custom_router_args, custom_router_from_args

EXAMPLES = """  moescope capture moescope:tiny-moe --data humaneval,gsm-symbolic,wiki --out traces/run1 --max-tokens 20000
  moescope capture ./Mixtral-8x7B --data code.jsonl:text --out traces/mixtral --device cuda --dtype bf16 --device-map auto
  moescope capture moescope:tiny-moe --data gsm-symbolic --out traces/gen --generate 32 --save-logits
  moescope capture moescope:tiny-moe --data wiki --out traces/exact --save-logits --logits-dtype float32
  moescope capture ./Mixtral-8x7B --data corpus/ --out /shared/traces/mixtral --ray auto   # one worker per GPU
  .venv-vllm/bin/moescope capture ./Qwen1.5-MoE-A2.7B --backend vllm --tensor-parallel-size 2 --data wiki --out traces/vllm --generate 64
(an interrupted capture resumes when the same command is run again; on a finished one it writes nothing and exits 0)
"""


def add_parser(sub) -> None:
    p = add_command(sub, "capture", help="record which experts every token is routed to", examples=EXAMPLES)
    p.add_argument("model", help="Hugging Face id, local folder or moescope:NAME")
    p.add_argument("--data", required=True, help="corpus: built-in name(s) comma-separated, file, folder, file.jsonl:field, hf:NAME[:CONFIG]:SPLIT:FIELD")
    p.add_argument("--out", required=True, help="trace folder to write")
    p.add_argument("--split", choices=("all", "train", "eval"), default="all", help="corpus split (default all)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="stop after this many tokens")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (documents are cut)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    p.add_argument("--device-map", default=None, help="e.g. auto: spread a large model over the GPUs")
    p.add_argument("--save-logits", action="store_true", help="also store the full router output per token")
    p.add_argument("--predict-next-layer", action="store_true",
                   help="also record layer N+1's router applied to layer N's input (prefetch predictor)")
    p.add_argument("--save-expert-norms", action="store_true",
                   help="also store ||output|| of each chosen expert alone, per slot (REAP scores; one extra expert pass per slot)")
    p.add_argument("--output-entropy", action="store_true", help="also store the entropy of the next-token distribution")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="generate N tokens per sequence and record them too")
    p.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--logits-dtype", choices=("float16", "float32"), default="float16",
                   help="precision of the router outputs --save-logits stores (float32: exact, twice the size)")
    p.add_argument("--shard-tokens", type=positive_int, default=65536, metavar="N",
                   help="tokens per committed shard (default 65536): bounds memory and the work an interruption loses")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers model (default); vllm: inside a vLLM engine (needs scripts/setup-vllm.sh)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="capture on a Ray cluster (an address, auto; alone: start one on this machine)")
    p.add_argument("--workers", type=positive_int, default=None, help="Ray workers (default: one per GPU, else per CPU)")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="T", help="GPUs per vLLM engine (--backend vllm)")
    add_custom_router_args(p)
    p.set_defaults(run=run)


def options_from_args(args):
    """The CaptureOptions the flags ask for (validated there: a bad value is one line, before anything is loaded,
    naming the flag)."""
    from moescope.api import CaptureOptionsError

    try:
        return _options(args)
    except CaptureOptionsError as err:
        raise CaptureOptionsError(flag_names(str(err))) from None


def flag_names(message: str) -> str:
    """An options message with each field name as its command-line flag (generate -> --generate)."""
    from dataclasses import fields

    from moescope.api import CaptureOptions

    for field in fields(CaptureOptions):
        message = re.sub(rf"(?<![-\w]){field.name}(?![=\w])", "--" + field.name.replace("_", "-"), message)
    return message


def _options(args):
    from moescope.api import CaptureOptions

    return CaptureOptions(
        seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens, split=args.split, generate=args.generate,
        save_logits=args.save_logits, logits_dtype=args.logits_dtype, weights_dtype=args.weights_dtype,
        predict_next_layer=args.predict_next_layer, save_expert_norms=args.save_expert_norms,
        output_entropy=args.output_entropy, shard_tokens=args.shard_tokens, router=custom_router_from_args(args),
        device=args.device, dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code,
        backend=args.backend, tensor_parallel_size=args.tensor_parallel_size, ray=args.ray, workers=args.workers,
    )


def run(args) -> int:
    from moescope.api import capture

    options = options_from_args(args)
    before = manifest_bytes(args.out)
    trace = capture(args.model, args.data, out=args.out,
                    options=options, overwrite=args.overwrite, progress=not args.no_progress)
    if not args.overwrite and before is not None and trace.complete and manifest_bytes(args.out) == before:
        print(f"{trace.folder} already complete with these options ({trace.n_tokens} tokens x {trace.n_layers} MoE layers): "
              "nothing written")
        return 0
    stats = trace.manifest.get("stats", {})
    rate = stats.get("tokens_this_run", 0) / max(stats.get("seconds_this_run", 0), 1e-9)
    print(f"wrote {trace.folder}: {trace.n_tokens} tokens x {trace.n_layers} MoE layers in "
          f"{len(trace.manifest['shards'])} shard(s) ({rate:,.0f} tokens/s this run)")
    return 0

