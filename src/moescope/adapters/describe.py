"""A JSON-serialisable description of a model's MoE layers: what `inspect` prints and each trace's manifest records."""

from __future__ import annotations

import math
import re
from dataclasses import asdict

from torch import nn

from moescope.adapters.discover import CustomRouter, find_moe_layers
from moescope.adapters.registry import lookup_family, unsupported_reason
from moescope.adapters.spec import MoELayer
from moescope.errors import NoRouterFoundError


def describe_model(model: nn.Module, custom: CustomRouter | None = None) -> dict:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    unsupported = unsupported_reason(model_type) if model_type else None
    if custom is not None:
        status = "custom (user-declared router modules)"
    elif unsupported is not None:
        status = "unsupported"
    elif lookup_family(model_type or "") is not None:
        status = "declared"
    else:
        status = "not declared (found by structure)"
    if unsupported is not None and custom is None:
        found = []
    else:
        try:
            found = find_moe_layers(model, custom)
        except NoRouterFoundError:
            if unsupported is None:
                raise
            found = []
    return {
        "class": type(model).__name__,
        "model_type": model_type,
        "family_status": status,
        "unsupported_reason": unsupported.reason if unsupported else None,
        **decoder_layers(model, found),
        "layers": [layer_entry(layer) for layer in found],
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
