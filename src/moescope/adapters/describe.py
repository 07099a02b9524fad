"""A JSON-serialisable description of how a model's MoE layers will be captured (used by `inspect`)."""

from __future__ import annotations

from torch import nn

from moescope.adapters.discover import CustomRouter, find_moe_layers
from moescope.adapters.registry import lookup_family, unsupported_reason
from moescope.recording.manifest_info import decoder_layers, layer_entry
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
