"""Quantization sensitivity: fake-quant formats, a restore-on-exit patcher, and resumable sweeps.

    formats.py    pure `w -> (w_hat, QuantStats)`: RTN sym/asym (tensor/channel/group), NF4, MXFP4, NVFP4
    targets.py    which weights router / experts / shared / attention / all name
    patch.py      `quantized(model, targets, fmt)`: swap in fake-quantized weights, restore them exactly
    routing.py    routing change metrics: flips, Jaccard, KL, entropy
    reference.py  the cached unquantized pass, local (router-only) and end-to-end evaluation
    sweep.py      `run_quant_sweep`: plan, evaluate, resume
    store.py      the out folder (results.jsonl, tables, summary.json)
    summary.py    the router-vs-experts answer per bit width, and the dense control
"""

from moescope.quant.formats import (
    Granularity,
    QuantConfigError,
    QuantFormat,
    QuantStats,
    Scheme,
    make_format,
    quantize,
)
from moescope.quant.patch import PatchReport, quantized
from moescope.quant.sweep import SweepConfig, SweepResult, plan_configs, run_quant_sweep
from moescope.quant.targets import TARGETS, select_weights

__all__ = [
    "Granularity", "PatchReport", "QuantConfigError", "QuantFormat", "QuantStats", "Scheme", "SweepConfig",
    "SweepResult", "TARGETS", "make_format", "plan_configs", "quantize", "quantized", "run_quant_sweep",
    "select_weights",
]
