"""The alert rules on hand-made checks: trend, collapse and dead experts, each once per trip."""

from __future__ import annotations

import math

import numpy as np

from moescope.monitor.alerts import AlertState, Thresholds


def _check(state: AlertState, step: int, entropy: float, shares: list[float]):
    alerts, n_cold, n_dead = state.check(step, np.array([shares]), np.array([entropy]))
    return alerts, {0: (int(n_cold[0]), int(n_dead[0]))}


def test_a_falling_trend_alerts_once_and_again_after_it_cleared():
    state = AlertState(Thresholds(trend_window=3, trend_drop=0.2, collapse_ratio=0.1), n_layers=1, n_experts=4)
    even = [0.25] * 4
    top = math.log(4)
    kinds = []
    for step, entropy in enumerate([top, 0.9 * top, 0.7 * top, 0.6 * top, 0.65 * top, 0.6 * top, 0.5 * top, 0.4 * top]):
        alerts, _ = _check(state, step, entropy, even)
        kinds.append([(a["kind"], a["step"]) for a in alerts])
    # steps 0-2 fall by 30 %: trend at 2; it keeps falling at 3 (no repeat); 4 rises (cleared); 4-6 fall by 23 %
    assert kinds == [[], [], [("trend", 2)], [], [], [], [("trend", 6)], []]


def test_a_small_steady_fall_is_not_a_trend_and_collapse_is_relative_to_log_e():
    state = AlertState(Thresholds(trend_window=3, trend_drop=0.2, collapse_ratio=0.3), n_layers=1, n_experts=8)
    top = math.log(8)
    out = [_check(state, s, e, [0.125] * 8)[0] for s, e in enumerate([top, 0.97 * top, 0.95 * top, 0.29 * top])]
    assert out[:3] == [[], [], []]
    assert [a["kind"] for a in out[3]] == ["collapse", "trend"] and out[3][0]["severity"] == "critical"
    assert abs(out[3][0]["value"] - 0.29) < 1e-12


def test_cold_becomes_dead_after_the_persistence_and_a_recovery_resets_it():
    state = AlertState(Thresholds(cold_factor=0.1, dead_after=2), n_layers=1, n_experts=4)
    starved = [0.5, 0.49, 0.01, 0.0]  # experts 2 and 3 below 0.1 / 4
    a1, c1 = _check(state, 0, 1.0, starved)
    a2, c2 = _check(state, 1, 1.0, starved)
    a3, c3 = _check(state, 2, 1.0, [0.25, 0.25, 0.25, 0.25])  # recovered
    a4, c4 = _check(state, 3, 1.0, starved)
    assert (a1, c1) == ([], {0: (2, 0)})
    assert [a["kind"] for a in a2] == ["dead"] and c2 == {0: (2, 2)} and "[2, 3]" in a2[0]["message"]
    assert (a3, c3) == ([], {0: (0, 0)})
    assert (a4, c4) == ([], {0: (2, 0)})  # the streak starts again
