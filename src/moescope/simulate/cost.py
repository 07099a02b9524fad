"""What moving experts costs: parameter bytes per expert, and the time a link takes to move them.

Expert bytes = matrices x hidden size x intermediate size x bytes per parameter (3 matrices for a gated
SwiGLU expert: gate, up, down; biases and quantization scales are left out). Intermediate sizes come
from the trace manifest when the capture recorded them (variable-size experts), else from the model's
config (`moe_intermediate_size`, else `intermediate_size`, ...), and the parameter dtype from the config
or `--dtype`.

A link moves one expert in latency + bytes / bandwidth, one after another. Per token:
  stall     the experts fetched on demand (misses): the token waits for them;
  link time every expert moved, prefetched ones included: the link cannot do more, so 1 / link time per
            decode token bounds decode tokens/s from above (compute time not included).
Presets are nominal per-direction figures; pass --bandwidth / --latency-us for a measured link.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from moescope.errors import MoescopeError

# name -> (bandwidth GB/s, latency microseconds): nominal, per direction
LINKS = {
    "pcie3x16": (15.75, 10.0),
    "pcie4x16": (31.5, 10.0),
    "pcie5x16": (63.0, 10.0),
    "nvlink3": (300.0, 5.0),  # A100
    "nvlink4": (450.0, 5.0),  # H100
}
DTYPE_BYTES = {"float32": 4.0, "fp32": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0,
               "float8_e4m3fn": 1.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
INTERMEDIATE_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size", "intermediate_size")
SWEEP_GBPS = tuple(float(x) for x in np.geomspace(1.0, 1000.0, 13))  # the stall-vs-bandwidth curve


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes / s
    latency: float  # s per transfer

    @classmethod
    def preset(cls, name: str) -> Link:
        if name not in LINKS:
            raise MoescopeError(f"unknown --link {name!r}; choose one of {', '.join(LINKS)} or give --bandwidth")
        gbps, us = LINKS[name]
        return cls(name, gbps * 1e9, us * 1e-6)

    @classmethod
    def custom(cls, gbps: float, latency_us: float) -> Link:
        if not gbps > 0 or not latency_us >= 0:
            raise MoescopeError(f"--bandwidth must be positive and --latency-us 0 or more, got {gbps} and {latency_us}")
        return cls(f"{gbps:g} GB/s", gbps * 1e9, latency_us * 1e-6)

    def seconds(self, transfers, moved_bytes):
        """Time to move `transfers` experts holding `moved_bytes` bytes in all."""
        return np.asarray(transfers) * self.latency + np.asarray(moved_bytes) / self.bandwidth


def _config_value(config: Mapping, keys) -> object:
    """The first of `keys` in the config or its text_config (multimodal models nest the decoder's)."""
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            if scope.get(key) is not None:
                return scope[key]
    return None


def expert_bytes(layers: list[dict], hidden_size: int | None, config: Mapping | None, *, dtype: str | None = None,
                 matrices: int = 3) -> np.ndarray:
    """float64 [L, E]: parameter bytes of every expert. `layers`: the manifest's per-layer entries."""
    config = config or {}
    hidden = hidden_size or _config_value(config, ("hidden_size",))
    E = max(int(layer["n_experts"]) for layer in layers)
    fallback = _config_value(config, INTERMEDIATE_KEYS)
    sizes = np.zeros((len(layers), E))
    for i, layer in enumerate(layers):
        per_expert = layer.get("expert_sizes") or ([fallback] * int(layer["n_experts"]) if fallback else None)
        if per_expert is None or hidden is None:
            raise MoescopeError("cannot tell the experts' size: the trace records no expert sizes and the model's "
                                "config is not available here; pass --expert-bytes")
        sizes[i, : len(per_expert)] = per_expert
    dtype = dtype or _config_value(config, ("dtype", "torch_dtype"))
    if dtype is None:
        raise MoescopeError("the model config gives no dtype for the expert weights; pass --dtype (e.g. bf16)")
    if str(dtype) not in DTYPE_BYTES:
        raise MoescopeError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return matrices * float(hidden) * sizes * DTYPE_BYTES[str(dtype)]
