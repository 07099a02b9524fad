"""What a capture writes into manifest.json besides the shard list: model, layers, settings, versions."""

from __future__ import annotations

import math

import platform
import re
from dataclasses import asdict

import numpy as np
from torch import nn

import moescope
from moescope.adapters.spec import MoELayer


def detect_router_output_kind(router_output: np.ndarray) -> str:
    """'probs' if every row is a probability vector (non-negative, sums to 1), else 'logits'."""
    rows = router_output.reshape(-1, router_output.shape[-1]).astype(np.float32)
    sums = rows.sum(-1)
    is_probs = (rows.min() >= 0) and np.allclose(sums, 1.0, atol=2e-2)  # float16 storage: loose tolerance
    return "probs" if is_probs else "logits"


def versions() -> dict:
    import pyarrow
    import torch
    import transformers

    return {
        "moescope": moescope.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def layer_entry(layer: MoELayer) -> dict:
    spec = asdict(layer.spec)
    return {
        "moe_layer": layer.index,
        "decoder_layer": layer.decoder_layer,
        "module": layer.block_path,
        "n_experts": layer.n_experts,  # routed experts: ids 0 .. n_experts - 1
        "non_compute_experts": {"ids": list(layer.non_compute_ids), "kind": str(layer.spec.non_compute.kind)}
        if layer.non_compute_ids else None,  # router choices that are not experts (LongCat identity, ZAYA skip)
        "top_k": layer.top_k,
        "n_shared_experts": layer.n_shared_experts,
        "expert_sizes": list(layer.expert_sizes) if layer.expert_sizes else None,
        "scoring": str(layer.spec.scoring),
        "spec": {k: _json_value(v) for k, v in spec.items()},
    }


def _json_value(value):
    """A spec field as plain JSON: enums by value, tuples as lists, -inf (a group fill) as the string "-inf"."""
    if hasattr(value, "value"):
        return str(value)
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


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


def decoder_layer_count(model, layers: list[MoELayer]) -> int | None:
    """Decoder layers of the model: the ModuleList holding the MoE blocks' decoder layers (LongCat's config
    says num_hidden_layers = 2 x its decoder layers), else the config's num_hidden_layers."""
    match = re.match(rf"^(.+?)\.{layers[0].decoder_layer}(?:\.|$)", layers[0].block_path) if layers else None
    container = model.get_submodule(match.group(1)) if match else None  # e.g. "model.layers"
    if isinstance(container, nn.ModuleList):
        return len(container)
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None)


def decoder_layers(model, layers: list[MoELayer]) -> dict:
    """num_decoder_layers and dense_decoder_layers (the decoder layers holding no MoE block)."""
    n_decoder = decoder_layer_count(model, layers)
    moe_decoder = {layer.decoder_layer for layer in layers}
    dense = sorted(set(range(n_decoder)) - moe_decoder) if isinstance(n_decoder, int) else None
    return {"num_decoder_layers": n_decoder, "dense_decoder_layers": dense}


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
        "versions": versions(),
        "shards": [],
    }
