"""The Python API: `moescope.capture(...)` and `moescope.open_trace(...)`, the same options as the CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC

import torch
from torch import nn

from moescope.adapters.discover import CustomRouter
from moescope.recording.batches import padding_side, sequences_from_documents, sequences_from_ids, start_tokens
from moescope.recording.loading import load_model
from moescope.recording.runner import CaptureOptions, run_capture
from moescope.errors import CorpusError, MoescopeError
from moescope.trace.reader import Trace, open_trace

__all__ = ["capture", "open_trace", "CustomRouter", "CaptureOptions"]


def _documents(data, split: str):
    """A corpus spec string, a list of Document objects, or a list of plain strings."""
    from moescope.corpora import Document, describe_corpus, iter_corpus

    if isinstance(data, str):  # streamed: memory stays bounded however large the corpus
        return iter_corpus(data, split=split), describe_corpus(data, split=split)
    if isinstance(data, SequenceABC) and data and all(isinstance(d, str) for d in data):
        docs = [Document(doc_id=str(i), text=t, source="user", domain="user") for i, t in enumerate(data)]
        return docs, {"spec": "python-list", "documents": len(docs)}
    if isinstance(data, SequenceABC) and data and all(isinstance(d, Document) for d in data):
        return list(data), {"spec": "python-documents", "documents": len(data)}
    raise CorpusError("data must be a corpus name/path, a non-empty list of strings, or a list of Documents")


def _check_backend(backend: str, model, *, tensor_parallel_size: int, **hf_only) -> None:
    if backend not in ("hf", "vllm"):
        raise MoescopeError(f"unknown backend {backend!r}; choose hf or vllm")
    if tensor_parallel_size < 1:
        raise MoescopeError("tensor_parallel_size must be 1 or more")
    if backend == "hf":
        if tensor_parallel_size != 1:
            raise MoescopeError("tensor parallelism is a vLLM option: add --backend vllm (or use --device-map auto)")
        return
    if not isinstance(model, str):
        raise MoescopeError("the vLLM backend loads the model itself: pass its name or folder, not a loaded module")
    unsupported = [name for name, value in hf_only.items() if value]
    if unsupported:
        raise MoescopeError(f"{', '.join(unsupported)} is not available with the vLLM backend; use the default hf backend")


def capture(
    model: str | nn.Module,
    data=None,
    *,
    out: str | os.PathLike,
    tokenizer=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_tokens: int | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    save_router_output: bool = False,
    predict_next_layer: bool = False,
    save_expert_norms: bool = False,
    output_entropy: bool = False,
    generate: int = 0,
    weights_dtype: str = "float16",
    logits_dtype: str = "float16",
    router: CustomRouter | None = None,
    split: str = "all",
    shard_tokens: int = 65536,
    overwrite: bool = False,
    progress: bool = True,
    backend: str = "hf",
    tensor_parallel_size: int = 1,
    ray: str | None = None,
    workers: int | None = None,
) -> Trace:
    """Record, for every token and MoE layer, the experts the model chose and their gate weights.

    Parameters
    ----------
    model : a Hugging Face id, a local folder, ``moescope:NAME``, or an already-loaded ``nn.Module``.
    data : a corpus spec (``"humaneval,wiki"``, a file, a folder, ``file.jsonl:field``, ``hf:...``), a list
        of strings, or a list of ``moescope.corpora.Document``. Not needed with ``input_ids``.
    out : the trace folder. An unfinished capture with the same settings is resumed.
    input_ids, attention_mask : pre-tokenised input [B, T]; sequence i is row i and positions are the
        row's real-token positions. A left-padded batch (padding before each row's tokens) is fed to the
        model left-padded, as your own forward pass would be; otherwise rows are right-padded.
    logits_dtype : precision of the stored router outputs (``save_router_output``): ``"float16"`` (compact;
        close logits can round to exact ties) or ``"float32"`` (exactly what the router computed in float32).
    predict_next_layer : also record what layer N+1's router picks from layer N's router input (the
        router-lookahead predictor of the cross-layer analysis).
    save_expert_norms : also record, per routing slot, the L2 norm of the chosen expert's own output (the
        REAP score's ingredient, see ``moescope importance``); costs one extra expert pass per slot.
    router : a ``CustomRouter`` for models moescope does not recognise.
    shard_tokens : tokens per committed shard; bounds memory (and the work lost to an interruption).
    backend : ``"hf"`` (hooks on a transformers model, the default) or ``"vllm"`` (inside a vLLM engine, which
        must be installed in this environment: ``scripts/setup-vllm.sh``); the trace is the same either way.
    tensor_parallel_size : GPUs the vLLM engine shards the model over (``backend="vllm"`` only).
    ray : capture on a Ray cluster: its address, ``"auto"``, or ``"local"`` (start one here). The corpus is
        split into shards, one worker per GPU (or CPU); the trace equals the in-process one.
    workers : Ray workers to start (default: one per GPU, or per CPU of the cluster).

    Returns
    -------
    Trace : the trace just written (``trace.sql(...)``, ``trace.shards()``).

    Examples
    --------
    >>> trace = moescope.capture("moescope:tiny-moe", "humaneval", out="traces/run1", max_tokens=2048)  # doctest: +SKIP
    """
    if (data is None) == (input_ids is None):
        raise MoescopeError("give exactly one of `data` (a corpus) or `input_ids`")
    if "://" in str(out):  # Path() would quietly turn s3://b/t into a local folder "s3:/b/t"
        raise MoescopeError(f"--out {out}: URLs are not supported; give a local path (with --ray, one every worker "
                            "sees at the same path, e.g. a shared filesystem)")
    if seq_len <= 0 or batch_size <= 0 or (max_tokens is not None and max_tokens <= 0) or generate < 0:
        raise MoescopeError("seq_len, batch_size and max_tokens must be positive, generate non-negative")
    if generate and (predict_next_layer or save_expert_norms):
        raise MoescopeError("predict_next_layer and save_expert_norms are recorded for prompt tokens only; drop them "
                            "or generate separately")
    for name, value in (("weights_dtype", weights_dtype), ("logits_dtype", logits_dtype)):
        if value not in ("float16", "float32"):
            raise MoescopeError(f"{name} must be float16 or float32, not {value!r}")
    _check_backend(backend, model, tensor_parallel_size=tensor_parallel_size, output_entropy=output_entropy,
                   predict_next_layer=predict_next_layer, save_expert_norms=save_expert_norms, router=router,
                   device_map=device_map)
    if data is not None:  # check the corpus before spending time on the model
        docs, corpus_info = _documents(data, split)
        corpus_info = {**corpus_info, "split": split}
    if ray is not None and (backend != "hf" or not isinstance(model, str) or input_ids is not None):
        raise MoescopeError("--ray captures a model given by name with the hf backend from a corpus")
    if workers is not None and (ray is None or workers <= 0):
        raise MoescopeError("--workers is the number of Ray capture workers: a positive number, with --ray")
    if ray is not None:
        from moescope.distributed.cluster import require_ray
        from moescope.recording.loading import default_router, load_tokenizer

        require_ray()
        router = router or default_router(model)
        model_info = {"id": model}
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    elif backend == "vllm":
        from moescope.recording.vllm_backend import require_vllm

        require_vllm()  # before the tokenizer: say at once what is missing
        from moescope.recording.loading import load_tokenizer, resolve_model_path

        model_info, path = {"id": model}, resolve_model_path(model)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    elif isinstance(model, str):
        from moescope.recording.loading import default_router

        router = router or default_router(model)
        model_info = {"id": model}
        model, tokenizer = load_model(model, device=device, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    else:
        model_info = {"id": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__}
        if generate and not callable(getattr(model, "generate", None)):
            raise MoescopeError(f"generate needs a model with a transformers-style .generate(); {type(model).__name__} has none")
        model.eval()
    if input_ids is None and tokenizer is None:
        raise MoescopeError("capturing from a corpus needs a tokenizer: pass tokenizer=... with a loaded model")
    start = None if input_ids is not None else tuple(start_tokens(tokenizer))  # BOS where tokenizer(text) adds one
    opts = CaptureOptions(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, save_router_output=save_router_output,
                          predict_next_layer=predict_next_layer, save_expert_norms=save_expert_norms,
                          output_entropy=output_entropy, generate=generate, weights_dtype=weights_dtype,
                          logits_dtype=logits_dtype, padding_side=padding_side(attention_mask if input_ids is not None else None),
                          shard_tokens=shard_tokens, backend=backend, start_token_ids=start)
    if input_ids is not None:
        if input_ids.dim() != 2 or (attention_mask is not None and attention_mask.shape != input_ids.shape):
            raise MoescopeError("input_ids must be [batch, seq] and attention_mask the same shape")
        sequences = list(sequences_from_ids(input_ids, attention_mask))
        corpus_info = {"spec": "input_ids", "rows": int(input_ids.shape[0])}
        total = sum(len(s.token_ids) for s in sequences)
    else:
        sequences = sequences_from_documents(docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens, start=list(start))
        total = max_tokens
    if ray is not None:
        from moescope.distributed.capture import run_ray_capture

        load_kwargs = dict(device=device, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        return run_ray_capture(model, sequences, out, opts=opts, model_info=model_info, corpus_info=corpus_info,
                               load_kwargs=load_kwargs, router=router, address=None if ray == "local" else ray,
                               workers=workers, overwrite=overwrite, progress=progress, total_tokens=total)
    if backend == "vllm":
        from moescope.recording.vllm_backend import run_vllm_capture

        return run_vllm_capture(path, sequences, out, opts=opts, model_info=model_info, corpus_info=corpus_info, dtype=dtype,
                                tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                                overwrite=overwrite, progress=progress, total_tokens=total)
    return run_capture(model, tokenizer, sequences, out, opts=opts, model_info=model_info, corpus_info=corpus_info,
                       custom_router=router, overwrite=overwrite, progress=progress, total_tokens=total)
