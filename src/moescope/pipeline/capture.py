"""Capture as a job: a model (name, folder or loaded module) and a corpus or token ids -> a trace.

    model -> loaded here (hf), on Ray workers (distributed/) or inside a vLLM engine (recording/vllm_backend.py)
    corpus -> documents -> sequences of seq_len tokens (recording/batches.py)
    sequences -> run_capture / run_ray_capture / run_vllm_capture -> Trace

`moescope.capture` (api.py) is the public signature; this module is what it runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC

import torch
from torch import nn

from moescope.errors import CorpusError, MoescopeError
from moescope.recording.batches import padding_side, sequences_from_documents, sequences_from_ids, start_tokens
from moescope.recording.loading import load_model
from moescope.recording.options import CaptureOptions
from moescope.recording.runner import run_capture
from moescope.trace.reader import Trace


def documents_of(data, split: str):
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



def capture_trace(model: str | nn.Module, data, *, out: str | os.PathLike, options: CaptureOptions, tokenizer=None,
                  input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                  overwrite: bool = False, progress: bool = True) -> Trace:
    """What `moescope.capture` does (its docstring says what each argument means)."""
    if (data is None) == (input_ids is None):
        raise MoescopeError("give exactly one of `data` (a corpus) or `input_ids`")
    if options.backend == "vllm" and not isinstance(model, str):
        raise MoescopeError("the vLLM backend loads the model itself: pass its name or folder, not a loaded module")
    if data is not None:  # check the corpus before spending time on the model
        docs, corpus_info = documents_of(data, options.split)
        corpus_info = {**corpus_info, "split": options.split}
    if options.ray is not None and (not isinstance(model, str) or input_ids is not None):
        raise MoescopeError("--ray captures a model given by name with the hf backend from a corpus")
    router = options.router
    if options.ray is not None:
        from moescope.distributed.cluster import require_ray
        from moescope.recording.loading import default_router, load_tokenizer

        require_ray()
        router = router or default_router(model)
        model_info = {"id": model}
        tokenizer = load_tokenizer(model, trust_remote_code=options.trust_remote_code)
    elif options.backend == "vllm":
        from moescope.recording.vllm_backend import require_vllm

        require_vllm()  # before the tokenizer: say at once what is missing
        from moescope.recording.loading import load_tokenizer, resolve_model_path

        model_info, path = {"id": model}, resolve_model_path(model)
        tokenizer = load_tokenizer(path, trust_remote_code=options.trust_remote_code)
    elif isinstance(model, str):
        from moescope.recording.loading import default_router

        router = router or default_router(model)
        model_info = {"id": model}
        model, tokenizer = load_model(model, **options.load_kwargs)
    else:
        model_info = {"id": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__}
        if options.generate and not callable(getattr(model, "generate", None)):
            raise MoescopeError(f"generate needs a model with a transformers-style .generate(); {type(model).__name__} has none")
        model.eval()
    if input_ids is None and tokenizer is None:
        raise MoescopeError("capturing from a corpus needs a tokenizer: pass tokenizer=... with a loaded model")
    start = None if input_ids is not None else tuple(start_tokens(tokenizer))  # BOS where tokenizer(text) adds one
    opts = options.settings(padding_side=padding_side(attention_mask if input_ids is not None else None), start_token_ids=start)
    if input_ids is not None:
        if input_ids.dim() != 2 or (attention_mask is not None and attention_mask.shape != input_ids.shape):
            raise MoescopeError("input_ids must be [batch, seq] and attention_mask the same shape")
        sequences = list(sequences_from_ids(input_ids, attention_mask))
        corpus_info = {"spec": "input_ids", "rows": int(input_ids.shape[0])}
        total = sum(len(s.token_ids) for s in sequences)
    else:
        sequences = sequences_from_documents(docs, tokenizer, seq_len=options.seq_len, max_tokens=options.max_tokens,
                                             start=list(start))
        total = options.max_tokens
    if options.ray is not None:
        from moescope.distributed.capture import run_ray_capture

        return run_ray_capture(model, sequences, out, opts=opts, model_info=model_info, corpus_info=corpus_info,
                               load_kwargs=options.load_kwargs, router=router,
                               address=None if options.ray == "local" else options.ray,
                               workers=options.workers, overwrite=overwrite, progress=progress, total_tokens=total)
    if options.backend == "vllm":
        from moescope.recording.vllm_backend import run_vllm_capture

        return run_vllm_capture(path, sequences, out, opts=opts, model_info=model_info, corpus_info=corpus_info, dtype=options.dtype,
                                tensor_parallel_size=options.tensor_parallel_size, trust_remote_code=options.trust_remote_code,
                                overwrite=overwrite, progress=progress, total_tokens=total)
    return run_capture(model, tokenizer, sequences, out, opts=opts, model_info=model_info, corpus_info=corpus_info,
                       custom_router=router, overwrite=overwrite, progress=progress, total_tokens=total)
