"""From results folders to the report's sections: which figures and tables each analysis gets, and what
to say when something was not run or not recorded.

Each `*_section` takes an `AnalysisResults` (or `QuantResults`) and returns a `Section` whose figures are
closures over the tables (made only when rendered). Nothing here draws or writes; figures live in
`figures/`, markup in `html.py`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd

from moescope.reporting.document import FigureBlock, Group, Headline, KeyValues, Notes, Section, TableBlock, Text
from moescope.reporting.figures import domains as domain_figs
from moescope.reporting.figures import load as load_figs
from moescope.reporting.figures import quant as quant_figs
from moescope.reporting.figures import router as router_figs
from moescope.reporting.figures import routing as routing_figs
from moescope.reporting.figures import saturation as saturation_figs
from moescope.reporting.figures import simulate as simulate_figs
from moescope.reporting.figures import tokens as token_figs
from moescope.reporting.figures._base import OVERALL, facet_layers
from moescope.reporting.results import AnalysisResults, MissingResults, QuantResults, SaturationResults

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


# -- one section per analysis -------------------------------------------------------------------------
def load_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    if not r.ran("load"):
        return Section(sid, "Expert load", tuple(_not_run(r, "load", HINT_ONLY)), ran=False)
    per_expert, per_layer = r.table("load", "per_expert"), r.table("load", "per_layer")
    h = r.headline("load")
    blocks: list = [Text(
        f"Share of each layer's routing slots per expert against the balanced share 1/E. Per layer, the balance score "
        f"(1 − coefficient of variation of the layer's expert loads; 1 is perfectly even) is {fmt(h.get('balance_score_worst'))} "
        f"in the worst layer ({fmt(h.get('balance_score_worst_layer'), 'd')}) and {fmt(h.get('balance_score_layer_mean'))} on average "
        f"over layers; the busiest expert takes {fmt(h.get('max_over_mean_worst'))}× its layer's mean load (layer "
        f"{fmt(h.get('max_over_mean_worst_layer'), 'd')}). Pooled over all layer × expert units the balance score is "
        f"{fmt(h.get('balance_score_pooled'))}. {fmt(h.get('n_dead'), 'd')} dead, {fmt(h.get('n_underused'), 'd')} under-used "
        f"and {fmt(h.get('n_overloaded'), 'd')} overloaded (layer, expert) units."
    )]
    if h.get("non_compute_share"):  # LongCat's identity experts, ZAYA's skip: router choices that are not experts
        blocks.append(Text(
            f"{fmt(h['non_compute_share'], '.1%')} of all routing slots went to non-compute choices "
            f"({', '.join(h.get('non_compute_kinds') or ['non-compute'])}): they are no expert's load and are left out of "
            "the shares and statistics here (per layer: column non_compute_share of the per-layer table)."
        ))
    if per_expert is None or not len(per_expert):
        return Section(sid, "Expert load", tuple(blocks + [Notes(("load tables missing from the results folder",), "missing")]))
    facets = _worst_first(per_layer, facet_layers(shape["layers"], 4))
    blocks.append(FigureBlock("load_bars", partial(load_figs.load_bars, per_expert, facets),
                              "Expert load per layer (bars: share of slots; dashed: expected 1/E; colour: status)."
                              + ("" if len(facets) == len(shape["layers"]) else f" Layers shown: {', '.join(map(str, facets))} of {len(shape['layers'])} (see the heatmap for all).")))
    blocks.append(FigureBlock("load_heatmap", partial(load_figs.load_heatmap, per_expert),
                              "Load / expected load for every layer and expert, log colour scale (red: overloaded, blue: under-used, black: dead)."))
    blocks.append(FigureBlock("load_histogram", partial(load_figs.load_histogram, per_expert), "How many experts carry each multiple of the expected load."))
    if per_layer is not None and len(shape["layers"]) > 1:
        blocks.append(FigureBlock("load_balance_per_layer", partial(load_figs.layer_balance, per_layer), "Balance statistics per layer; dashed: all layers pooled."))
    flagged = per_expert[per_expert["status"].astype(str) != "ok"]
    if len(flagged):
        top = flagged.sort_values(["load_over_expected", "layer", "expert"], ascending=[False, True, True], kind="stable")
        shown = pd.concat([top.head(10), top.tail(10)]).drop_duplicates(["layer", "expert"])
        blocks.append(TableBlock(shown[["layer", "expert", "count", "share", "load_over_expected", "status"]].reset_index(drop=True),
                                 f"Experts outside the thresholds: the {min(len(top), 10)} most and least loaded of {len(flagged)}.",
                                 formats={"count": ",d", "share": ".2%", "load_over_expected": ".2f"}, total_rows=len(flagged)))
    return Section(sid, "Expert load", tuple(blocks + _notes_block(r, "load")))


def _worst_first(per_layer: pd.DataFrame | None, facets: list[int]) -> list[int]:
    """Facet layers, with the most imbalanced layer swapped in when it is not among them."""
    if per_layer is None or not len(per_layer) or not facets:
        return facets
    rows = per_layer[per_layer["layer"] != OVERALL]
    if not rows["max_over_mean"].notna().any():
        return facets
    worst = int(rows.loc[rows["max_over_mean"].idxmax(), "layer"])
    if worst in facets:
        return facets
    return sorted([*facets[:-2], worst, facets[-1]]) if len(facets) >= 3 else sorted({*facets, worst})


def aux_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Auxiliary losses"
    if not r.ran("aux_losses"):
        return Section(sid, title, tuple(_not_run(r, "aux_losses", HINT_ROUTER_OUTPUT)), ran=False)
    per_layer = r.table("aux_losses", "per_layer")
    h = r.headline("aux_losses")
    if per_layer is None or not per_layer[["load_balancing_loss", "z_loss"]].notna().any().any():
        return Section(sid, title, (Notes((*r.notes("aux_losses"), HINT_ROUTER_OUTPUT), "missing"),), ran=False)
    blocks: list = [Text(
        f"Switch-Transformer load-balancing loss E·Σ f_i·P_i per layer (perfectly balanced = k = "
        f"{fmt(h.get('load_balancing_loss_balanced'), 'g')}): {fmt(h.get('load_balancing_loss_worst'), '.4g')} in the worst layer "
        f"({fmt(h.get('load_balancing_loss_worst_layer'), 'd')}), {fmt(h.get('load_balancing_loss_layer_mean'), '.4g')} on average "
        f"over layers. Pooled over all layers, as transformers' load_balancing_loss_func computes it from every layer's "
        f"logits at once: {fmt(h.get('load_balancing_loss_pooled_transformers'), '.4g')} (pooling averages away layers that "
        f"prefer different experts). Router z-loss {fmt(h.get('z_loss'), '.4g')}."
    )]
    blocks.append(FigureBlock("aux_losses_per_layer", partial(load_figs.aux_losses_per_layer, per_layer, shape["top_k"]), "Auxiliary losses per layer."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "aux_losses")))


def router_structure_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Router weight structure"
    if not r.ran("router_structure"):
        return Section(sid, title, (Notes(("Router weights were not analysed.", *r.notes("router_structure"), HINT_MODEL), "missing"),), ran=False)
    per_expert, pairs = r.table("router_structure", "per_expert"), r.table("router_structure", "pairs")
    h = r.headline("router_structure")
    blocks: list = [Text(
        f"Each expert's row of the router matrix: its L2 norm and spread, and how similar experts' rows are "
        f"(cosine). Mean off-diagonal cosine {fmt(h.get('mean_offdiagonal_cosine'))}, largest {fmt(h.get('max_offdiagonal_cosine'))}; "
        f"norm CV {fmt(h.get('norm_cv'))}."
    )]
    facets = facet_layers(shape["layers"], 3)
    if per_expert is not None and len(per_expert):
        blocks.append(FigureBlock("router_weight_norms", partial(router_figs.router_weight_stats, per_expert, facets),
                                  "Router weight L2 norm and standard deviation per expert (dashed: the layer's mean)."))
        if len(shape["layers"]) > len(facets):
            blocks.append(FigureBlock("router_weight_heatmaps", partial(router_figs.router_weight_heatmaps, per_expert),
                                      "Router weight norm and standard deviation, every layer and expert."))
    if pairs is not None and len(pairs):
        blocks.append(FigureBlock("router_cosine", partial(router_figs.cosine_matrices, pairs, facets, shape["n_experts"]),
                                  "Cosine similarity between experts' router vectors (red: alike, blue: opposed)."))
        if len(shape["layers"]) > 1:
            blocks.append(FigureBlock("router_cosine_per_layer", partial(router_figs.cosine_by_layer, pairs), "Router cosine similarity per layer."))
        top = pairs.sort_values(["cosine", "layer", "expert_a", "expert_b"], ascending=[False, True, True, True], kind="stable").head(10)
        blocks.append(TableBlock(top[["layer", "expert_a", "expert_b", "cosine"]].reset_index(drop=True),
                                 "Most similar expert pairs (router vectors).", formats={"cosine": ".3f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "router_structure")))


def confidence_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Router confidence"
    if not r.ran("router_confidence"):
        return Section(sid, title, tuple(_not_run(r, "router_confidence", HINT_ONLY)), ran=False)
    hist, per_layer, what_if = (r.table("router_confidence", t) for t in ("histograms", "per_layer", "what_if"))
    h = r.headline("router_confidence")
    entropy = h.get("mean_router_entropy")
    blocks: list = [Text(
        f"How decisively the router picks its experts. Mean first-expert weight {fmt(h.get('mean_top1_weight'))}, "
        f"second {fmt(h.get('mean_top2_weight'))}; mean routing entropy "
        + (f"{fmt(entropy)} nats (uniform over {shape['n_experts']} experts: {math.log(max(shape['n_experts'], 1)):.3g})" if entropy is not None else "not available (no router outputs)")
        + (f"; the captured top-k equals the top-k of the router output for {fmt(h.get('topk_matches_router'), '.1%')} of tokens." if h.get("topk_matches_router") is not None else ".")
    )]
    if hist is not None and router_figs.has_quantity(hist, "top1_weight"):
        blocks.append(FigureBlock("gate_weights", partial(router_figs.gate_weight_distributions, hist),
                                  "Gate weights of the first and second expert and their ratio, all layers pooled."))
    if hist is not None and router_figs.has_quantity(hist, "router_entropy"):
        blocks.append(FigureBlock("router_entropy", partial(router_figs.router_distribution, hist, shape["n_experts"], shape["top_k"]),
                                  "Entropy of the full router distribution, and the margin that decided the last expert."))
    else:
        blocks.append(Notes((f"Routing entropy over all experts, margins and what-if top-k need router outputs: {HINT_ROUTER_OUTPUT}.",), "missing"))
    if per_layer is not None and len(per_layer):
        blocks.append(FigureBlock("entropy_per_layer", partial(router_figs.entropy_per_layer, per_layer, shape["n_experts"], shape["top_k"]),
                                  "Mean routing entropy and gate weights per layer."))
    if what_if is not None and len(what_if):
        blocks.append(FigureBlock("what_if_top_k", partial(router_figs.what_if_top_k, what_if, shape["n_experts"], shape["top_k"]),
                                  "What top-m routing of the same router outputs would do (orange: the model's k)."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "router_confidence")))


def coactivation_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Co-activation"
    if not r.ran("coactivation"):
        return Section(sid, title, tuple(_not_run(r, "coactivation", HINT_ONLY)), ran=False)
    facets = [OVERALL, *facet_layers(shape["layers"], 3)] if len(shape["layers"]) > 1 else facet_layers(shape["layers"], 1)
    pairs = r.table("coactivation", "pairs", where={"layer": tuple(facets)})
    h = r.headline("coactivation")
    if pairs is None or not len(pairs):
        return Section(sid, title, (Notes((*r.notes("coactivation"), "no expert pairs (top-1 routing)"), "missing"),), ran=False)
    blocks: list = [Text(
        f"How often two experts are chosen for the same token, relative to independent choice (lift; ×1 = independent). "
        f"Largest lift {fmt(h.get('max_lift'))}, mean {fmt(h.get('mean_lift'))}."
    )]
    blocks.append(FigureBlock("coactivation", partial(routing_figs.coactivation_heatmaps, pairs, facets, shape["n_experts"]),
                              "Co-activation lift of each expert pair (all layers pooled, then single layers; grey: never chosen together)."))
    frequent = h.get("most_frequent_pairs") or []
    if frequent:
        blocks.append(TableBlock(pd.DataFrame(frequent), "Most frequent expert pairs (share of tokens choosing both).",
                                 formats={"rate": ".2%", "lift": ".2f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "coactivation")))


def cross_layer_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Cross-layer predictability"
    if not r.ran("cross_layer"):
        return Section(sid, title, tuple(_not_run(r, "cross_layer", HINT_ONLY)), ran=False)
    sources = facet_layers(shape["layers"][:-1], 4)
    transitions = r.table("cross_layer", "transitions", where={"hop": (1,), "source_layer": tuple(sources)})
    recall, overall = r.table("cross_layer", "recall"), r.table("cross_layer", "recall_overall")
    h = r.headline("cross_layer")
    best = h.get("best_predictor_hop1")
    best_recall = h.get(f"recall_{best}_hop{0 if best == 'previous_token' else 1}") if best else None
    versus = [str(v) for v in h.get("versus_popularity") or []]
    blocks: list = [Text(
        "How well one layer's routing predicts the next layers' (for speculative expert prefetching). "
        + (f"Best predictor for the next layer: {routing_figs.PREDICTOR_LABELS.get(best, best)} with recall {fmt(best_recall, '.1%')} "
           f"(chance {fmt(shape['top_k'] / max(shape['n_experts'], 1), '.1%')}). " if best else "")
        + ("Against the static baseline (the k most-loaded experts of the predicted layer, learned on the other fold of "
           "documents): " + "; ".join(versus) + "." if versus else "")
    )]
    if len(shape["layers"]) < 2:
        blocks.append(Notes(("one MoE layer: no cross-layer transitions",), "missing"))
    if transitions is not None and len(transitions):
        blocks.append(FigureBlock("transitions", partial(routing_figs.transition_heatmaps, transitions, sources, shape["n_experts"]),
                                  "P(expert at layer N+1 | expert at layer N): a bright diagonal means experts keep their index."))
    if overall is not None and len(overall):
        blocks.append(FigureBlock("recall_vs_hop", partial(routing_figs.recall_vs_hop, overall, shape["top_k"], shape["n_experts"]),
                                  "Recall@k of each predictor against the hop distance, all layers pooled."))
    if recall is not None and len(recall) and len(shape["layers"]) > 2:
        blocks.append(FigureBlock("recall_per_layer", partial(routing_figs.recall_per_layer, recall, shape["top_k"]),
                                  "Recall per predicted layer."))
    if overall is not None and not (overall["predictor"] == "router_lookahead").any():
        blocks.append(Notes((f"The router-lookahead predictor needs the next layer's router run during capture: {HINT_LOOKAHEAD}.",), "missing"))
    return Section(sid, title, tuple(blocks + _notes_block(r, "cross_layer")))


def cache_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Expert cache"
    if not r.ran("expert_cache"):
        return Section(sid, title, tuple(_not_run(r, "expert_cache", HINT_ONLY)), ran=False)
    cache = r.table("expert_cache")
    h = r.headline("expert_cache")
    rates = [(k, v) for k, v in h.items() if k.startswith("hit_rate_") and v is not None]
    blocks: list = [Text(
        "Hit rate of a cache holding C experts per layer, filled by LRU alone or by each predictor. "
        + "; ".join(f"{k.removeprefix('hit_rate_').replace('_C', ' at C=')}: {fmt(v, '.1%')}" for k, v in rates[:6])
    )]
    if cache is not None and len(cache):
        blocks.append(FigureBlock("cache_hit_rate", partial(routing_figs.cache_hit_rate, cache, shape["n_experts"], shape["top_k"]),
                                  "Expert cache hit rate against cache size, all layers pooled (bands: range over layers)."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "expert_cache")))


def locality_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Temporal locality"
    if not r.ran("temporal_locality"):
        return Section(sid, title, tuple(_not_run(r, "temporal_locality", HINT_ONLY)), ran=False)
    frame = r.table("temporal_locality")
    h = r.headline("temporal_locality")
    blocks: list = [Text(
        f"Do consecutive tokens of a sequence reuse experts? Same first-choice expert {fmt(h.get('same_first'), '.1%')} "
        f"(×{fmt(h.get('same_first_over_chance'), '.2f')} chance), top-k overlap {fmt(h.get('overlap'), '.1%')} "
        f"(×{fmt(h.get('overlap_over_chance'), '.2f')} chance), over {fmt(h.get('pairs'), ',d')} token pairs."
    )]
    if frame is not None and len(frame) and frame["same_first"].notna().any():
        blocks.append(FigureBlock("temporal_locality", partial(routing_figs.temporal_locality, frame),
                                  "Expert reuse between consecutive tokens per layer, against independent tokens with the same loads."))
    return Section(sid, title, tuple(blocks + _notes_block(r, "temporal_locality")))


def domain_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Domain specialisation"
    if not r.ran("domain_specialisation"):
        return Section(sid, title, tuple(_not_run(r, "domain_specialisation", HINT_ONLY)), ran=False)
    dist, div, pair, specific = (r.table("domain_specialisation", t) for t in ("distributions", "divergence", "pair_comparison", "most_specific"))
    h = r.headline("domain_specialisation")
    domains = h.get("domains") or []
    tokens = h.get("tokens_per_domain") or {}
    js = h.get("js_divergence") or {}
    blocks: list = [Text(
        "Do different kinds of text use different experts? Domains: "
        + (", ".join(f"{d} ({fmt(tokens.get(d), ',d')} tokens)" for d in domains) or "none recorded") + ". "
        + ("Mean Jensen-Shannon divergence: " + ", ".join(f"{k.replace('|', ' vs ')} {fmt(v, '.3f')} bits" for k, v in js.items()) + "." if js else "")
    )]
    present = [d for d in domains if tokens.get(d)]
    if len(present) < 2:
        blocks.append(Notes(("Fewer than two domains in the trace: capture a corpus that mixes domains "
                             "(e.g. --data humaneval,gsm-symbolic,wiki) to compare them.",), "missing"))
    if dist is not None and len(dist) and len(present) >= 2:
        facets = facet_layers(shape["layers"], 3)
        blocks.append(FigureBlock("domain_load", partial(domain_figs.domain_load, dist, facets, shape["n_experts"]),
                                  "Each domain's expert load (share of the domain's slots per expert)."))
    if div is not None and len(div):
        blocks.append(FigureBlock("domain_divergence", partial(domain_figs.domain_divergence, div), "Divergence between domains per layer."))
    if pair is not None and len(pair):
        a, b = [c.removeprefix("share_") for c in pair.columns if c.startswith("share_")][:2]
        blocks.append(FigureBlock("domain_pair_difference", partial(domain_figs.domain_pair_difference, pair, a, b),
                                  f"{a} minus {b}: share of each domain's slots per expert, every layer."))
    if specific is not None and len(specific) and len(present) >= 2:
        blocks.append(TableBlock(specific.head(15).reset_index(drop=True), "Most domain-specific experts (lift = P(domain | expert) / P(domain)).",
                                 formats={"count": ",d", "p_expert_given_domain": ".2%", "p_domain_given_expert": ".2%", "lift": ".2f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "domain_specialisation")))


def token_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Token routing"
    if not r.ran("token_specialisation"):
        return Section(sid, title, tuple(_not_run(r, "token_specialisation", HINT_ONLY)), ran=False)
    tokens = r.table("token_specialisation", "tokens")
    h = r.headline("token_specialisation")
    blocks: list = [Text(
        f"{fmt(h.get('distinct_tokens'), ',d')} distinct tokens. Weighted by occurrences, a token's busiest expert takes "
        f"{fmt(h.get('top1_share'), '.1%')} of its slots (a token routed like the whole layer: {fmt(h.get('baseline_top1_share'), '.1%')}); "
        f"its most common expert combination covers {fmt(h.get('mode_combination_share'), '.1%')} of its occurrences."
    )]
    if tokens is None or not len(tokens):
        return Section(sid, title, tuple(blocks + [Notes(("token table missing from the results folder",), "missing")]))
    min_count = _min_count(tokens, h)
    blocks.append(FigureBlock("token_specialisation", partial(token_figs.token_specialisation, tokens, top_k=shape["top_k"], baseline_top1=h.get("baseline_top1_share"),
                                                            baseline_entropy=h.get("baseline_entropy_norm"), min_count=min_count),
                              "Vocabulary specialisation: how concentrated each token's routing is (dashed: a token routed like the layer)."))
    if not tokens["token"].fillna("").astype(str).str.len().any():
        blocks.append(Notes((f"Token text is unavailable (no tokenizer when analysing): {HINT_MODEL}.",), "missing"))
    blocks.append(token_table(tokens, shape))
    return Section(sid, title, tuple(blocks + _notes_block(r, "token_specialisation")))


def _min_count(tokens: pd.DataFrame, h: dict) -> int:
    """The occurrence threshold the summary used (tokens_counted of them), else 5."""
    counted = h.get("tokens_counted")
    if counted:
        occ = np.sort(tokens["occurrences"].to_numpy())[::-1]
        if 0 < counted <= occ.size:
            return int(occ[counted - 1])
    return 5


def visible_token(text) -> str:
    """Token text with whitespace and control characters made visible (escaping happens in html.py)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = str(text).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in text)


