"""The vLLM backend: the trace the Hugging Face backend writes, recorded inside a vLLM engine.

    sequences -> chunks of about one shard -> LLM.generate (greedy) -> each worker's StepRecorder.take()
              -> rows keyed by (request, position), recomputed rows deduplicated -> TokenBlock -> shard

vLLM flattens the tokens of all running requests into one row axis per step and may split a prompt over
several steps (chunked prefill); vllm_worker records, per step, which request and position each row is,
so the rows are put back in (sequence, position) order here. The engine runs eagerly (hooks do not run
inside CUDA graphs) and without prefix caching (a cached prefix is never routed, so it could not be recorded).
The layers, their routing policy and the manifest come from the model's Hugging Face config (a skeleton on
the meta device, no weights), so a vLLM trace has the same manifest fields as a Hugging Face one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np

from moescope.errors import ModelLoadError, MoescopeError
from moescope.recording.batches import chunks
from moescope.trace.block import Sequence, TokenBlock
from moescope.recording.manifest_info import build_manifest
from moescope.recording.loading import model_skeleton
from moescope.recording.options import CaptureSettings
from moescope.recording.runner import ShardBuffer, finish_capture, with_one_left
from moescope.trace.reader import Trace
from moescope.trace.writer import TraceWriter

VLLM_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise MoescopeError("--backend vllm needs vLLM in this environment: bash scripts/setup-vllm.sh, then run "
                            ".venv-vllm/bin/moescope") from None
    return vllm


def start_engine(path: str, *, opts: CaptureSettings, dtype: str, tensor_parallel_size: int, trust_remote_code: bool):
    from vllm import LLM

    if dtype not in VLLM_DTYPES:
        raise ModelLoadError(f"unknown --dtype {dtype!r}; choose one of {', '.join(VLLM_DTYPES)}")
    # engine core in this process: the recorder's functions then reach the workers by reference (TP > 1 workers
    # still get them through vLLM's executor); this changes where vLLM runs, not what it computes
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM's CPU platform otherwise reserves (and touches) a KV cache of half the memory: a minute at start-up
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by the CPU platform only
    try:
        return LLM(model=path, dtype=VLLM_DTYPES[dtype], tensor_parallel_size=tensor_parallel_size,
                   max_model_len=opts.seq_len + opts.generate + 1, enforce_eager=True, enable_prefix_caching=False,
                   trust_remote_code=trust_remote_code, seed=0)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"vLLM cannot load {path!r}: {first}") from None


def _request_index(req_ids: list[str], outputs) -> np.ndarray:
    """vLLM's internal request ids ('<external>-<suffix>') -> index of the request in this chunk."""
    external = {out.request_id: i for i, out in enumerate(outputs)}
    index = []
    for name in req_ids:
        key = name if name in external else name.rsplit("-", 1)[0]
        if key not in external:
            raise MoescopeError(f"vLLM ran request {name!r}, which moescope did not submit")
        index.append(external[key])
    return np.asarray(index, dtype=np.int64)


