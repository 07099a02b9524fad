"""Importance sweeps by model name (CLI), on top of `moescope.intervention.importance.run_importance`."""

from __future__ import annotations

from moescope.errors import ImportanceError
from moescope.pipeline.output import sweep_folder


def parse_layers(text: str | None) -> list[int] | None:
    """"0,2" -> [0, 2]; None -> None (every layer that can drop experts)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ImportanceError(f"--layers takes MoE-layer indices like 0,2, not {text!r}") from None


def importance_from_name(model: str, data, *, out, layers: str | None = None, device: str = "cpu", **options) -> dict:
    """Load `model` (float32) and run the sweep; returns its summary."""
    from moescope.intervention.importance import run_importance
    from moescope.recording.loading import load_model

    wanted = parse_layers(layers)
    with sweep_folder(out, markers=("sweep.json", "results.jsonl", "summary.json"), what="importance sweep") as folder:
        loaded, tokenizer = load_model(model, device=device, dtype="float32")  # s3://: run in a local copy (pipeline/output.py)
        return run_importance(loaded, tokenizer, data, out=folder, layers=wanted, model_info={"id": model}, **options).summary