def token_table(tokens: pd.DataFrame, shape: dict) -> TableBlock:
    """The token routing table: most frequent tokens first, their routing and cost, per-layer combinations."""
    top = tokens.sort_values(["occurrences", "token_id"], ascending=[False, True], kind="stable").head(TOKEN_ROWS)
    layer_cols = [c for c in tokens.columns if re.fullmatch(r"layer_-?\d+", c)]
    if len(layer_cols) > TOKEN_LAYER_COLUMNS:
        keep = {f"layer_{l}" for l in facet_layers([int(c.split("_")[1]) for c in layer_cols], TOKEN_LAYER_COLUMNS)}
        layer_cols = [c for c in layer_cols if c in keep]
    base = [c for c in ("token_id", "token", "occurrences", "top1_share", "entropy_norm", "avg_expert_size", "flops_per_token",
                        "mean_output_entropy") if c in tokens.columns and (c != "mean_output_entropy" or tokens[c].notna().any())]
    frame = top[base + layer_cols].reset_index(drop=True)
    frame["token"] = frame["token"].map(visible_token)
    shown = f"; layer columns {', '.join(c.split('_')[1] for c in layer_cols)} of {len(shape['layers'])}" if len(layer_cols) < len(shape["layers"]) else ""
    return TableBlock(
        frame,
        f"Token routing table: the {len(frame)} most frequent of {len(tokens):,} tokens (all in token_specialisation__tokens.csv){shown}. "
        "Layer columns: the most common expert combination" + (" with expert sizes" if "avg_expert_size" in frame else "") + ". Click a header to sort; type to filter.",
        interactive=True,
        formats={"occurrences": ",d", "top1_share": ".3f", "entropy_norm": ".3f", "avg_expert_size": ".1f", "flops_per_token": ".4g",
                 "mean_output_entropy": ".3f"},
        mono=("token", *layer_cols),
        total_rows=len(tokens),
    )


