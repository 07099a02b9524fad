"""Token routing and variable-size experts (what each token costs)."""

from __future__ import annotations

import math
import re
from functools import partial

import numpy as np
import pandas as pd

from moescope.reporting.document import FigureBlock, Notes, Section, TableBlock, Text
from moescope.reporting.figures import tokens as token_figs
from moescope.reporting.figures._base import facet_layers
from moescope.reporting.results import AnalysisResults
from moescope.reporting.sections.common import HINT_MODEL, HINT_ONLY, TOKEN_LAYER_COLUMNS, TOKEN_ROWS, _not_run, _notes_block, fmt


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
                                  "Average selected expert size per token over all layers: per unique token, per occurrence, and the share whose "
                                  "average is above the midpoint of the smallest and largest expert."))
    facets = facet_layers(shape["layers"], 4)
    token_layer = None
    if r.expert_sizes():
        token_experts = r.table("token_specialisation", "token_experts", where={"layer": tuple(facets)})
        token_layer = token_layer_sizes(token_experts, r.expert_sizes(), shape["top_k"])
    if token_layer is not None:
        cost_layers = r.table("token_cost", "per_layer")
        mostly_large = None if cost_layers is None else {
            int(layer): float(share) for layer, share in zip(cost_layers["layer"], cost_layers["mostly_large_share"]) if layer >= 0}
        blocks.append(FigureBlock("expert_size_by_layer",
                                  partial(token_figs.expert_size_by_layer, token_layer, facets, r.expert_sizes(), mostly_large),
                                  "Average selected expert size per token, layer by layer (weighted by occurrences); the title's "
                                  "share is token_cost's: (token, layer) pairs whose mean selected size is above the layer's threshold."))
    elif has_sizes:
        blocks.append(Notes(("Per-layer size histograms need the expert sizes from the trace manifest, which is not readable here.",), "missing"))
    dist, per_layer = r.table("token_cost", "distribution"), r.table("token_cost", "per_layer")
    if dist is not None and len(dist) and per_layer is not None and len(per_layer):
        blocks.append(FigureBlock("token_cost", partial(token_figs.token_cost, dist, per_layer, h),
                                  "Expert compute per token, large-expert share per layer" + (", and output entropy by cost." if dist["mean_output_entropy"].notna().any() else ".")))
    return Section(sid, title, tuple(blocks + _notes_block(r, "token_cost")))



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
