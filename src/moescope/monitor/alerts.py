"""Alerts from successive checks of a training run's routing: what trips, once per trip, with its numbers.

    dead      an expert cold (load share < cold_factor / E) at `dead_after` checks in a row
    collapse  a layer's router entropy below `collapse_ratio` of its maximum, log E
    trend     a layer's router entropy falling at each of the last `trend_window` checks, by `trend_drop` or more
An alert is {"step", "severity", "kind", "layer", "message", "value", "threshold"}; a condition that stays
true does not repeat its alert until it has cleared.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from moescope.errors import MoescopeError


@dataclass(frozen=True)
class Thresholds:
    cold_factor: float = 0.1  # cold: load share below this fraction of the balanced share 1/E
    dead_after: int = 3  # cold at this many checks in a row: dead
    collapse_ratio: float = 0.3  # router entropy below this fraction of log E: collapsed
    trend_window: int = 5  # checks the entropy trend is judged over
    trend_drop: float = 0.2  # relative fall over the window that trips the trend alert

    def __post_init__(self) -> None:
        if not (0 <= self.cold_factor < 1 and 0 < self.collapse_ratio < 1 and 0 < self.trend_drop < 1):
            raise MoescopeError("cold_factor must be in [0, 1), collapse_ratio and trend_drop in (0, 1)")
        if self.dead_after < 1 or self.trend_window < 2:
            raise MoescopeError("dead_after must be >= 1 and trend_window >= 2 checks")


class AlertState:
    """Per-layer memory across checks: cold streaks, entropy history, which alerts are tripped."""

    def __init__(self, thresholds: Thresholds, n_layers: int, n_experts: int):
        self.t, self.n_experts = thresholds, n_experts
        self.cold_streak = np.zeros((n_layers, n_experts), dtype=np.int64)  # [L, E]
        self.entropy = defaultdict(lambda: deque(maxlen=thresholds.trend_window))
        self.tripped: set[tuple[str, int]] = set()

    def check(self, step: int, share: np.ndarray, router_entropy: np.ndarray,
              labels: list[int] | None = None) -> tuple[list[dict], np.ndarray, np.ndarray]:
        """(new alerts, cold experts [L], dead experts [L]) after one check of load shares [L, E] and each layer's
        router entropy [L] (nats); `labels` [L]: the layers' names in alerts (default 0..L-1)."""
        alerts = []
        labels = list(range(len(share))) if labels is None else [int(x) for x in labels]
        cold = np.asarray(share) < self.t.cold_factor / self.n_experts  # [L, E]
        self.cold_streak = np.where(cold, self.cold_streak + 1, 0)
        dead = self.cold_streak >= self.t.dead_after
        for i, layer in enumerate(labels):
            ids = np.flatnonzero(dead[i]).tolist()
            alerts += self._trip("dead", layer, bool(ids), step, "warning", len(ids), self.t.dead_after,
                                 lambda: f"layer {layer}: {len(ids)} dead expert(s) {ids} (load share below "
                                         f"{self.t.cold_factor:g}/E at {self.t.dead_after} checks in a row)")
        ceiling = math.log(self.n_experts)
        for layer, value in zip(labels, np.asarray(router_entropy, dtype=np.float64).tolist()):
            if not math.isfinite(value):
                continue
            ratio = value / ceiling
            alerts += self._trip("collapse", layer, ratio < self.t.collapse_ratio, step, "critical", ratio, self.t.collapse_ratio,
                                 lambda: f"layer {layer}: router entropy {value:.3f} nats is {ratio:.0%} of its maximum "
                                         f"log {self.n_experts} = {ceiling:.3f} (threshold {self.t.collapse_ratio:.0%})")
            history = self.entropy[layer]
            history.append(value)
            falling = (len(history) == history.maxlen and all(b < a for a, b in zip(history, list(history)[1:]))
                       and history[0] > 0 and (history[0] - history[-1]) / history[0] >= self.t.trend_drop)
            drop = (history[0] - history[-1]) / history[0] if history[0] > 0 else 0.0
            alerts += self._trip("trend", layer, falling, step, "warning", drop, self.t.trend_drop,
                                 lambda: f"layer {layer}: router entropy fell at each of the last {len(history)} checks, "
                                         f"{history[0]:.3f} -> {history[-1]:.3f} nats ({drop:.0%})")
        return alerts, cold.sum(1), dead.sum(1)

    def _trip(self, kind: str, layer: int, condition: bool, step: int, severity: str, value, threshold, message) -> list[dict]:
        """[the alert] if `condition` newly holds, else []; `message()` is formatted only then."""
        key = (kind, layer)
        if not condition:
            self.tripped.discard(key)
            return []
        if key in self.tripped:
            return []
        self.tripped.add(key)
        return [{"step": step, "severity": severity, "kind": kind, "layer": layer, "message": message(),
                 "value": float(value), "threshold": float(threshold)}]
