"""SGLang's per-token expert-distribution dumps -> a trace.

Where SGLang defines the layout (`python/sglang/srt/eplb/expert_distribution.py`): a server started with
`--expert-distribution-recorder-mode per_token` and asked to `/dump_expert_distribution_record` writes
`expert_distribution_recorder_<time>_<rank>.pt` with `torch.save(dict(records=[...],
last_physical_to_logical_map=Tensor [layers, physical experts]))`. Each record is one forward pass
(`_DetailSinglePassGatherer.collect`, `_DetailAccumulator.append`):

    forward_pass_id, rank, gatherer_key
    input_ids, positions   list[int] [T]: the pass's tokens, all requests flattened
    extend_seq_lens        list[int] per request of an extend pass (None for a decode pass)
    forward_mode           ForwardMode value (`model_executor/forward_batch_info.py`: EXTEND 1, DECODE 2, MIXED 3)
    topk_ids_of_layer      int32 Tensor [decoder layers, T, 8]: physical expert ids, -1 where nothing was
                           written (dense layers, and slots past the model's top-k)

The dump is read with `torch.load(weights_only=True)`: tensors, lists and numbers, never pickled objects. Ids
are mapped to logical experts with `last_physical_to_logical_map` (the map at dump time; SGLang notes it may
change while recording). The records hold no request ids, so each request of a pass becomes its own sequence
(an extend pass splits by `extend_seq_lens`; a decode pass is one token per request), at SGLang's positions;
decode tokens are marked generated. SGLang records no gate weights. With tensor parallelism every rank's dump
holds the same tokens: import one rank's file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moescope.errors import ImportFormatError
from moescope.trace.formats.dense import Imported, check_ids, token_block

DECODE = 2  # ForwardMode.DECODE
FIELDS = ("input_ids", "positions", "forward_mode", "topk_ids_of_layer")


def load_dump(path: Path) -> dict:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (torch.serialization.pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImportFormatError(f"{path}: not an SGLang dump that loads without unpickling objects ({reason[:200]})") from None
    if isinstance(data, dict) and "logical_count" in data:
        raise ImportFormatError(f"{path}: an SGLang 'stat' dump (counts only, no tokens); record with "
                                "--expert-distribution-recorder-mode per_token")
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ImportFormatError(f"{path}: not an SGLang per_token expert-distribution dump (no records list)")
    return data


def _record_arrays(record, where: str, physical_to_logical) -> dict:
    import torch

    if not isinstance(record, dict) or any(name not in record for name in FIELDS):
        raise ImportFormatError(f"{where}: a record needs {', '.join(FIELDS)}")
    ids = record["topk_ids_of_layer"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 3 or ids.dtype.is_floating_point:
        raise ImportFormatError(f"{where}: topk_ids_of_layer must be an integer tensor [layers, tokens, slots]")
    ids = ids.numpy().astype(np.int64)
    tokens, positions = (np.asarray(record[name]) for name in ("input_ids", "positions"))
    T = ids.shape[1]
    if tokens.shape != (T,) or positions.shape != (T,) or not all(np.issubdtype(a.dtype, np.integer) for a in (tokens, positions)):
        raise ImportFormatError(f"{where}: input_ids and positions must be {T} integers, one per routed token")
    lengths = record.get("extend_seq_lens")
    if lengths is None or record["forward_mode"] == DECODE:
        lengths = [1] * T
    if not isinstance(lengths, list) or sum(lengths) != T or min(lengths, default=1) < 1:
        raise ImportFormatError(f"{where}: extend_seq_lens does not add up to the pass's {T} tokens")
    if physical_to_logical is not None and (ids >= 0).any():
        table = physical_to_logical.numpy().astype(np.int64)  # [layers, physical]
        if table.shape[0] != ids.shape[0] or ids.max() >= table.shape[1]:
            raise ImportFormatError(f"{where}: physical expert ids beyond last_physical_to_logical_map")
        layer = np.broadcast_to(np.arange(ids.shape[0])[:, None, None], ids.shape)
        ids = np.where(ids >= 0, table[layer, np.maximum(ids, 0)], -1)
    return {"ids": ids, "token_id": tokens, "pos": positions, "lengths": lengths,
            "generated": np.full(T, record["forward_mode"] == DECODE)}


def read_sglang(path: str | os.PathLike) -> Imported:
    path = Path(path)
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise ImportFormatError(f"{path}: no such file (an SGLang .pt dump, or a folder of them)")
    passes, sources = [], []
    for file in files:
        data = load_dump(file)
        mapping = data.get("last_physical_to_logical_map")
        for i, record in enumerate(data["records"]):
            passes.append(_record_arrays(record, f"{file} record {i}", mapping))
            sources.append(f"{file.name}#{record.get('forward_pass_id', i)}")
    if not passes:
        raise ImportFormatError(f"{path}: the dump holds no forward pass")
    layers = {p["ids"].shape[0] for p in passes}
    if len(layers) != 1:
        raise ImportFormatError(f"{path}: forward passes with different numbers of layers {sorted(layers)}")
    ids = np.concatenate([p["ids"] for p in passes], axis=1)  # [decoder layers, T, slots]
    moe = (ids >= 0).any(axis=(1, 2))  # dense layers are never written
    slots = (ids[moe] >= 0).any(axis=(0, 1))  # slots past top-k stay -1
    k = int(slots.sum())
    if not moe.any() or not slots[:k].all():
        raise ImportFormatError(f"{path}: no expert ids recorded" if not moe.any() else
                                f"{path}: the recorded slots are not the first k of topk_ids_of_layer")
    ids = ids[moe][:, :, :k]  # [L, T, k]
    if (ids < 0).any():
        layer, token = np.argwhere((ids < 0).any(-1))[0]
        raise ImportFormatError(f"{path}: token {int(token)} has fewer than {k} experts in MoE layer {int(layer)}")
    check_ids(ids, str(path))
    lengths = np.concatenate([p["lengths"] for p in passes])  # one entry per sequence
    doc_ids = [f"{src}/{j}" for src, p in zip(sources, passes) for j in range(len(p["lengths"]))]
    block = token_block(
        seq_id=np.repeat(np.arange(len(lengths)), lengths),
        pos=np.concatenate([p["pos"] for p in passes]),
        token_id=np.concatenate([p["token_id"] for p in passes]),
        generated=np.concatenate([p["generated"] for p in passes]),
        topk_ids=ids,
    )
    order = np.lexsort((block.pos, block.seq_id))  # positions within a request of a pass are ascending already
    if not np.array_equal(order, np.arange(len(order))):
        raise ImportFormatError(f"{path}: positions within a request are not ascending")
    return Imported(block, str(path), "sglang", doc_ids=dict(enumerate(doc_ids)),
                    notes={"decoder_layers": np.flatnonzero(moe).tolist(), "num_decoder_layers": int(len(moe))})