def block_from_vllm(chunk: list[Sequence], outputs, rec: dict, opts: CaptureSettings) -> TokenBlock:
    """Rows recorded over the steps that ran `chunk` -> a TokenBlock in (seq_id, pos) order."""
    prompt_len = np.array([len(s.token_ids) for s in chunk])
    n_new = np.array([len(out.outputs[0].token_ids) for out in outputs]) if opts.generate else np.zeros(len(chunk), int)
    fed = prompt_len + np.maximum(n_new - 1, 0)  # the last generated token is never fed back: no routing
    if not len(rec["req"]):
        raise MoescopeError("vLLM ran no MoE layer on this chunk")
    seq_index = _request_index(rec["req_ids"], outputs)[rec["req"]]  # [rows]
    key = seq_index * (int(fed.max()) + 1) + rec["pos"]
    # a preempted request is recomputed: keep each (request, position)'s last row
    _, last = np.unique(key[::-1], return_index=True)
    rows = np.sort(len(key) - 1 - last)
    rows = rows[np.argsort(key[rows], kind="stable")]
    seq_index, pos = seq_index[rows], rec["pos"][rows]
    got = np.bincount(seq_index, minlength=len(chunk))
    if not np.array_equal(got, fed) or np.any(pos >= fed[seq_index]):
        bad = int(np.flatnonzero(got != fed)[0]) if not np.array_equal(got, fed) else 0
        raise MoescopeError(f"vLLM routed {got[bad]} of the {fed[bad]} tokens of sequence {chunk[bad].seq_id}; "
                            "moescope needs every token computed (no prefix caching)")
    token_id = rec["token_id"][rows]
    prompt = pos < prompt_len[seq_index]
    expected = np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in chunk])
    if not np.array_equal(token_id[prompt], expected):
        raise MoescopeError("vLLM's prompt tokens differ from the ones moescope submitted")
    weights = rec["topk_weights"][:, rows].astype(opts.weights_dtype)
    router = rec["router_output"]
    return TokenBlock(
        seq_id=np.array([s.seq_id for s in chunk], dtype=np.int32)[seq_index],
        pos=pos.astype(np.int32),
        token_id=token_id.astype(np.int32),
        generated=~prompt,
        output_entropy=np.full(len(rows), np.nan, np.float32),
        topk_ids=rec["topk_ids"][:, rows],
        topk_weights=weights,
        router_output=None if router is None else router[:, rows].astype(opts.logits_dtype),
    )


def sampling_params(opts: CaptureSettings):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max(opts.generate, 1), temperature=0.0)  # greedy, like the HF backend


def capture_chunk(llm, chunk: list[Sequence], params, opts: CaptureSettings) -> TokenBlock:
    """Run `chunk` through the engine (recorder installed) and return its routing in (seq_id, pos) order."""
    from vllm import TokensPrompt

    from moescope.recording import vllm_worker

    outputs = llm.generate([TokensPrompt(prompt_token_ids=s.token_ids) for s in chunk], params, use_tqdm=False)
    return block_from_vllm(chunk, outputs, llm.collective_rpc(vllm_worker.take)[0], opts)


def run_vllm_capture(path: str, sequences: Iterable[Sequence], out: str | os.PathLike, *, opts: CaptureSettings,
                     model_info: dict, corpus_info: dict, dtype: str = "auto", tensor_parallel_size: int = 1,
                     trust_remote_code: bool = False, overwrite: bool = False, progress: bool = True,
                     total_tokens: int | None = None) -> Trace:
    """Capture the routing of `sequences` through the model folder `path`, served by vLLM, into `out`."""
    from tqdm.auto import tqdm

    from moescope.adapters.discover import find_moe_layers
    from moescope.recording import vllm_worker

    vllm = require_vllm()
    skeleton = model_skeleton(path, trust_remote_code)
    layers = find_moe_layers(skeleton)
    manifest = build_manifest(skeleton, layers, opts=asdict(opts), model_info=model_info, corpus_info=corpus_info)
    manifest["versions"]["vllm"] = vllm.__version__
    with TraceWriter(out, manifest, overwrite=overwrite) as writer:  # checks --out before the engine starts
        if writer.already_complete:  # the same capture, finished before: nothing to do
            return Trace(out)
        llm = start_engine(path, opts=opts, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           trust_remote_code=trust_remote_code)
        llm.collective_rpc(vllm_worker.install, args=([layer.decoder_layer for layer in layers], opts.save_router_output))
        params = sampling_params(opts)
        bar = tqdm(total=total_tokens, unit="tok", disable=not progress, desc="capture (vLLM)", dynamic_ncols=True)
        started, n_tokens = time.perf_counter(), 0
        done = writer.committed_seq_ids
        try:
            with ShardBuffer(writer, opts.shard_tokens) as buffer:
                for chunk, one_left in with_one_left(chunks((s for s in sequences if s.seq_id not in done),
                                                            opts.shard_tokens)):
                    block = capture_chunk(llm, chunk, params, opts)
                    buffer.add(block, chunk)
                    if one_left:  # this shard is encoded while the last chunk is generated, as run_capture does
                        buffer.flush()
                    n_tokens += block.n_tokens
                    bar.update(block.n_tokens)
        finally:
            llm.collective_rpc(vllm_worker.uninstall)
            bar.close()
        finish_capture(writer, buffer.kind_votes, n_tokens, started)
    return Trace(out)
