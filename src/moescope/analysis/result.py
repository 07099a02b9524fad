"""What every analysis returns: a frozen result with tables (`to_pandas`) and headline numbers (`summary`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd


@runtime_checkable
class AnalysisResult(Protocol):
    """A result may also carry `warnings: tuple[str, ...]`, problems a user must see (the CLI prints them on
    stderr); each warning is also one of its notes."""

    notes: tuple[str, ...]  # why something was skipped or how to read it; empty when nothing to say

    # A result may also have `chunked_tables() -> dict[str, pd.DataFrame | ChunkedTable]`: the tables of
    # `to_pandas()`, its largest ones as ChunkedTable (built piece by piece when written).

    def to_pandas(self) -> pd.DataFrame | dict[str, pd.DataFrame]: ...

    def summary(self) -> dict[str, Any]:
        """Headline numbers, JSON-serialisable (NaN becomes None)."""
        ...


TABLE_PIECE_ROWS = 1 << 18  # rows per piece of a ChunkedTable (262,144)


@dataclass(frozen=True)
class ChunkedTable:
    """A table too large to hold whole (11 M rows of cross-layer transitions at DeepSeek-V3's shape): `pieces()`
    builds its rows piece by piece, in order, every piece with the same columns; `to_pandas()` is their concatenation.
    A result offers its large tables this way in `chunked_tables()`, next to `to_pandas()`, so that `analyze` writes
    them in bounded memory."""

    pieces: Callable[[], Iterator[pd.DataFrame]]
    n_rows: int

    def to_pandas(self) -> pd.DataFrame:
        return pd.concat(list(self.pieces()), ignore_index=True)

    def __len__(self) -> int:
        return self.n_rows


def layer_labels(layers: tuple[int, ...], overall: bool = True) -> list[int]:
    """The `layer` column of per-layer tables: the MoE-layer indices, then OVERALL (-1) when pooled."""
    from moescope.analysis.context import OVERALL

    return [*layers, OVERALL] if overall else list(layers)


def worst_and_mean(per_layer: np.ndarray, layers: tuple[int, ...], name: str, *, worst) -> dict:
    """{name_worst, name_worst_layer, name_layer_mean} of one statistic's per-layer values [L] (NaN skipped).

    `worst` is np.nanargmin or np.nanargmax: which end of the range is the bad one for this statistic.
    """
    finite = np.isfinite(per_layer)
    at = int(worst(np.where(finite, per_layer, np.nan))) if finite.any() else None
    return {
        f"{name}_worst": None if at is None else per_layer[at],
        f"{name}_worst_layer": None if at is None else layers[at],
        f"{name}_layer_mean": per_layer[finite].mean() if finite.any() else None,
    }
