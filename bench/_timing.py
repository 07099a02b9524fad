"""Interleaved repetitions and their spread: the one way the benchmarks in bench/ compare alternatives.

    from _timing import interleave, Spread, compare_line
    times = interleave({"plain": run_plain, "moescope": run_moescope}, reps=5)  # {way: [seconds per rep]}
    print(compare_line("moescope", times["moescope"], times["plain"]))

Each repetition runs every way once, in an order rotated by one place per repetition, so no way always
runs first or last (where warm-up, or a burst of another job's load, would hit it alone). A ratio is taken
within each repetition (way / base of the same repetition) and reported as median (min–max) over the
repetitions; a difference is claimed ("slower", "faster") only when the whole min–max range lies on one
side of 1, otherwise it is "within the spread". A benchmark that measures something other than time
(peak memory) passes its own `measure`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def wall_seconds(fn: Callable[[], object]) -> float:
    """Seconds of wall time one call of fn takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(ways: dict[str, object], reps: int, *, measure: Callable[[object], float] = wall_seconds,
               warmup: bool = True) -> dict[str, list[float]]:
    """{way: [measure(way) for each repetition]}, the ways run in a rotating order within each repetition.

    `ways` maps names to whatever `measure` takes (by default zero-argument callables, timed by wall clock);
    `warmup` runs every way once first, unmeasured.
    """
    if reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {reps}")
    names = list(ways)
    if warmup:
        for name in names:
            measure(ways[name])
    values: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            values[name].append(measure(ways[name]))
    return values


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, spec: str = ".3g", scale: float = 1.0) -> str:
        """'median (min–max)' with each number formatted by `spec` after multiplying by `scale`."""
        return f"{format(self.median * scale, spec)} ({format(self.lo * scale, spec)}–{format(self.hi * scale, spec)})"


def paired_ratios(values: Sequence[float], base: Sequence[float]) -> Spread:
    """Spread of value / base, paired by repetition."""
    return Spread.of([v / b for v, b in zip(values, base, strict=True)])


def verdict(ratio: Spread, bigger: str = "slower", smaller: str = "faster") -> str:
    """`bigger` when the whole range of the ratio is above 1, `smaller` when below, else 'within the spread'."""
    if ratio.lo > 1:
        return bigger
    if ratio.hi < 1:
        return smaller
    return "within the spread"


def compare_line(name: str, values: Sequence[float], base: Sequence[float], *, width: int = 18,
                 work: float | None = None, unit: str = "tokens/s") -> str:
    """One line: the way's throughput (work / seconds, when `work` is given), its time over the base's
    (paired per repetition, as a percent overhead) and the verdict."""
    rate = "" if work is None else f"{Spread.of([work / v for v in values]).text(',.0f')} {unit}   "
    if values is base:
        return f"  {name:<{width}} {rate}the base"
    ratio = paired_ratios(values, base)
    overhead = Spread(ratio.median - 1, ratio.lo - 1, ratio.hi - 1, ratio.n).text("+.1f", 100)
    return f"  {name:<{width}} {rate}{overhead} % vs base   {verdict(ratio)}"


def header(reps: int) -> str:
    return (f"median (min–max) over {reps} interleaved repetitions; overhead paired per repetition; "
            "'slower'/'faster' only when the whole range is on one side")
