"""bench/_timing.py: every benchmark's interleaving and spread (rotation, pairing, verdicts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_timing", Path(__file__).parents[2] / "bench" / "_timing.py")
timing = sys.modules["bench_timing"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(timing)


def test_each_repetition_runs_every_way_once_in_a_rotated_order():
    order = []
    ways = {name: name for name in "abc"}
    values = timing.interleave(ways, 4, measure=lambda way: order.append(way) or len(order), warmup=True)
    assert order[:3] == ["a", "b", "c"]  # the warm-up, unmeasured
    assert order[3:] == list("abc" "bca" "cab" "abc")
    assert values == {"a": [4, 9, 11, 13], "b": [5, 7, 12, 14], "c": [6, 8, 10, 15]}


def test_ratios_are_paired_by_repetition_and_claimed_only_beyond_their_range():
    base, slow = [1.0, 2.0, 4.0], [1.1, 2.1, 4.4]
    ratio = timing.paired_ratios(slow, base)
    assert (ratio.median, ratio.lo, ratio.hi) == (pytest.approx(1.1), pytest.approx(1.05), pytest.approx(1.1))
    assert timing.verdict(ratio) == "slower"  # unpaired, the ranges 1-4 and 1.1-4.4 would overlap entirely
    assert timing.verdict(timing.paired_ratios([0.9, 2.1], [1.0, 2.0])) == "within the spread"
    assert timing.verdict(timing.paired_ratios([0.9, 1.8], [1.0, 2.0])) == "faster"
    line = timing.compare_line("moescope", slow, base, work=100.0)
    assert "+10.0 (+5.0–+10.0) % vs base" in line and line.endswith("slower") and "tokens/s" in line
    assert timing.compare_line("plain", base, base).endswith("plain              the base")


def test_spread_text_and_bad_reps():
    assert timing.Spread.of([3.0, 1.0, 2.0]).text(".1f") == "2.0 (1.0–3.0)"
    with pytest.raises(SystemExit, match="--reps"):
        timing.interleave({"a": lambda: None}, 0)
