"""The importance sweep's tables and summary, from its finished configurations (pure: no model, no I/O).

    experts         per (MoE layer, expert): ΔNLL when dropped (± SE; per domain), n_slots, frequency,
                    mean gate weight, REAP
    correlations    Spearman rank correlation of each routing statistic with ΔNLL, pooled and per layer
    pruning         NLL against the number (share) of experts pruned per layer, per criterion; n = 0 is the
                    unpruned model
    specialisation  per (MoE layer, domain): the layer's most domain-specific expert, and the ΔNLL its drop
                    costs that domain's tokens against all other tokens
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moescope.adapters.spec import MoELayer
from moescope.intervention.statistics import STATISTICS, most_specific, spearman

EXPERT_COLUMNS = ["layer", "decoder_layer", "expert", "delta_nll", "delta_nll_se", "nll", "n_slots", *STATISTICS]
PRUNING_COLUMNS = ["criterion", "n_pruned", "share_pruned", "nll", "delta_nll", "delta_nll_se"]


def build_tables(layers: list[MoELayer], swept: list[int], stats: pd.DataFrame, records: dict, reference: dict,
                 domains: tuple[str, ...], *, notes: list[str], options: dict, trace_path: str,
                 domain_stats: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """({name: DataFrame}, summary dict)."""
    experts = _experts(layers, swept, stats, records, domains)
    correlations = _correlations(experts, swept)
    pruning = _pruning(layers, swept, records, reference)
    specialisation = _specialisation(experts, domain_stats, reference, domains) if domain_stats is not None else None
    tables = {"experts": experts, "correlations": correlations, "pruning": pruning}
    if specialisation is not None:
        tables["specialisation"] = specialisation
    summary = _summary(layers, swept, experts, correlations, pruning, specialisation, reference, notes, options, trace_path)
    return tables, summary


def _experts(layers, swept, stats, records, domains) -> pd.DataFrame:
    rows = []
    for r in records.values():
        c = r["config"]
        if c["kind"] == "drop":
            rows.append({"layer": c["layer"], "expert": c["expert"], "delta_nll": c["delta_nll"],
                         "delta_nll_se": c["delta_nll_se"], "nll": c["nll"],
                         **{f"delta_nll_{d}": r["domains"].get(d, math.nan) for d in domains}})
    drops = pd.DataFrame(rows, columns=["layer", "expert", "delta_nll", "delta_nll_se", "nll", *(f"delta_nll_{d}" for d in domains)])
    frame = stats[stats.layer.isin(swept)].merge(drops, on=["layer", "expert"], how="left")
    frame.insert(1, "decoder_layer", [layers[int(l)].decoder_layer for l in frame.layer])
    columns = EXPERT_COLUMNS + [f"delta_nll_{d}" for d in domains]
    return frame[columns].sort_values(["layer", "expert"]).reset_index(drop=True)


def _correlations(experts: pd.DataFrame, swept: list[int]) -> pd.DataFrame:
    rows = []
    for statistic in STATISTICS:
        for layer in [-1, *swept]:  # -1: every swept layer pooled
            part = experts if layer < 0 else experts[experts.layer == layer]
            valid = part[statistic].notna() & part["delta_nll"].notna()
            rows.append({"statistic": statistic, "layer": layer, "spearman": spearman(part[statistic], part["delta_nll"]),
                         "n": int(valid.sum())})
    return pd.DataFrame(rows, columns=["statistic", "layer", "spearman", "n"])


def _pruning(layers, swept, records, reference) -> pd.DataFrame:
    n_experts = max(layers[l].n_experts for l in swept)
    rows = [{"criterion": "none", "n_pruned": 0, "share_pruned": 0.0, "nll": reference["nll"], "delta_nll": 0.0,
             "delta_nll_se": 0.0}]
    for r in records.values():
        c = r["config"]
        if c["kind"] == "prune":
            rows.append({"criterion": c["criterion"], "n_pruned": c["n_pruned"], "share_pruned": c["n_pruned"] / n_experts,
                         "nll": c["nll"], "delta_nll": c["delta_nll"], "delta_nll_se": c["delta_nll_se"]})
    return pd.DataFrame(rows, columns=PRUNING_COLUMNS).sort_values(["criterion", "n_pruned"]).reset_index(drop=True)


def _specialisation(experts, domain_stats, reference, domains) -> pd.DataFrame | None:
    counts = reference.get("tokens_per_domain") or {}
    if len(domains) < 2:
        return None
    picked = most_specific(domain_stats[domain_stats.layer.isin(experts.layer.unique())])
    rows = []
    for row in picked.itertuples(index=False):
        hit = experts[(experts.layer == row.layer) & (experts.expert == row.expert)].iloc[0]
        own = hit[f"delta_nll_{row.domain}"]
        others = [d for d in domains if d != row.domain]
        weights = np.array([counts.get(d, 0) for d in others], dtype=float)
        values = np.array([hit[f"delta_nll_{d}"] for d in others], dtype=float)
        other = float((weights * values).sum() / weights.sum()) if weights.sum() else math.nan
        rows.append({"layer": row.layer, "domain": row.domain, "expert": row.expert,
                     "frequency_in_domain": row.frequency_in_domain, "frequency_elsewhere": row.frequency_elsewhere,
                     "delta_nll_domain": own, "delta_nll_other_domains": other, "difference": own - other})
    return pd.DataFrame(rows)


def _summary(layers, swept, experts, correlations, pruning, specialisation, reference, notes, options, trace_path) -> dict:
    pooled = correlations[correlations.layer == -1].set_index("statistic")["spearman"]
    top = experts.sort_values("delta_nll", ascending=False).head(5)
    statements = [f"Rank correlation with ΔNLL when dropped (Spearman, {len(experts)} experts): "
                  + ", ".join(f"{s} {_f(pooled.get(s))}" for s in STATISTICS)]
    summary = {
        "importance": {"moe_layers": swept, "n_experts": [layers[l].n_experts for l in swept],
                       "top_k": [layers[l].top_k for l in swept], "configurations": int(experts.delta_nll.notna().sum()
                                                                                       + (pruning.criterion != "none").sum())},
        "reference": reference,
        "correlations": {s: pooled.get(s) for s in STATISTICS},
        "most_important": top[["layer", "expert", "delta_nll", "delta_nll_se"]].to_dict("records"),
        "pruning": _pruning_summary(pruning),
        "trace": {"path": trace_path},
        "options": options,
        "notes": list(notes),
    }
    best = summary["pruning"].get("best_at_largest_share")
    if best:
        statements.append(f"Pruning {best['n_pruned']} experts per layer: least NLL lost by ordering on {best['criterion']} "
                          f"(ΔNLL {best['delta_nll']:+.4f}); worst: {best['worst_criterion']} ({best['worst_delta_nll']:+.4f})")
    if specialisation is not None and len(specialisation):
        summary["specialisation"] = _specialisation_summary(specialisation)
        statements.extend(answer["statement"] for answer in summary["specialisation"].values())
    else:
        summary["notes"].append("specialisation by intervention needs a corpus of two or more domains (e.g. "
                                "--data humaneval,gsm-symbolic,wiki)")
    summary["statements"] = statements
    return summary


def _pruning_summary(pruning: pd.DataFrame) -> dict:
    curves = pruning[pruning.criterion != "none"]
    if not len(curves):
        return {}
    n = int(curves.n_pruned.max())
    last = curves[curves.n_pruned == n].sort_values("delta_nll")
    return {"criteria": sorted(curves.criterion.unique().tolist()),
            "best_at_largest_share": {"n_pruned": n, "criterion": last.iloc[0].criterion, "delta_nll": float(last.iloc[0].delta_nll),
                                      "worst_criterion": last.iloc[-1].criterion, "worst_delta_nll": float(last.iloc[-1].delta_nll)}}


def _specialisation_summary(spec: pd.DataFrame) -> dict:
    answers = {}
    for domain, part in spec.groupby("domain", sort=True):
        more = int((part.difference > 0).sum())
        answers[domain] = {
            "layers": int(len(part)), "layers_where_own_domain_loses_more": more,
            "mean_difference": float(part.difference.mean()),
            "statement": f"Dropping a layer's most {domain}-specific expert costs {domain} tokens more NLL than the other "
                         f"tokens in {more} of {len(part)} layers (mean ΔNLL difference {part.difference.mean():+.4f}).",
        }
    return answers


def _f(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:+.2f}"
