"""Turning documents into fixed-size token sequences and padded batches (no model, no hooks here)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from moescope.errors import MoescopeError
from moescope.trace.block import Sequence


@dataclass(frozen=True)
class Batch:
    sequences: list[Sequence]
    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T], 1 for real tokens
    pos: torch.Tensor  # int64 [B, T], position of each token in its sequence (-1 on padding)


def start_tokens(tokenizer) -> list[int]:
    """The special tokens `tokenizer(text)` puts before a text by default: [BOS] for Llama-, Mixtral-,
    DeepSeek- or Gemma-style tokenizers, [] for GPT-2/Qwen-style ones (and the shipped models')."""
    probe = "a"
    with_special = list(tokenizer(probe)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for at in range(len(with_special) - len(bare) + 1):
        if with_special[at : at + len(bare)] == bare:
            return with_special[:at]
    raise MoescopeError(f"cannot tell which tokens {type(tokenizer).__name__} adds before a text: "
                        f"{probe!r} is {with_special} with special tokens and {bare} without")


def sequences_from_documents(documents: Iterable, tokenizer, *, seq_len: int, max_tokens: int | None,
                             start: list[int] | None = None) -> Iterator[Sequence]:
    """Tokenise documents and cut each into sequences of at most `seq_len` tokens, in corpus order.

    Every sequence begins with `start` (default: `start_tokens(tokenizer)`, so each starts as the model's
    tokenizer starts a text, BOS or nothing), followed by the next piece of the document; `max_tokens`
    counts the start tokens too. seq_ids are assigned in this order, so the same corpus and options always
    give the same ids (which is what lets an interrupted capture resume).
    """
    start = start_tokens(tokenizer) if start is None else list(start)
    step = seq_len - len(start)  # document tokens per sequence
    if step <= 0:
        raise MoescopeError(f"seq_len {seq_len} leaves no room for text after the {len(start)} start token(s) {start}")
    total, seq_id = 0, 0
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        sha1 = hashlib.sha1(doc.text.encode("utf-8", "replace")).hexdigest()
        for at in range(0, len(ids), step):
            chunk = ids[at : at + step]
            if max_tokens is not None:
                chunk = chunk[: max(max_tokens - total - len(start), 0)]
            if not chunk:
                return
            yield Sequence(seq_id, [*start, *chunk], doc.source, doc.domain, doc.doc_id, sha1)
            seq_id += 1
            total += len(start) + len(chunk)


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """ "left" when every padded row of `attention_mask` [B, T] holds its padding before its tokens, else "right"."""
    if attention_mask is None:
        return "right"
    mask = attention_mask.bool()
    starts_padded = ~mask[:, 0] & mask.any(-1)
    left_aligned = (mask.long().cummax(-1).values.bool() == mask).all()  # no padding after a row's first token
    return "left" if bool(starts_padded.any()) and bool(left_aligned) else "right"


def sequences_from_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[Sequence]:
    """Pre-tokenised rows: sequence i is row i (its real tokens, in order)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for row, (ids, keep) in enumerate(zip(input_ids, mask)):
        tokens = ids[keep].tolist()
        sha1 = hashlib.sha1(str(tokens).encode()).hexdigest()
        yield Sequence(row, tokens, "input_ids", "unknown", str(row), sha1)


def make_batch(sequences: list[Sequence], pad_id: int, *, left_pad: bool = False) -> Batch:
    width = max(len(s.token_ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq.token_ids)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        input_ids[row, cols] = torch.tensor(seq.token_ids, dtype=torch.long)
        mask[row, cols] = 1
    pos = mask.cumsum(-1) - 1
    pos[mask == 0] = -1
    return Batch(sequences, input_ids, mask, pos)


def _follows(group: list[Sequence], seq: Sequence) -> bool:
    """Whether `seq` continues `group`'s run of seq ids: a resumed capture skips committed sequences, and a
    batch or shard never spans such a gap (a shard's seq ids stay one contiguous range)."""
    return not group or seq.seq_id == group[-1].seq_id + 1


def batched(sequences: Iterable[Sequence], batch_size: int, *, same_length: bool = False) -> Iterator[list[Sequence]]:
    """Groups of `batch_size` sequences (fewer at the end and before a gap in seq ids; with `same_length`, also
    before a sequence of another length, so that a batch needs no padding)."""
    group: list[Sequence] = []
    for seq in sequences:
        if not _follows(group, seq) or (same_length and group and len(seq.token_ids) != len(group[0].token_ids)):
            yield group
            group = []
        group.append(seq)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def chunks(sequences: Iterable[Sequence], tokens: int) -> Iterator[list[Sequence]]:
    """Groups of whole sequences holding about `tokens` prompt tokens (one shard's worth; less before a gap in seq ids)."""
    group, n = [], 0
    for seq in sequences:
        if not _follows(group, seq):
            yield group
            group, n = [], 0
        group.append(seq)
        n += len(seq.token_ids)
        if n >= tokens:
            yield group
            group, n = [], 0
    if group:
        yield group
