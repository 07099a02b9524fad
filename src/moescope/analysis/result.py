"""What every analysis returns: a frozen result with tables (`to_pandas`) and headline numbers (`summary`)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import pandas as pd


@runtime_checkable
class AnalysisResult(Protocol):
    notes: tuple[str, ...]  # why something was skipped or how to read it; empty when nothing to say

    def to_pandas(self) -> pd.DataFrame | dict[str, pd.DataFrame]: ...

    def summary(self) -> dict[str, Any]:
        """Headline numbers, JSON-serialisable (NaN becomes None)."""
        ...


def layer_labels(layers: tuple[int, ...], overall: bool = True) -> list[int]:
    """The `layer` column of per-layer tables: the MoE-layer indices, then OVERALL (-1) when pooled."""
    from moescope.analysis.context import OVERALL

    return [*layers, OVERALL] if overall else list(layers)
