"""The quantization sweep's group: the answer, quality and routing sections."""

from __future__ import annotations

from functools import partial

import pandas as pd

from moescope.reporting.document import FigureBlock, Group, KeyValues, Notes, Section, TableBlock, Text
from moescope.reporting.figures import quant as quant_figs
from moescope.reporting.results import QuantResults
from moescope.reporting.sections.common import _guarded, fmt, slug
from moescope.trace.storage import source_of


# -- quantization ------------------------------------------------------------------------------------
def quant_group(q: QuantResults, gid: str, label: str) -> Group:
    s, configs = q.summary, q.configs
    models = q.sweep.get("models") or {}
    options = q.sweep.get("options") or {}
    header = [("sweep", source_of(q.path))]  # an s3:// sweep: its URL, not the downloaded copy
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
