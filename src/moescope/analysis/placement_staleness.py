"""Staleness: a placement computed on window t of the trace, served on window t + 1.

Windows are pushed in trace order; each one is placed by every policy, and the previous window's
placements are evaluated on it, next to its own (the placement an oracle would have had). Only the
previous window's placements are held, so memory does not grow with the trace. With `split=True` (what
`moescope placement` asks for) the stale placement is also served with the best split of the window's tokens
over its replicas (placement_split.py: the LP bound a per-batch balancer such as LPLB can reach), against
the even split engines use.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moescope.analysis.context import OVERALL
from moescope.analysis.placement_balance import balancedness, gpu_load
from moescope.analysis.placement_policies import Placement, PlacementOptions, place
from moescope.analysis.placement_split import lp_balancedness


class Staleness:
    def __init__(self, options: PlacementOptions, policies: tuple[str, ...], layers: tuple[int, ...], split: bool = False):
        self.options, self.policies, self.layers, self.split = options, policies, layers, split
        self.previous: dict[str, Placement] | None = None
        self.window = 0
        self.rows: list[pd.DataFrame] = []
        self.split_rows: list[pd.DataFrame] = []

    def push(self, load: np.ndarray, tokens: int) -> None:
        """Window `load` int64 [L, E] of `tokens` tokens, the next one in trace order."""
        fresh = {policy: place(policy, load, self.options) for policy in self.policies}
        if self.previous is not None:
            for policy in self.policies:
                self.rows.append(pd.DataFrame({
                    "policy": policy,
                    "window": self.window,
                    "layer": [*self.layers, OVERALL],
                    "tokens": tokens,
                    "balancedness_fresh": balancedness(gpu_load(fresh[policy], load)),
                    "balancedness_stale": balancedness(gpu_load(self.previous[policy], load)),
                }))
                if self.split:
                    self.split_rows.append(pd.DataFrame({
                        "policy": policy, "window": self.window, "layer": [*self.layers, OVERALL], "tokens": tokens,
                        "balancedness_even": self.rows[-1]["balancedness_stale"],
                        "balancedness_lp": lp_balancedness(self.previous[policy], load),
                    }))
        self.previous = fresh
        self.window += 1

    def frame(self) -> pd.DataFrame:
        columns = ["policy", "window", "layer", "tokens", "balancedness_fresh", "balancedness_stale"]
        return pd.concat(self.rows, ignore_index=True) if self.rows else pd.DataFrame(columns=columns)

    def split_frame(self) -> pd.DataFrame:
        """policy, window, layer, tokens, balancedness_even, balancedness_lp: the stale placement, both splits."""
        columns = ["policy", "window", "layer", "tokens", "balancedness_even", "balancedness_lp"]
        return pd.concat(self.split_rows, ignore_index=True) if self.split_rows else pd.DataFrame(columns=columns)
