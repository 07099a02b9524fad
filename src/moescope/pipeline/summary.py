"""The few lines `analyze` and `demo` print: headline numbers a person reads first."""

from __future__ import annotations

import sys


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def headline_numbers(summary: dict) -> dict[str, object]:
    """A flat, ordered selection of the summary's most telling numbers (missing ones are left out)."""
    analyses = summary.get("analyses", {})
    picks = {}
    for name, values in analyses.items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                picks[f"{name}.{key}"] = value
    return picks


def print_summary(summary: dict, *, limit: int = 24) -> None:
    trace = summary.get("trace", {})
    print(f"{trace.get('model')}: {trace.get('tokens')} tokens x {trace.get('moe_layers')} MoE layers")
    for key, value in list(headline_numbers(summary).items())[:limit]:
        print(f"  {key:<48} {value:.4g}" if isinstance(value, float) else f"  {key:<48} {value}")
    for verdict in _get(summary, "analyses", "cross_layer", "versus_popularity", default=None) or []:
        print(f"  cross_layer: {verdict}")
    for name, notes in summary.get("notes", {}).items():
        for note in notes:
            print(f"  note [{name}]: {note}")


def print_warnings(summary: dict) -> None:
    """Each of the summary's warnings once, on stderr (they are also notes of the analyses that raised them)."""
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
