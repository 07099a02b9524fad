"""What a capture writes into manifest.json besides the shard list: model, layers, settings, versions."""

from __future__ import annotations



import numpy as np

from moescope.adapters.describe import decoder_layers, layer_entry
from moescope.adapters.spec import MoELayer
from moescope.trace.manifest import library_versions


def detect_router_output_kind(router_output: np.ndarray) -> str:
    """'probs' if every row is a probability vector (non-negative, sums to 1), else 'logits'."""
    rows = router_output.reshape(-1, router_output.shape[-1]).astype(np.float32)
    sums = rows.sum(-1)
    is_probs = (rows.min() >= 0) and np.allclose(sums, 1.0, atol=2e-2)  # float16 storage: loose tolerance
    return "probs" if is_probs else "logits"


def capture_entry(opts: dict) -> dict:
    """The manifest's `capture` settings: the options, and how each sequence starts (`bos`: whether the tokenizer's
    default start, e.g. Llama's BOS, leads every sequence; None for pre-tokenised input, which is recorded as given)."""
    start = opts.get("start_token_ids")
    entry = {k: v for k, v in opts.items() if k not in ("shard_tokens", "start_token_ids")}
    return {**entry, "bos": None if start is None else bool(start), "bos_token_id": start[0] if start else None,
            "start_token_ids": None if start is None else list(start)}


def _hidden_size(model, layers: list[MoELayer], config) -> int | None:
    """The config's hidden size; for a plain module without one, the routers' input width when they agree."""
    if config is not None:
        return getattr(config, "hidden_size", None)
    widths = set()
    for layer in layers:
        module = model.get_submodule(layer.block_path)
        router = getattr(module, layer.spec.router_attr, None) if layer.spec.router_attr else module
        weight = getattr(router, "weight", None)
        widths.add(int(weight.shape[-1]) if weight is not None and weight.dim() == 2 else None)
    return widths.pop() if len(widths) == 1 else None


def build_manifest(model, layers: list[MoELayer], *, opts: dict, model_info: dict, corpus_info: dict) -> dict:
    config = getattr(model, "config", None)  # None for a plain PyTorch module: its fields come from the module
    return {
        "schema_version": None,  # set by TraceWriter
        "model": {
            **model_info,
            "model_type": getattr(config, "model_type", None),
            "class": type(model).__name__,
            "hidden_size": _hidden_size(model, layers, config),
            **decoder_layers(model, layers),
        },
        "layers": [layer_entry(layer) for layer in layers],
        "capture": capture_entry(opts),
        "corpus": corpus_info,
        "weights_dtype": opts["weights_dtype"],
        "router_output_dtype": opts.get("logits_dtype", "float16") if opts.get("save_router_output") else None,
        "router_output_kind": None,
        "versions": library_versions(),
        "shards": [],
    }
