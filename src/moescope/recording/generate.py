"""Routing of generated tokens: map the chunks recorded during `model.generate` back to positions.

The first forward pass (prefill) covers the whole left-padded prompt [B, T0]; each later pass covers
the newest position of every row ([B, 1] with a KV cache, or the full [B, T] without one, of which
only the newest column is new). The last generated token is never fed back, so it has no routing.
A row ends at its first EOS: the EOS token and the padding fed after it are not recorded, since whether
they are fed at all depends on the other rows of the batch (vLLM never feeds them).
"""

from __future__ import annotations

import numpy as np
import torch

from moescope.recording.batches import Batch
from moescope.recording.hooks import LayerChunks
from moescope.trace.block import TokenBlock
from moescope.errors import MoescopeError


def _per_step(chunks: list[torch.Tensor], batch_size: int, prompt_len: int) -> torch.Tensor:
    """[B, T_fed, k]: one column per position fed to the model, prompt included."""
    columns = []
    for i, chunk in enumerate(chunks):
        if chunk.shape[0] % batch_size:
            raise MoescopeError(f"generation step {i} recorded {chunk.shape[0]} rows for batch size {batch_size}")
        step = chunk.reshape(batch_size, -1, chunk.shape[-1])
        columns.append(step if i == 0 else step[:, -1:])
    fed = torch.cat(columns, dim=1)
    if fed.shape[1] < prompt_len:
        raise MoescopeError("generation recorded fewer positions than the prompt has")
    return fed


def block_from_generate(batch: Batch, recorded: list[LayerChunks], sequences: torch.Tensor, eos_ids: set[int]) -> TokenBlock:
    """`sequences` [B, T0 + N] is generate()'s output for the left-padded `batch` (prompt length T0)."""
    batch_size, prompt_len = batch.input_ids.shape
    ids = torch.stack([_per_step(c.ids, batch_size, prompt_len) for c in recorded])  # [L, B, T_fed, k]
    weights = torch.stack([_per_step(c.weights, batch_size, prompt_len) for c in recorded])
    router = None
    if recorded and recorded[0].router_output:
        router = torch.stack([_per_step(c.router_output, batch_size, prompt_len) for c in recorded])
    n_fed = ids.shape[2]
    fed_tokens = sequences[:, :n_fed]  # [B, T_fed]
    generated = torch.zeros_like(fed_tokens, dtype=torch.bool)
    generated[:, prompt_len:] = True
    # a generated position is real until the first EOS the row produced (the EOS itself is not)
    is_eos = torch.zeros_like(generated)
    for eos in eos_ids:
        is_eos |= fed_tokens == eos
    after_eos = (is_eos & generated).cumsum(-1) > 0
    real = torch.cat([batch.attention_mask.bool(), ~after_eos[:, prompt_len:]], dim=1)  # [B, T_fed]
    pos = real.long().cumsum(-1) - 1
    keep = real.reshape(-1)
    seq_id = torch.tensor([s.seq_id for s in batch.sequences], dtype=torch.int32)[:, None].expand_as(fed_tokens)
    flat = lambda t: t.reshape(t.shape[0], -1, t.shape[-1])[:, keep]  # [L, B*T_fed, x] -> [L, n, x]
    n = int(keep.sum())
    return TokenBlock(
        seq_id=seq_id.reshape(-1)[keep].numpy(),
        pos=pos.reshape(-1)[keep].to(torch.int32).numpy(),
        token_id=fed_tokens.reshape(-1)[keep].to(torch.int32).numpy(),
        generated=generated.reshape(-1)[keep].numpy(),
        output_entropy=np.full(n, np.nan, np.float32),
        topk_ids=flat(ids).numpy(),
        topk_weights=flat(weights).numpy(),
        router_output=None if router is None else flat(router).numpy(),
    )