def size_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Variable-size experts"
    tokens = r.table("token_specialisation", "tokens")
    cost_ran = r.get("token_cost", "mean_selected_size") is not None
    has_sizes = tokens is not None and "avg_expert_size" in tokens.columns
    if not cost_ran and not has_sizes:
        notes = r.notes("token_cost") or ["token_cost was not run"]
        return Section(sid, title, (Notes((*notes, "Expert sizes are recorded by capture for models whose experts differ in size "
                                                   "(e.g. moescope:tiny-varmoe); uniform-expert models have no cost spread."), "missing"),), ran=False)
    h = r.headline("token_cost")
    blocks: list = [Text(
        f"Experts of different sizes make tokens cost different amounts. Mean expert FLOPs per token {fmt(h.get('mean_flops_per_token'), ',.4g')} "
        f"({fmt(h.get('fraction_of_dense'), '.1%')} of a dense model with the same k and parameters); "
        f"{fmt(h.get('large_share'), '.1%')} of slots go to large experts; {fmt(h.get('mostly_large_share'), '.1%')} of (token, layer) "
        f"pairs are mostly on large experts."
    )]
    sizes = r.expert_sizes() or sizes_from_combinations(tokens)
    if has_sizes and sizes:
        all_sizes = sorted({s for layer in sizes.values() for s in layer})
        small, large = float(all_sizes[0]), float(all_sizes[-1])
        blocks.append(FigureBlock("expert_size_histograms", partial(token_figs.expert_size_histograms, tokens["avg_expert_size"].to_numpy(float),
                                                                    tokens["occurrences"].to_numpy(float), small=small, large=large,
                                                                    threshold=(small + large) / 2),
                                  "Average selected expert size per token over all layers: per unique token, per occurrence, and the share mostly on large experts."))
    facets = facet_layers(shape["layers"], 4)
    token_layer = None
    if r.expert_sizes():
        token_experts = r.table("token_specialisation", "token_experts", where={"layer": tuple(facets)})
        token_layer = token_layer_sizes(token_experts, r.expert_sizes(), shape["top_k"])
    if token_layer is not None:
        blocks.append(FigureBlock("expert_size_by_layer", partial(token_figs.expert_size_by_layer, token_layer, facets, r.expert_sizes()),
                                  "Average selected expert size per token, layer by layer (weighted by occurrences)."))
    elif has_sizes:
        blocks.append(Notes(("Per-layer size histograms need the expert sizes from the trace manifest, which is not readable here.",), "missing"))
    dist, per_layer = r.table("token_cost", "distribution"), r.table("token_cost", "per_layer")
    if dist is not None and len(dist) and per_layer is not None and len(per_layer):
        blocks.append(FigureBlock("token_cost", partial(token_figs.token_cost, dist, per_layer, h),
                                  "Expert compute per token, large-expert share per layer" + (", and output entropy by cost." if dist["mean_output_entropy"].notna().any() else ".")))
    return Section(sid, title, tuple(blocks + _notes_block(r, "token_cost")))


