"""Quantization sweeps by model name (CLI and demo), on top of `moescope.quant.sweep.run_quant_sweep`."""

from __future__ import annotations

from pathlib import Path

from moescope.pipeline.output import sweep_folder
from moescope.recording.loading import default_router, load_model

MARKERS = ("sweep.json", "results.jsonl", "summary.json")  # what a previous sweep left in its folder


def quant_from_names(model: str, data, *, out, dense_model: str | None = None, device: str = "cpu", **options) -> dict:
    """`out`: a folder or an object-store prefix (run in a local copy, published as it goes: pipeline/output.py)."""
    from moescope.quant.sweep import run_quant_sweep

    with sweep_folder(out, markers=MARKERS, what="quantization sweep") as folder:
        loaded, tokenizer = load_model(model, device=device, dtype="float32")
        dense = load_model(dense_model, device=device, dtype="float32")[0] if dense_model else None
        result = run_quant_sweep(loaded, tokenizer, data, out=folder, dense_model=dense, custom_router=default_router(model),
                                 model_info={"id": model, "dense_id": dense_model}, **options)
    return result.summary


def quant_of_model(model, tokenizer, data, *, out, **options) -> dict:
    """The sweep of a loaded model (`options`: those of `run_quant_sweep`) into `out`, a folder or an object-store
    prefix (run in a local copy, published as it goes: pipeline/output.py); returns its summary."""
    from moescope.quant.sweep import run_quant_sweep

    with sweep_folder(out, markers=MARKERS, what="quantization sweep") as folder:
        result = run_quant_sweep(model, tokenizer, data, out=folder, **options)
    return result.summary


def run_demo_quant(out: Path, *, max_tokens: int, progress: bool) -> Path:
    """Router vs experts vs attention at 2/3/4/8 bits on tiny-moe, with tiny-dense as the control."""
    quant_from_names("moescope:tiny-moe", "humaneval,gsm-symbolic,wiki", out=out, dense_model="moescope:tiny-dense",
                     bits="2,3,4,8", targets="router,experts,attention", schemes="rtn-asym", max_tokens=max_tokens,
                     seq_len=128, batch_size=8, progress=progress)
    return out
