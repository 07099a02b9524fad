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

With TensorRT-LLM's MoE load balancer on, the statistics count physical expert slots, not experts
(`num_experts` in meta_info.json is then the number of slots). The files do not say which, so:
  --slot-map FILE   the load balancer's slot assignment, the YAML/JSON TensorRT-LLM reads
                    (`moe_config.load_balancer.initial_global_assignments`, or that mapping at the top level:
                    {decoder layer: [logical expert of slot 0, slot 1, ...]}): counts and ids are mapped to
                    logical experts; valid for a static placement (an online balancer moves experts between
                    slots while it records, which no file keeps)
  --n-experts E     below meta_info.json's num_experts, without --slot-map: refused in one line (slots
                    cannot be turned into experts without the map)
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


def read_slot_map(path: str | os.PathLike, n_slots: int, layers: list[int]) -> tuple[np.ndarray, int]:
    """The load balancer's slot assignment -> (logical expert of each slot int [L, n_slots] for `layers`,
    number of logical experts: the largest id + 1)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportFormatError(f"{path}: no such slot map") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ImportFormatError(f"{path}: not YAML or JSON ({str(err).splitlines()[0]})") from None
    for key in ("moe_config", "load_balancer"):
        data = data.get(key, data) if isinstance(data, dict) else data
    data = data.get("initial_global_assignments", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not data:
        raise ImportFormatError(f"{path}: needs initial_global_assignments: {{decoder layer: [expert per slot]}}")
    try:
        table = {int(layer): [int(e) for e in slots] for layer, slots in data.items()}
    except (TypeError, ValueError):
        raise ImportFormatError(f"{path}: initial_global_assignments maps decoder layers to lists of expert ids") from None
    missing = [layer for layer in layers if layer not in table]
    if missing:
        raise ImportFormatError(f"{path}: no slot assignment for decoder layer(s) {missing}")
    maps = np.array([table[layer] for layer in layers], dtype=np.int64) if len({len(table[l]) for l in layers}) == 1 \
        else None
    if maps is None or maps.shape[1] != n_slots:
        raise ImportFormatError(f"{path}: every layer needs {n_slots} slots (meta_info.json's num_experts)")
    if maps.min() < 0:
        raise ImportFormatError(f"{path}: negative expert id in the slot assignment")
    return maps, int(maps.max()) + 1


def _logical(slots: int, n_experts: int | None, slot_map, layers: list[int], where: Path):
    """(slot -> logical map int [L, slots] or None, logical experts) after the slots-or-experts check."""
    if slot_map is not None:
        maps, E = read_slot_map(slot_map, slots, layers)
        if n_experts is not None and n_experts < E:
            raise ImportFormatError(f"{slot_map}: expert id {E - 1} in the slot map, but --n-experts is {n_experts}")
        return maps, n_experts or E
    if n_experts is not None and n_experts < slots:
        raise ImportFormatError(f"{where}: meta_info.json counts {slots} experts but --n-experts is {n_experts}: these "
                                "are load-balancer slots; give their assignment with --slot-map FILE")
    return None, n_experts or slots


def read_trtllm_counts(path: str | os.PathLike, *, n_experts: int | None = None,
                       slot_map: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(iterations int [W], tokens int64 [W, L, E], decoder layers [L]) summed over ranks; slots mapped to
    logical experts with `slot_map` (module docstring)."""
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
    tokens = np.stack([np.stack([total[i, l] for l in layers]) for i in iterations])  # [W, L, slots]
    maps, n_logical = _logical(E, n_experts, slot_map, layers, folder)
    if maps is not None:  # a slot's count goes to the expert it holds; replicas of one expert add up
        W, L, _ = tokens.shape
        logical = np.zeros((W, L, n_logical), np.int64)
        for layer in range(L):  # L small: a loop over layers, vectorised over windows and slots
            np.add.at(logical[:, layer], (slice(None), maps[layer]), tokens[:, layer])
        tokens = logical
    elif n_logical > E:
        tokens = np.concatenate([tokens, np.zeros((*tokens.shape[:2], n_logical - E), np.int64)], axis=2)
    return np.asarray(iterations), tokens, layers


def read_trtllm_tokens(path: str | os.PathLike, *, n_experts: int | None = None,
                       slot_map: str | os.PathLike | None = None) -> Imported:
    """The per-token files as a trace: one sequence per (rank, iteration), layers renumbered 0..L-1; slot ids
    mapped to logical experts with `slot_map` (module docstring)."""
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
    maps, n_logical = _logical(meta["num_experts"], n_experts, slot_map, layers, folder)
    if maps is not None:
        if ids.min() < 0 or ids.max() >= maps.shape[1]:
            raise ImportFormatError(f"{folder}: a slot id outside 0..{maps.shape[1] - 1}")
        ids = np.take_along_axis(maps[:, None, :], ids.reshape(len(layers), 1, -1), axis=2).reshape(ids.shape)
    check_ids(ids, str(folder))
    block = token_block(seq_id=np.repeat(np.arange(len(lengths)), lengths),
                        pos=np.concatenate([np.arange(n) for n in lengths]), token_id=np.full(ids.shape[1], -1),
                        generated=np.zeros(ids.shape[1], bool), topk_ids=ids)
    doc_ids = {i: f"rank{r}/iter{it}" for i, (r, it) in enumerate(sorted(per_seq))}
    notes = {"decoder_layers": layers, **({"slot_map": str(slot_map)} if maps is not None else {})}
    return Imported(block, str(folder), "trtllm", doc_ids=doc_ids, n_experts=n_logical, notes=notes)
