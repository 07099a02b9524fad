"""The benchmark scripts still run against today's code (an analysis added to the suite once broke bench/analysis.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
ENV = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=BENCH.parent, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_imports_and_shows_its_help(script):
    done = _run(f"bench/{script}", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_analysis_benchmark_runs_every_compared_analysis_and_they_agree():
    done = _run("bench/analysis.py", "--rows", "4e4", "--layers", "4", "--loop-tokens", "200", "--reps", "1",
                "--skip-memory", "--shard-tokens", "2000")
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("per analysis:")[1]
    from moescope.analysis.reference import REFERENCES

    for name in REFERENCES:
        line = next(l for l in table.splitlines() if l.startswith(name + " "))
        assert line.rstrip().endswith("yes"), line


def test_scale_benchmark_quick_prints_the_suite_the_floor_and_every_analysis():
    done = _run("bench/scale.py", "--quick", "--shapes", "mixtral")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Mixtral 8x7B: 32 MoE layers x 8 experts, top-2; 600 tokens = 19,200 (token, layer) rows" in out
    assert "  this code " in out and "  DuckDB floor " in out and "previous release" not in out  # --quick skips it
    from moescope.analysis import ANALYSES

    for name in ANALYSES:  # one line per analysis, its rows per CPU-second positive
        line = next(l for l in out.splitlines() if l.startswith(f"  {name} "))
        assert float(line.split()[2].replace(",", "")) > 0, line


def test_capture_scale_benchmark_quick_prints_both_ratios_and_bytes_per_row():
    done = _run("bench/capture_scale.py", "--quick")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "256 experts in 8 groups, top-8" in out and "= 512 (token, MoE layer) rows per run" in out
    assert next(l for l in out.splitlines() if l.startswith("  capture ")).count("(") == 4  # wall, CPU and both ratios
    rate = next(l for l in out.splitlines() if "own work by parts" in l)
    assert float(rate.split("=")[1].split()[0].replace(",", "")) > 0, rate
    size = next(l for l in out.splitlines() if l.startswith("  trace size"))
    assert float(size.split("routing ")[1].split()[0]) > 0, size
