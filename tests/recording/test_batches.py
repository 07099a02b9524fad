"""Batches and shard-sized chunks never span a gap in seq ids (a resumed capture skips committed sequences),
so every shard holds one contiguous run of seq ids, as TraceWriter.committed_seq_ids assumes."""

import torch

from moescope.recording.batches import batched, chunks
from moescope.trace.block import Sequence


def _seqs(ids, n_tokens=3):
    return [Sequence(i, [7] * n_tokens, "s", "d", str(i), "") for i in ids]


def _ids(groups):
    return [[s.seq_id for s in g] for g in groups]


def test_batched_splits_at_gaps_and_at_batch_size():
    assert _ids(batched(_seqs([0, 1, 2, 3, 4]), 2)) == [[0, 1], [2, 3], [4]]
    assert _ids(batched(_seqs([0, 1, 5, 6, 7, 9]), 2)) == [[0, 1], [5, 6], [7], [9]]


def test_chunks_split_at_gaps_and_at_the_token_budget():
    assert _ids(chunks(_seqs(range(5)), 6)) == [[0, 1], [2, 3], [4]]
    assert _ids(chunks(_seqs([0, 2, 3, 4, 8]), 6)) == [[0], [2, 3], [4], [8]]


def test_padding_side_of_a_mask():
    from moescope.recording.batches import padding_side

    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert padding_side(left) == "left"
    assert padding_side(left.flip(-1)) == "right" and padding_side(None) == "right"
    assert padding_side(torch.ones(2, 3, dtype=torch.long)) == "right"  # nothing padded
    assert padding_side(torch.tensor([[0, 1, 0, 1]])) == "right"  # holes: rows are re-padded on the right
