"""What every report section shares: number formatting, the hints for what was not run, facts about the run,
and the guard that turns an unreadable table into a note instead of a failed report."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable


from moescope.reporting.document import KeyValues, Notes, Section
from moescope.reporting.figures._base import OVERALL
from moescope.reporting.results import AnalysisResults


TOKEN_ROWS = 200  # rows of the token routing table shown in the page (the CSV has all)
TOKEN_LAYER_COLUMNS = 12  # layer combination columns shown in the page
# What a results table this version cannot read raises (a renamed column, a damaged file): the section
# or figure then says so instead of the whole report failing. pyarrow's errors are ValueErrors.
UNREADABLE = (ValueError, KeyError, IndexError, TypeError, OSError)
HINT_ROUTER_OUTPUT = "rerun `moescope capture` with `--save-logits` to record router outputs"
HINT_LOOKAHEAD = "rerun `moescope capture` with `--predict-next-layer` (needs the model)"
HINT_MODEL = "rerun `moescope analyze` where the model can be loaded (without `--no-model`, or with `--model PATH`)"
HINT_ONLY = "rerun `moescope analyze` without `--only` (or name it there)"
HINT_OFFLOAD = "run `moescope offload TRACE --capacity C --out DIR` and pass DIR to `moescope report`"
SIMULATIONS = ("placement", "offload")  # a folder of `moescope placement` / `moescope offload` holds only these


# -- formatting ------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3g", missing: str = "—") -> str:
    """A number formatted with `spec`, or `missing` for None / NaN / non-numbers."""
    if value is None or isinstance(value, bool):
        return missing
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return missing
    if spec.endswith("d"):
        return format(int(round(x)), spec)
    return format(x, spec)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _notes_block(results: AnalysisResults, analysis: str) -> list:
    notes = results.notes(analysis)
    return [Notes(tuple(notes))] if notes else []


def _not_run(results: AnalysisResults, analysis: str, hint: str) -> list:
    notes = results.notes(analysis)
    return [Notes((f"{analysis} was not run for this trace.", *notes, hint), kind="missing")]


# -- facts about the run -----------------------------------------------------------------------------
def shape_of(results: AnalysisResults) -> dict:
    """n_experts, top_k and the MoE layer indices, from the load summary and the trace manifest."""
    load = results.headline("load")
    info = results.layers_info
    n_experts = load.get("n_experts") or (info[0].get("n_experts") if info else None)
    top_k = load.get("top_k") or (info[0].get("top_k") if info else None)
    if info:
        layers = sorted(int(l["moe_layer"]) for l in info)
    else:  # no manifest: the load table's layers, else 0..L-1
        try:
            per_layer = results.table("load", "per_layer")
        except UNREADABLE:
            per_layer = None
        if per_layer is not None and "layer" in per_layer and len(per_layer):
            layers = sorted(int(l) for l in per_layer["layer"] if l != OVERALL)
        else:
            layers = list(range(int(results.trace.get("moe_layers") or 0)))
    return {"n_experts": int(n_experts or 0), "top_k": int(top_k or 0), "layers": layers}


def header_facts(results: AnalysisResults) -> KeyValues:
    """Model, corpus, tokens, capture settings and versions, from the trace manifest when it is readable."""
    trace, manifest = results.trace, results.manifest or {}
    model = manifest.get("model") or {}
    shape = shape_of(results)
    rows = [
        ("model", str(model.get("id") or trace.get("model") or "unknown")),
        ("trace", str(trace.get("path") or "unknown") + ("" if trace.get("complete", True) else " (incomplete capture)")),
        ("corpus", corpus_text(trace.get("corpus") or manifest.get("corpus"))),
        ("tokens", fmt(trace.get("tokens"), ",d")),
        ("MoE layers × experts, top-k", f"{len(shape['layers'])} × {shape['n_experts']}, top-{shape['top_k']}"),
    ]
    if model.get("class") or model.get("model_type"):
        rows.append(("architecture", f"{model.get('class') or '?'} ({model.get('model_type') or '?'}), hidden size {model.get('hidden_size') or '?'}"))
    sizes = results.expert_sizes()
    if sizes:
        distinct = sorted({s for layer in sizes.values() for s in layer})
        rows.append(("expert sizes", ", ".join(str(s) for s in distinct[:8]) + (" …" if len(distinct) > 8 else "")))
    capture = manifest.get("capture")
    if capture:
        rows.append(("capture settings", ", ".join(f"{k}={v}" for k, v in capture.items())))
    if manifest:
        rows.append(("router outputs", str(manifest.get("router_output_kind") or "not recorded")))
    versions = manifest.get("versions")
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if results.manifest_note:
        rows.append(("manifest", results.manifest_note))
    return KeyValues(tuple(rows))


def corpus_text(corpus) -> str:
    """The corpus in one line: its spec, split, size and sources (long internals such as split rules left out)."""
    if not corpus:
        return "unknown"
    if not isinstance(corpus, dict):
        return str(corpus)
    parts = [str(corpus["spec"])] if corpus.get("spec") else []
    if corpus.get("split"):
        parts.append(f"{corpus['split']} split")
    if corpus.get("docs") is not None:
        parts.append(f"{fmt(corpus['docs'], ',d')} documents")
    if corpus.get("chars") is not None:
        parts.append(f"{fmt(corpus['chars'], ',d')} characters")
    sources = corpus.get("sources")
    if isinstance(sources, list) and sources:
        parts.append("sources: " + ", ".join(
            f"{s.get('entry') or s.get('source') or '?'} ({s.get('domain') or '?'}, {fmt(s.get('docs'), ',d')} docs)" if isinstance(s, dict) else str(s)
            for s in sources))
    known = {"spec", "split", "docs", "chars", "sources"}
    parts += [f"{k}={v}" for k, v in corpus.items() if k not in known and isinstance(v, (int, float, str)) and len(str(v)) <= 40]
    return "; ".join(parts) or "unknown"


def _guarded(build: Callable[[], Section], sid: str, title: str) -> Section:
    """build(), or a section saying why its results could not be read."""
    try:
        return build()
    except UNREADABLE as err:
        message = f"{title}: the results could not be read ({type(err).__name__}: {err}); rerun the step with this moescope version"
        warnings.warn(message, stacklevel=3)
        return Section(sid, title, (Notes((message,), "missing"),), ran=False)
