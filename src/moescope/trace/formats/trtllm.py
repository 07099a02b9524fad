"""TensorRT-LLM's expert statistics -> a load table (its counts) or a trace (its per-token files).

Where TensorRT-LLM defines the layout (`tensorrt_llm/_torch/expert_statistic.py`, class
`ExpertStatistic`; enabled by EXPERT_STATISTIC_ITER_RANGE=start-stop, written to EXPERT_STATISTIC_PATH; read by
`examples/wide_ep/ep_load_balancer/utils.py:load_expert_statistic`):

    meta_info.json                          {"num_experts": E, "num_experts_per_token": k, ...} (rank 0 writes it)
    rank<r>.safetensors                     "<iter>_<layer>" -> int [E]: bincount of the experts rank r's tokens
                                            selected in that iteration and layer (ranks are summed)
    token_selected_experts_rank<r>.safetensors, or rank<r>_raw.safetensors (other versions)
                                            "<iter>_<layer>" -> int [tokens, k]: the ids themselves

`<layer>` is the decoder-layer index of an MoE layer; they are renumbered 0..L-1 here. The counts become a
load table (trace/load_table.py) whose windows are the iterations; the per-token files, where written, a
trace with one sequence per (rank, iteration) — TensorRT-LLM records no token ids or positions, so token ids
are -1 and positions the row order. Files are read with safetensors (tensors only, no code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from moescope.errors import ImportFormatError
from moescope.trace.formats.dense import Imported, check_ids, token_block

COUNTS = re.compile(r"rank(\d+)\.safetensors")
TOKENS = re.compile(r"(?:token_selected_experts_rank(\d+)|rank(\d+)_raw)\.safetensors")
KEY = re.compile(r"(\d+)_(\d+)")


def read_meta(folder: Path) -> dict:
    path = folder / "meta_info.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportFormatError(f"{path}: missing; a TensorRT-LLM expert-statistic folder has meta_info.json") from None
    except (ValueError, UnicodeDecodeError):
        raise ImportFormatError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(n), int) and not isinstance(meta.get(n), bool)
                                             and meta[n] > 0 for n in ("num_experts", "num_experts_per_token")):
        raise ImportFormatError(f"{path}: needs positive integers num_experts and num_experts_per_token")
    return meta


def _tensors(path: Path) -> dict[tuple[int, int], np.ndarray]:
    """{(iteration, decoder layer): array} of one safetensors file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ImportFormatError(f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from None
    out = {}
    for key, array in tensors.items():
        match = KEY.fullmatch(key)
        if match is None or not np.issubdtype(array.dtype, np.integer):
            raise ImportFormatError(f"{path}: tensor {key!r} is not an integer '<iteration>_<layer>' entry")
        out[int(match[1]), int(match[2])] = array.astype(np.int64)
    return out


def _files(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    found = [(m, p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted((int(next(g for g in m.groups() if g is not None)), p) for m, p in found)


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ImportFormatError(f"{folder}: not a folder (TensorRT-LLM writes EXPERT_STATISTIC_PATH as a folder)")
    return folder


def read_trtllm_counts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(iterations int [W], tokens int64 [W, L, E], decoder layers [L]) summed over ranks."""
    folder = _folder(path)
    E = read_meta(folder)["num_experts"]
    files = _files(folder, COUNTS)
    if not files:
        raise ImportFormatError(f"{folder}: no rank<r>.safetensors counts")
    total: dict[tuple[int, int], np.ndarray] = {}
    for _, file in files:
        for key, counts in _tensors(file).items():
            if counts.shape != (E,) or counts.min() < 0:
                raise ImportFormatError(f"{file}: {key[0]}_{key[1]} must hold {E} non-negative counts (num_experts)")
            total[key] = total.get(key, 0) + counts
    iterations = sorted({i for i, _ in total})
    layers = sorted({l for _, l in total})
    if len(total) != len(iterations) * len(layers):
        raise ImportFormatError(f"{folder}: not every iteration has counts for every MoE layer")
    tokens = np.stack([np.stack([total[i, l] for l in layers]) for i in iterations])
    return np.asarray(iterations), tokens, layers


def read_trtllm_tokens(path: str | os.PathLike) -> Imported:
    """The per-token files as a trace: one sequence per (rank, iteration), layers renumbered 0..L-1."""
    folder = _folder(path)
    meta = read_meta(folder)
    k = meta["num_experts_per_token"]
    files = _files(folder, TOKENS)
    if not files:
        raise ImportFormatError(f"{folder}: no per-token files (token_selected_experts_rank<r>.safetensors); "
                                "import its counts as a load table instead: --out FILE.parquet")
    per_seq: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for rank, file in files:
        for (iteration, layer), ids in _tensors(file).items():
            if ids.ndim != 2 or ids.shape[1] != k:
                raise ImportFormatError(f"{file}: {iteration}_{layer} must be [tokens, {k}] expert ids")
            per_seq.setdefault((rank, iteration), {})[layer] = ids
    layers = sorted({l for group in per_seq.values() for l in group})
    blocks, lengths = [], []
    for (rank, iteration), group in sorted(per_seq.items()):
        if sorted(group) != layers or len({a.shape[0] for a in group.values()}) != 1:
            raise ImportFormatError(f"{folder}: rank {rank} iteration {iteration} lacks a layer or has layers of "
                                    "different token counts")
        blocks.append(np.stack([group[l] for l in layers]))  # [L, n, k]
        lengths.append(blocks[-1].shape[1])
    ids = np.concatenate(blocks, axis=1)  # [L, T, k]
    check_ids(ids, str(folder))
    block = token_block(seq_id=np.repeat(np.arange(len(lengths)), lengths),
                        pos=np.concatenate([np.arange(n) for n in lengths]), token_id=np.full(ids.shape[1], -1),
                        generated=np.zeros(ids.shape[1], bool), topk_ids=ids)
    doc_ids = {i: f"rank{r}/iter{it}" for i, (r, it) in enumerate(sorted(per_seq))}
    return Imported(block, str(folder), "trtllm", doc_ids=doc_ids, n_experts=meta["num_experts"],
                    notes={"decoder_layers": layers})
