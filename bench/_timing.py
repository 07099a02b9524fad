"""Timing for the benchmarks: alternatives run interleaved, rep by rep, and every figure printed with its spread.

    times = interleaved({"plain": f, "moescope": g}, reps=9)     # {name: [seconds per rep]}
    print(spread(rates(times["plain"], n_tokens)))              # "21,480 (20,910–21,960)"
    print(spread(overheads(times, "plain")["moescope"], "+.1%"))  # "+1.3% (−0.4%–+3.0%)"

Overheads are paired per rep (way / baseline of the same rep), so slow periods of the machine hit both
sides of each ratio; the median is the figure, min–max its spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(ways: dict[str, Callable[[], object]], reps: int, *, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each way, `reps` rounds of all ways in turn (after `warmup` untimed rounds)."""
    for _ in range(warmup):
        for fn in ways.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def overheads(times: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per rep, each way's time over the baseline's time in the same rep, minus 1."""
    return {name: [t / b - 1 for t, b in zip(ts, times[base])] for name, ts in times.items()}


def rates(seconds: list[float], amount: float) -> list[float]:
    return [amount / s for s in seconds]


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """'median (min–max)'."""
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"