def placement_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Expert placement"
    if not r.ran("placement"):
        return Section(sid, title, tuple(_not_run(r, "placement", HINT_ONLY)), ran=False)
    h = r.headline("placement")
    per_layer, gpu_load, stale = (r.table("placement", t) for t in ("per_layer", "gpu_load", "staleness"))
    policy = "hierarchical" if h.get("eplb_policy") == "hierarchical" else "global"
    blocks: list = [Text(
        f"The trace's load placed on {fmt(h.get('gpus'), 'd')} GPUs ({fmt(h.get('nodes'), 'd')} node(s), "
        f"{fmt(h.get('redundant'), 'd')} redundant slots per layer; DeepSeek EPLB's {policy} policy with "
        f"{fmt(h.get('groups'), 'd')} expert groups). Balancedness (mean / max GPU load, all layers): before, static sharding "
        f"{fmt(h.get('balancedness_static'), '.3f')}; after, greedy {fmt(h.get('balancedness_greedy'), '.3f')} and EPLB "
        f"{fmt(h.get('balancedness_eplb'), '.3f')} (imbalance max / mean − 1: {fmt(h.get('imbalance_static'), '.3f')} → "
        f"{fmt(h.get('imbalance_greedy'), '.3f')}, {fmt(h.get('imbalance_eplb'), '.3f')})."
    )]
    if per_layer is not None and len(per_layer):
        blocks.append(FigureBlock("placement_balancedness", partial(simulate_figs.placement_balancedness, per_layer),
                                  "Balancedness per layer of each placement (dashed: static sharding, before rebalancing)."))
    if gpu_load is not None and len(gpu_load):
        blocks.append(FigureBlock("placement_gpu_load", partial(simulate_figs.gpu_load_heatmaps, gpu_load),
                                  "Tokens each GPU serves per layer, relative to the layer's mean (red: busier; a replicated "
                                  "expert's tokens are split evenly over its replicas)."))
    if stale is not None and len(stale):
        blocks.append(FigureBlock("placement_staleness", partial(simulate_figs.staleness, stale),
                                  "Balancedness when each window is served by the placement of the window before it."))
    if per_layer is not None and len(per_layer):
        pooled = per_layer[per_layer["layer"] == OVERALL]
        columns = ["policy", "balancedness", "imbalance", "mean_gpus_per_token", "mean_nodes_per_token"]
        blocks.append(TableBlock(pooled[columns].reset_index(drop=True), "All layers: balance and all-to-all fan-out "
                                 "(distinct GPUs and nodes a token's experts are on; from `moescope placement`).",
                                 formats={"balancedness": ".3f", "imbalance": ".3f", "mean_gpus_per_token": ".2f",
                                          "mean_nodes_per_token": ".2f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "placement")))


def offload_section(r: AnalysisResults, sid: str, shape: dict) -> Section:
    title = "Expert offloading"
    if not r.ran("offload"):
        return Section(sid, title, (Notes(("Expert offloading was not simulated for this trace.", HINT_OFFLOAD), "missing"),), ran=False)
    h = r.headline("offload")
    hit_rate, sweep, cost = (r.table("offload", t) for t in ("hit_rate", "bandwidth_sweep", "cost"))
    capacity, phases = h.get("capacity"), h.get("phases") or ["prefill"]
    rates = [(k.removeprefix("hit_rate_"), v) for k, v in h.items() if k.startswith("hit_rate_") and v is not None]
    bounds = [(k.removeprefix("decode_tokens_per_s_bound_"), v) for k, v in h.items() if k.startswith("decode_tokens_per_s_bound_")]
    blocks: list = [Text(
        f"A cache of expert slots ({h.get('scope')} scope) replayed on the trace, cold at each sequence start; experts of "
        f"{fmt(h.get('expert_bytes'), ',.0f')} bytes over {h.get('link')}. Hit rate at {fmt(capacity, 'd')} slots: "
        + "; ".join(f"{name.replace('_', ' ')} {fmt(v, '.1%')}" for name, v in rates[:8])
        + ("." if not bounds else ". Decode tokens/s the link allows: " + "; ".join(f"{n.replace('_', ' ')} {fmt(v, ',.0f')}" for n, v in bounds[:4]) + ".")
    )]
    if hit_rate is not None and len(hit_rate):
        for phase in phases:
            blocks.append(FigureBlock(f"offload_hit_rate_{slug(phase)}", partial(simulate_figs.hit_rate_vs_capacity, hit_rate, phase),
                                      f"Hit rate against cache size, {phase} tokens, all layers (dashed: Belady, the offline optimum)."))
    if sweep is not None and len(sweep) and capacity is not None:
        phase = "decode" if "decode" in phases else phases[0]
        latency = float(sweep["latency_us"].iloc[0])
        blocks.append(FigureBlock("offload_stall_bandwidth", partial(simulate_figs.stall_vs_bandwidth, sweep, int(capacity), phase, latency),
                                  f"Stall per {phase} token against link bandwidth at {capacity} slots."))
    if cost is not None and len(cost):
        chosen = cost[(cost["link"] == h.get("link")) & (cost["capacity"] == capacity)]
        columns = ["policy", "prefetch", "phase", "stall_s_per_token", "link_s_per_token", "tokens_per_s_bound", "bytes_per_token"]
        blocks.append(TableBlock(chosen[columns].reset_index(drop=True), f"Cost per token on {h.get('link')} at {capacity} slots "
                                 "(stall: experts fetched on demand; link: all moved, prefetches included; the bound excludes compute).",
                                 formats={"stall_s_per_token": ".3g", "link_s_per_token": ".3g", "tokens_per_s_bound": ",.0f",
                                          "bytes_per_token": ",.0f"}))
    return Section(sid, title, tuple(blocks + _notes_block(r, "offload")))


def sizes_from_combinations(tokens: pd.DataFrame | None) -> dict[int, list[int]] | None:
    """{layer: sizes seen} parsed from the routing table's '(3(2432),7(128))' cells (when the manifest is gone)."""
    if tokens is None:
        return None
    sizes: dict[int, set] = {}
    for column in (c for c in tokens.columns if re.fullmatch(r"layer_-?\d+", c)):
        found = tokens[column].astype(str).str.extractall(r"\d+\((\d+)\)")
        if len(found):
            sizes[int(column.split("_")[1])] = set(found[0].astype(int))
    return {l: sorted(s) for l, s in sizes.items()} or None


def token_layer_sizes(token_experts: pd.DataFrame | None, sizes: dict[int, list[int]] | None, top_k: int) -> pd.DataFrame | None:
    """Per (token, layer): mean size of the experts it was sent to, and its occurrences (slots / k)."""
    if token_experts is None or not len(token_experts) or not sizes or top_k < 1:
        return None
    lookup = pd.DataFrame([(l, e, s) for l, layer in sizes.items() for e, s in enumerate(layer)], columns=["layer", "expert", "size"])
    joined = token_experts.merge(lookup, on=["layer", "expert"], how="inner")
    joined["weighted"] = joined["count"] * joined["size"]
    grouped = joined.groupby(["token_id", "layer"], sort=True)[["weighted", "count"]].sum().reset_index()
    return pd.DataFrame({"token_id": grouped["token_id"], "layer": grouped["layer"], "avg_size": grouped["weighted"] / grouped["count"],
                         "occurrences": grouped["count"] / top_k})


SECTION_BUILDERS: tuple[tuple[str, str, Callable], ...] = (
    ("load", "Expert load", load_section),
    ("aux", "Auxiliary losses", aux_section),
    ("router-structure", "Router weight structure", router_structure_section),
    ("confidence", "Router confidence", confidence_section),
    ("coactivation", "Co-activation", coactivation_section),
    ("cross-layer", "Cross-layer predictability", cross_layer_section),
    ("cache", "Expert cache", cache_section),
    ("locality", "Temporal locality", locality_section),
    ("domains", "Domain specialisation", domain_section),
    ("tokens", "Token routing", token_section),
    ("sizes", "Variable-size experts", size_section),
    ("placement", "Expert placement", placement_section),
    ("offload", "Expert offloading", offload_section),
)


def _guarded(build: Callable[[], Section], sid: str, title: str) -> Section:
    """build(), or a section saying why its results could not be read."""
    try:
        return build()
    except UNREADABLE as err:
        message = f"{title}: the results could not be read ({type(err).__name__}: {err}); rerun the step with this moescope version"
        warnings.warn(message, stacklevel=3)
        return Section(sid, title, (Notes((message,), "missing"),), ran=False)


def analysis_group(r: AnalysisResults, gid: str, label: str) -> Group:
    shape = shape_of(r)
    ran = set((r.summary.get("analyses") or {}))
    simulation_only = bool(ran) and ran <= set(SIMULATIONS)  # a `moescope placement` / `offload` folder: its sections only
    builders = [(key, title, builder) for key, title, builder in SECTION_BUILDERS
                if not simulation_only or key in SIMULATIONS and key in ran]
    sections = tuple(_guarded(partial(builder, r, f"{gid}-{key}", shape), f"{gid}-{key}", title) for key, title, builder in builders)
    model = str(r.trace.get("model") or "unknown model")
    return Group(gid, label, f"{model} · {fmt(r.trace.get('tokens'), ',d')} tokens", header_facts(r), sections)


# -- quantization ------------------------------------------------------------------------------------
def quant_group(q: QuantResults, gid: str, label: str) -> Group:
    s, configs = q.summary, q.configs
    models = q.sweep.get("models") or {}
    options = q.sweep.get("options") or {}
    header = [("sweep", str(q.path))]
    for kind, name in models.items():
        ref = (s.get("reference") or {}).get(kind) or {}
        header.append((f"{kind} model", f"{name}: reference NLL {fmt(ref.get('nll'), '.4f')} (ppl {fmt(ref.get('ppl'), '.4g')}) "
                                          f"over {fmt(ref.get('tokens_predicted'), ',d')} tokens, {fmt(ref.get('n_params'), ',d')} parameters"))
    if options:
        header.append(("options", ", ".join(f"{k}={v}" for k, v in options.items())))
    header.append(("configurations", fmt(s.get("configs") if s.get("configs") is not None else (len(configs) if configs is not None else None), ",d")))
    sections = [_guarded(partial(quant_answer_section, q, f"{gid}-answer"), f"{gid}-answer", "Does router quantization cost more?")]
    if configs is None or not len(configs):
        sections.append(Section(f"{gid}-figures", "Quantization figures", (Notes(("configs table missing: the sweep has not finished a configuration yet",), "missing"),), ran=False))
    else:
        sections.append(_guarded(partial(quant_quality_section, q, f"{gid}-quality"), f"{gid}-quality", "Quality against bits"))
        sections.append(_guarded(partial(quant_routing_section, q, f"{gid}-routing"), f"{gid}-routing", "Routing flips"))
    return Group(gid, label, "quantization sensitivity: routers, experts and attention", KeyValues(tuple(header)), tuple(sections))


def quant_answer_section(q: QuantResults, sid: str) -> Section:
    s = q.summary
    answers = s.get("router_vs_experts") or []
    blocks: list = [Text(f"Hypothesis: {s.get('hypothesis') or 'router-only quantization costs more quality per quantized parameter than expert-only quantization'}.")]
    if answers:
        rows = [{
            "bits": a.get("bits"), "scheme": a.get("scheme"), "granularity": a.get("granularity"),
            "router ΔNLL": (a.get("router") or {}).get("delta_nll"), "router ΔNLL / M params": (a.get("router") or {}).get("delta_nll_per_mparam"),
            "experts ΔNLL": (a.get("experts") or {}).get("delta_nll"), "experts ΔNLL / M params": (a.get("experts") or {}).get("delta_nll_per_mparam"),
            "ratio": a.get("ratio_per_param"), "verdict": a.get("router_costs_more_per_param"),
        } for a in answers]
        blocks.append(TableBlock(pd.DataFrame(rows), "Router-only against expert-only quantization, per bit width (verdict from ±2 SE intervals).",
                                 formats={"router ΔNLL": "+.5f", "experts ΔNLL": "+.5f", "router ΔNLL / M params": "+.4g",
                                          "experts ΔNLL / M params": "+.4g", "ratio": ".3g"}))
    else:
        blocks.append(Notes(("No router-vs-experts answer: the sweep needs both the router and the experts targets, evaluated end to end.",), "missing"))
    dense = s.get("dense_control") or []
    if dense:
        rows = [{"bits": d.get("bits"), "scheme": d.get("scheme"), "target": d.get("target"),
                 "MoE ΔNLL": (d.get("moe") or {}).get("delta_nll"), "dense ΔNLL": (d.get("dense") or {}).get("delta_nll"),
                 "MoE weight error": (d.get("moe") or {}).get("rel_error"), "dense weight error": (d.get("dense") or {}).get("rel_error")} for d in dense]
        blocks.append(TableBlock(pd.DataFrame(rows), "Dense control: the same quantization of the dense twin.",
                                 formats={"MoE ΔNLL": "+.5f", "dense ΔNLL": "+.5f", "MoE weight error": ".3f", "dense weight error": ".3f"}))
    else:
        blocks.append(Notes(("No dense control in this sweep (pass a dense model to compare degradation curves).",), "missing"))
    notes = [str(n) for n in s.get("notes") or []]
    if notes:
        blocks.append(Notes(tuple(notes)))
    return Section(sid, "Does router quantization cost more?", tuple(blocks))


def quant_quality_section(q: QuantResults, sid: str) -> Section:
    configs = q.configs
    blocks: list = [Text("Change of the evaluation NLL when one kind of weight is fake-quantized across the whole model, "
                         "for the MoE (solid) and its dense control (dashed).")]
    whole = configs[configs["layer"] < 0]
    for scheme, gran in quant_figs.schemes_in(whole)[:4]:
        blocks.append(FigureBlock(f"quant_quality_vs_bits_{slug(scheme)}_{slug(gran)}", partial(quant_figs.quality_vs_bits, configs, scheme, gran),
                                  f"Quality change against bits per target ({scheme}, {gran})."))
    if len(whole) and whole["rel_error"].notna().any():
        blocks.append(FigureBlock("quant_quality_vs_error", partial(quant_figs.quality_vs_error, configs), "Quality change against relative weight error."))
    single = configs[configs["layer"] >= 0]
    if len(single):
        for scheme, gran in quant_figs.schemes_in(single)[:2]:
            blocks.append(FigureBlock(f"quant_single_layer_{slug(scheme)}_{slug(gran)}", partial(quant_figs.single_layer_sensitivity, configs, scheme, gran),
                                      f"Sensitivity of single decoder layers ({scheme}, {gran})."))
    else:
        blocks.append(Notes(("No single-layer configurations (run the sweep with --per-layer to see which layers are sensitive).",), "missing"))
    return Section(sid, "Quality against bits", tuple(blocks))


def quant_routing_section(q: QuantResults, sid: str) -> Section:
    per_layer = q.per_layer
    blocks: list = [Text("How often expert choices flip. Local: each router fed the unquantized hidden state, so only its own "
                         "quantization counts; end-to-end: every change propagated through the network.")]
    if per_layer is None or not len(per_layer):
        return Section(sid, "Routing flips", tuple(blocks + [Notes(("per_layer table missing or empty: no routing was measured.",), "missing")]), ran=False)
    whole = per_layer[(per_layer["layer"] < 0) & (per_layer["model"] == "moe")]
    targets = quant_figs.targets_in(whole)[:4] if len(whole) else []
    for scheme, gran in (quant_figs.schemes_in(whole)[:2] if len(whole) else []):
        blocks.append(FigureBlock(f"quant_routing_per_layer_{slug(scheme)}_{slug(gran)}",
                                  partial(quant_figs.routing_change_per_layer, per_layer, targets, scheme, gran),
                                  f"Top-1 flip rate and top-k agreement per MoE layer ({scheme}, {gran}); solid local, dashed end-to-end."))
    modes = set(per_layer["mode"].astype(str))
    if {"local", "e2e"} <= modes:
        blocks.append(FigureBlock("quant_local_vs_e2e", partial(quant_figs.local_vs_end_to_end, per_layer),
                                  "Local against end-to-end top-1 flip rate, per configuration and layer."))
    else:
        blocks.append(Notes((f"Only {', '.join(sorted(modes))} routing was measured; local vs end-to-end needs both (end_to_end=True).",), "missing"))
    return Section(sid, "Routing flips", tuple(blocks))


# -- router saturation across checkpoints ----------------------------------------------------------------
def saturation_group(r: SaturationResults, gid: str, label: str) -> Group:
    s = r.summary.get("saturation") or {}
    header = KeyValues((("final checkpoint", str(s.get("final"))), ("checkpoints", fmt(len(s.get("checkpoints") or {}), "d")),
                        ("tokens", fmt(s.get("tokens"), ",d")), ("MoE layers, top-k", f"{s.get('moe_layers')}, top-{s.get('top_k')}")))
    return Group(gid, label, "router saturation across checkpoints", header,
                 (_guarded(partial(saturation_section, r, f"{gid}-saturation"), f"{gid}-saturation", "Router saturation"),))


def saturation_section(r: SaturationResults, sid: str) -> Section:
    title = "Router saturation"
    per_layer = r.per_layer
    if per_layer is None or not len(per_layer):
        return Section(sid, title, (Notes(("saturation table missing from the results folder",), "missing"),), ran=False)
    s = r.summary.get("saturation") or {}
    pooled = per_layer[per_layer["layer"] == -1].sort_values("order")
    first = pooled.iloc[0]
    blocks: list = [Text(
        f"How much of each checkpoint's routing is already the final checkpoint's, on the same {fmt(s.get('tokens'), ',d')} tokens "
        f"(as OLMoE measured it): top-1 agreement (same first choice) and top-k overlap (|∩|/k). The earliest checkpoint, "
        f"{first['checkpoint']}, agrees on {fmt(first['top1_agreement'], '.1%')} of first choices and shares "
        f"{fmt(first['topk_overlap'], '.1%')} of its top-{s.get('top_k')} experts with the final one (all layers).")]
    blocks.append(FigureBlock("saturation", partial(saturation_figs.saturation_curves, per_layer, str(s.get("x") or "checkpoint")),
                              "Agreement with the final checkpoint per checkpoint; one line per MoE layer, thick: all layers pooled."))
    table = per_layer[per_layer["layer"] == -1][["checkpoint", "step", "tokens", "top1_agreement", "topk_overlap"]]
    blocks.append(TableBlock(table.reset_index(drop=True), "All layers pooled, per checkpoint.",
                             formats={"tokens": ",d", "top1_agreement": ".1%", "topk_overlap": ".1%"}))
    return Section(sid, title, tuple(blocks))


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


def missing_group(m: MissingResults, gid: str, label: str) -> Group:
    return Group(gid, label, "no results", KeyValues((("path", str(m.path)),)),
                 (Section(f"{gid}-missing", "Results folder", (Notes((m.reason,), "missing"),), ran=False),))
