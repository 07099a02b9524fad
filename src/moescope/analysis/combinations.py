"""Encode an unordered top-k expert set as one int64, and back, vectorised.

A token's selection is a multiset of k symbols from {0..E} (E is the "not an expert" sentinel, which may
repeat). Sorting it gives s_0 <= ... <= s_{k-1}; x_c = s_c + c is then strictly increasing, and the
combinatorial number system ranks it as sum_c C(x_c, c + 1), a bijection onto [0, C(E + k, k)).
Ranks are trace-wide identities, so per-shard combination counts merge by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from math import comb

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class CombinationCoder:
    n_symbols: int  # E + 1
    k: int
    binom: np.ndarray  # int64 [n_symbols + k, k + 1]: C(n, r), clipped at int64 max

    @property
    def n_codes(self) -> int:
        return comb(self.n_symbols + self.k - 1, self.k)

    @classmethod
    @cache  # one table per (E, k) for the process: analyses ask for it on every piece of every shard
    def for_context(cls, n_experts: int, k: int) -> CombinationCoder | None:
        """The coder for E experts and top-k, or None when the number of sets does not fit in int64."""
        n_symbols = n_experts + 1
        if comb(n_symbols + k - 1, k) >= 2**62:
            return None
        table = [[min(comb(n, r), _INT64_MAX) for r in range(k + 1)] for n in range(n_symbols + k)]
        binom = np.array(table, dtype=np.int64)
        binom.flags.writeable = False  # shared by every caller
        return cls(n_symbols, k, binom)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """int64 [...] rank of each row of ids [..., k] (values in 0..E, order irrelevant)."""
        x = np.sort(ids, axis=-1) + np.arange(self.k)  # [..., k] strictly increasing
        rank = np.zeros(ids.shape[:-1], np.int64)
        for c in range(self.k):
            rank += self.binom[x[..., c], c + 1]
        return rank

    def encode_sorted(self, sorted_ids: np.ndarray) -> np.ndarray:
        """int64 [...] rank of slot-major ids [k, ...] already sorted ascending along axis 0."""
        rank = np.zeros(sorted_ids.shape[1:], np.int64)
        for c in range(self.k):
            rank += self.binom[sorted_ids[c] + c, c + 1]
        return rank

    def decode(self, rank: np.ndarray) -> np.ndarray:
        """int64 [..., k] sorted ids of each rank (inverse of encode)."""
        rest = np.asarray(rank, dtype=np.int64).copy()
        out = np.empty(rest.shape + (self.k,), np.int64)
        for c in range(self.k - 1, -1, -1):
            column = self.binom[:, c + 1]  # non-decreasing in n
            x = np.searchsorted(column, rest, side="right") - 1  # largest x with C(x, c+1) <= rest
            rest -= column[x]
            out[..., c] = x - c
        return out
