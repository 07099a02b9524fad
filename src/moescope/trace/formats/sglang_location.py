"""Placements and load as SGLang loads them: the `--init-expert-location` file and the expert-distribution dump.

Where SGLang defines them (sgl-project/sglang, `python/sglang/srt/eplb/expert_location.py`,
`compute_initial_expert_location_metadata` and `ExpertLocationMetadata`; read at commit 01fec5c2):
`--init-expert-location PATH` takes a `.json` (or `.pt`) holding a dict that is either

    {"physical_to_logical_map": int [num_layers, num_physical_experts]}
        -> ExpertLocationMetadata.init_by_mapping(server_args, model_config, **dict): the dict's keys become
           keyword arguments, so it holds that one key. Physical expert p of a layer runs logical expert
           map[layer, p]; GPU g hosts physical experts g * P/G .. (g + 1) * P/G - 1; num_physical_experts =
           logical experts + --ep-num-redundant-experts, a multiple of the expert-parallel size.
    {"logical_count": int [num_layers, num_logical_experts] or [X, num_layers, num_logical_experts]}
        -> ExpertLocationMetadata.init_by_eplb: SGLang runs its own EPLB on that load at start.

The second is also the layout of the dump SGLang writes in `stat` mode (`python/sglang/srt/eplb/
expert_distribution.py`, `_StatAccumulator.dump`: `torch.save(dict(rank, logical_count=int Tensor [buffered
steps, num_layers, num_logical_experts], average_utilization_rate_over_window))`), so the load moescope writes
there can be read as SGLang's own dump or given to `--init-expert-location` directly.

SGLang's layer axis is the model's decoder layers (`num_hidden_layers`), dense ones included; moescope's is
its MoE layers. Each MoE layer goes to its decoder layer (the trace's manifest says which); a dense decoder
layer gets SGLang's trivial map (physical p -> logical p mod E, `init_trivial`) and no load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.trace.manifest import atomic_write_bytes

INIT_EXPERT_LOCATION = "sglang_init_expert_location_{policy}.json"
EXPERT_DISTRIBUTION = "sglang_expert_distribution.pt"


@dataclass(frozen=True)
class DecoderLayout:
    """Where moescope's MoE layers sit among the model's decoder layers."""

    decoder_layers: tuple[int, ...]  # [L] decoder layer of each MoE layer
    n_decoder_layers: int
    known: bool  # False: the source did not say; MoE layer i was taken for decoder layer i

    @classmethod
    def from_manifest(cls, manifest: dict | None, n_moe_layers: int) -> "DecoderLayout":
        """From a trace's manifest (a Hugging Face or vLLM capture, or an SGLang import); else MoE = decoder."""
        manifest = manifest or {}
        layers = [layer.get("decoder_layer") for layer in manifest.get("layers", [])]
        n = manifest.get("model", {}).get("num_decoder_layers")
        capture = manifest.get("capture", {})
        if capture.get("decoder_layers") is not None:  # an SGLang import: the dump's own layer axis
            layers, n = capture["decoder_layers"], capture.get("num_decoder_layers")
        if len(layers) == n_moe_layers and all(isinstance(d, int) for d in layers):
            n = n if isinstance(n, int) else max(layers) + 1
            return cls(tuple(layers), max(n, max(layers) + 1), True)
        return cls(tuple(range(n_moe_layers)), n_moe_layers, False)


def sglang_physical_to_logical(physical_to_logical: np.ndarray, n_experts: int, layout: DecoderLayout) -> np.ndarray:
    """moescope's map int [L, P] (MoE layers) -> SGLang's int64 [num_layers, P] (decoder layers)."""
    P = physical_to_logical.shape[1]
    out = np.tile(np.arange(P, dtype=np.int64) % n_experts, (layout.n_decoder_layers, 1))  # init_trivial's map
    out[list(layout.decoder_layers)] = physical_to_logical
    return out


def sglang_logical_count(load: np.ndarray, layout: DecoderLayout) -> np.ndarray:
    """Load int [L, E] (MoE layers) -> SGLang's logical_count int64 [1, num_layers, E]; dense layers count 0."""
    out = np.zeros((1, layout.n_decoder_layers, load.shape[1]), np.int64)
    out[0, list(layout.decoder_layers)] = load
    return out


def write_init_expert_location(path: str | os.PathLike, physical_to_logical: np.ndarray) -> Path:
    """SGLang's `--init-expert-location` JSON of a map int [num_layers, num_physical_experts]."""
    body = json.dumps({"physical_to_logical_map": np.asarray(physical_to_logical, np.int64).tolist()})
    atomic_write_bytes(Path(path), body.encode())
    return Path(path)


def write_expert_distribution(path: str | os.PathLike, logical_count: np.ndarray) -> Path:
    """SGLang's stat-mode expert-distribution dump of logical_count int [X, num_layers, E] (torch.save)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"rank": 0, "logical_count": torch.from_numpy(np.asarray(logical_count, np.int64)),
                "average_utilization_rate_over_window": None}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def write_sglang_files(out: Path, load: np.ndarray, placements: dict, n_experts: int,
                       layout: DecoderLayout) -> list[str]:
    """The engine files of a placement run in `out`: one `--init-expert-location` map per policy, and the load
    as SGLang's dump. Returns the file names written."""
    names = []
    for policy, placement in placements.items():
        p2l = placement.physical_to_logical  # [L, P]
        if p2l.shape[0] != len(layout.decoder_layers):
            raise MoescopeError(f"placement {policy} has {p2l.shape[0]} layers for {len(layout.decoder_layers)} MoE layers")
        name = INIT_EXPERT_LOCATION.format(policy=policy)
        write_init_expert_location(out / name, sglang_physical_to_logical(p2l, n_experts, layout))
        names.append(name)
    write_expert_distribution(out / EXPERT_DISTRIBUTION, sglang_logical_count(load, layout))
    return names + [EXPERT_DISTRIBUTION]
