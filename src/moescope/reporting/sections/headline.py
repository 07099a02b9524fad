"""The headline table: one line of answers per results folder."""

from __future__ import annotations

import math


from moescope.reporting.document import Headline
from moescope.reporting.figures import routing as routing_figs
from moescope.reporting.results import AnalysisResults, MissingResults, QuantResults
from moescope.reporting.sections.common import fmt, shape_of


# -- headline ------------------------------------------------------------------------------------------
def headline(results: list[tuple[str, AnalysisResults | QuantResults | MissingResults]]) -> Headline:
    analyses = [(label, r) for label, r in results if isinstance(r, AnalysisResults)]
    quants = [(label, r) for label, r in results if isinstance(r, QuantResults)]
    quantities = (
        ("tokens × MoE layers × experts", _shape_text),
        ("balance score, worst layer / layer mean (1 = even)", _balance_text),
        ("dead experts", _dead_text),
        ("mean routing entropy", _entropy_text),
        ("best next-layer predictor (recall)", _predictor_text),
        ("code vs math divergence (JS, bits)", _code_math_text),
        ("load-balancing loss, worst layer / layer mean (balanced = k)", _aux_loss_text),
        ("expert FLOPs per token vs dense", lambda r: fmt(r.get("token_cost", "fraction_of_dense"), ".1%") if r.get("token_cost", "fraction_of_dense") is not None
         else "— (uniform experts)"),
    )
    rows = tuple((name, tuple(fn(r) for _, r in analyses)) for name, fn in quantities) if analyses else ()
    verdicts = tuple(v for label, q in quants for v in quant_verdicts(q, label if len(quants) > 1 else ""))
    return Headline(tuple(label for label, _ in analyses), rows, verdicts)


def _shape_text(r: AnalysisResults) -> str:
    shape = shape_of(r)
    return f"{fmt(r.trace.get('tokens'), ',d')} × {len(shape['layers'])} × {shape['n_experts']} (top-{shape['top_k']})"


def _balance_text(r: AnalysisResults) -> str:
    if r.get("load", "balance_score_worst") is None:
        return "— (load not run)"
    return (f"{fmt(r.get('load', 'balance_score_worst'), '.3f')} (layer {fmt(r.get('load', 'balance_score_worst_layer'), 'd')}) / "
            f"{fmt(r.get('load', 'balance_score_layer_mean'), '.3f')}; pooled {fmt(r.get('load', 'balance_score_pooled'), '.3f')}")


def _aux_loss_text(r: AnalysisResults) -> str:
    if r.get("aux_losses", "load_balancing_loss_worst") is None:
        return "— (no router outputs)"
    return (f"{fmt(r.get('aux_losses', 'load_balancing_loss_worst'), '.4g')} (layer "
            f"{fmt(r.get('aux_losses', 'load_balancing_loss_worst_layer'), 'd')}) / "
            f"{fmt(r.get('aux_losses', 'load_balancing_loss_layer_mean'), '.4g')} (k = {fmt(r.get('load', 'top_k'), 'd')}); "
            f"pooled as transformers computes it: {fmt(r.get('aux_losses', 'load_balancing_loss_pooled_transformers'), '.4g')}")


def _dead_text(r: AnalysisResults) -> str:
    if not r.ran("load"):
        return "— (load not run)"
    shape = shape_of(r)
    units = len(shape["layers"]) * shape["n_experts"]
    return f"{fmt(r.get('load', 'n_dead'), 'd')} of {units} ({fmt(r.get('load', 'n_overloaded'), 'd')} overloaded)"


def _entropy_text(r: AnalysisResults) -> str:
    value = r.get("router_confidence", "mean_router_entropy")
    if value is None:
        return "— (no router outputs recorded)"
    n = shape_of(r)["n_experts"]
    return f"{fmt(value, '.3f')} nats (uniform: {math.log(max(n, 1)):.3f})"


def _predictor_text(r: AnalysisResults) -> str:
    best = r.get("cross_layer", "best_predictor_hop1")
    if best is None:
        return "—"
    recall = r.get("cross_layer", f"recall_{best}_hop{0 if best == 'previous_token' else 1}")
    text = f"{routing_figs.PREDICTOR_LABELS.get(best, best)}: {fmt(recall, '.1%')}"
    gain = r.get("cross_layer", "best_minus_popularity_hop1")
    return text + (f" ({fmt(gain, '+.3f')} vs popularity)" if gain is not None else "")


def _code_math_text(r: AnalysisResults) -> str:
    js = r.get("domain_specialisation", "js_divergence", default={}) or {}
    value = js.get("code|math", js.get("math|code"))
    return fmt(value, ".3f") if value is not None else "— (needs code and math tokens)"


def quant_verdicts(q: QuantResults, label: str) -> list[str]:
    answers = q.summary.get("router_vs_experts") or []
    prefix = f"{label}: " if label else ""
    if not answers:
        return [f"{prefix}quantization: no router-vs-experts answer in this sweep"]
    by_verdict: dict[str, list[str]] = {}  # verdicts in the order of their fewest bits
    for a in sorted(answers, key=lambda a: (int(a.get("bits") or 0), str(a.get("scheme")), str(a.get("granularity")))):
        by_verdict.setdefault(str(a.get("router_costs_more_per_param")), []).append(f"{a.get('bits')}-bit {a.get('scheme')} ({a.get('granularity')})")
    parts = [f"{verdict} at {', '.join(where)}" for verdict, where in by_verdict.items()]
    return [f"{prefix}does router-only quantization cost more quality per parameter than expert-only? " + "; ".join(parts)]
