"""OLMoE's routing-analysis JSONL -> a trace.

Where allenai/OLMoE defines the layout (`scripts/run_moe_analysis.py`, `run()`, which writes `c4_results*.jsonl`):
one line per sequence of 2048 tokens,

    {"input_ids": [T], "predicted_token_ids": [T], "exp_ids": [T][k][L]}

with `exp_ids = np.stack([np.argsort(-logits, -1)[:, :k] for logits in router_logits], -1)`: per token, the k
experts of largest router logit, largest first, for each of the L MoE layers (OLMoE-1B-7B: k = 8, L = 16). No
gate weights are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moescope.errors import ImportFormatError
from moescope.trace.formats.dense import Imported, check_ids, token_block


def _line_arrays(row, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(row, dict) or "input_ids" not in row or "exp_ids" not in row:
        raise ImportFormatError(f"{where}: expected an object with input_ids and exp_ids")
    try:
        tokens = np.asarray(row["input_ids"])
        ids = np.asarray(row["exp_ids"])
    except ValueError:
        raise ImportFormatError(f"{where}: input_ids / exp_ids are ragged lists") from None
    if tokens.ndim != 1 or not len(tokens) or not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0:
        raise ImportFormatError(f"{where}: input_ids must be a non-empty list of token ids")
    if ids.ndim != 3 or ids.shape[0] != len(tokens) or not np.issubdtype(ids.dtype, np.integer):
        raise ImportFormatError(f"{where}: exp_ids must be integers [tokens={len(tokens)}][k][layers], got shape "
                                f"{list(ids.shape)}")
    return tokens, ids.transpose(2, 0, 1)  # [L, T, k]


def read_olmoe(path: str | os.PathLike) -> Imported:
    path = Path(path)
    tokens, routes = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    raise ImportFormatError(f"{path}:{line_no}: not valid JSON") from None
                t, ids = _line_arrays(row, f"{path}:{line_no}")
                if routes and ids.shape[::2] != routes[0].shape[::2]:
                    raise ImportFormatError(f"{path}:{line_no}: {ids.shape[0]} layers x top-{ids.shape[2]}, but "
                                            f"line 1 has {routes[0].shape[0]} x top-{routes[0].shape[2]}")
                tokens.append(t), routes.append(ids)
    except FileNotFoundError:
        raise ImportFormatError(f"{path}: no such file") from None
    except OSError as err:  # a folder, no permission
        raise ImportFormatError(f"{path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ImportFormatError(f"{path}: not UTF-8 text") from None
    if not tokens:
        raise ImportFormatError(f"{path}: no lines; nothing to import")
    ids = np.concatenate(routes, axis=1)  # [L, T, k]
    check_ids(ids, str(path))
    lengths = [len(t) for t in tokens]
    block = token_block(seq_id=np.repeat(np.arange(len(tokens)), lengths),
                        pos=np.concatenate([np.arange(n) for n in lengths]), token_id=np.concatenate(tokens),
                        generated=np.zeros(sum(lengths), bool), topk_ids=ids)
    return Imported(block, str(path), "olmoe")
