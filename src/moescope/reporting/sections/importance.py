"""The report's group for one `moescope importance` folder: which experts matter, and do the statistics know?

Sections: ΔNLL per dropped expert (map and the largest), routing statistics against ΔNLL (rank correlation),
pruning curves, specialisation by intervention. Nothing here draws (figures/importance.py) or writes.
"""

from __future__ import annotations

from functools import partial

import pandas as pd

from moescope.reporting.document import FigureBlock, Group, KeyValues, Notes, Section, TableBlock, Text
from moescope.reporting.figures import importance as figs
from moescope.reporting.results import ImportanceResults
from moescope.reporting.sections.common import _guarded, fmt
from moescope.trace.storage import source_of


def importance_group(r: ImportanceResults, gid: str, label: str) -> Group:
    s = r.summary
    ref, info = s.get("reference") or {}, s.get("importance") or {}
    header = KeyValues((
        ("sweep", source_of(r.path)),  # an s3:// sweep: its URL, not the downloaded copy
        ("unpruned model", f"NLL {fmt(ref.get('nll'), '.4f')} (ppl {fmt(ref.get('ppl'), '.4g')}) over "
                           f"{fmt(ref.get('tokens_predicted'), ',d')} tokens"),
        ("MoE layers swept", ", ".join(str(l) for l in info.get("moe_layers") or []) or "—"),
        ("configurations", fmt(info.get("configurations"), ",d")),
    ))
    builders = (("drops", "ΔNLL per dropped expert", drops_section), ("statistics", "Do routing statistics predict it?", statistics_section),
                ("pruning", "Pruning curves", pruning_section), ("specialisation", "Specialisation by intervention", specialisation_section))
    sections = tuple(_guarded(partial(build, r, f"{gid}-{key}"), f"{gid}-{key}", title) for key, title, build in builders)
    return Group(gid, label, "which experts matter: ΔNLL when dropped", header, sections)


def _missing(sid: str, title: str, what: str) -> Section:
    return Section(sid, title, (Notes((what,), "missing"),), ran=False)


def drops_section(r: ImportanceResults, sid: str) -> Section:
    experts = r.tables.get("experts")
    if experts is None or not len(experts):
        return _missing(sid, "ΔNLL per dropped expert", "experts table missing: the sweep has not finished")
    top = experts.sort_values("delta_nll", ascending=False).head(10)[["layer", "expert", "delta_nll", "delta_nll_se", "frequency"]]
    blocks = [Text("Each expert removed from selection alone (the router choosing among the rest by its own policy); the "
                   "change of the mean next-token NLL over the evaluation tokens."),
              FigureBlock("importance_delta_nll_map", partial(figs.delta_nll_map, experts), "ΔNLL per (MoE layer, expert)."),
              TableBlock(top, "The experts whose drop costs most (± 1 SE, sequences as clusters).",
                         formats={"delta_nll": "+.5f", "delta_nll_se": ".5f", "frequency": ".1%"})]
    return Section(sid, "ΔNLL per dropped expert", tuple(blocks))


def statistics_section(r: ImportanceResults, sid: str) -> Section:
    experts, correlations = r.tables.get("experts"), r.tables.get("correlations")
    if experts is None or correlations is None:
        return _missing(sid, "Do routing statistics predict it?", "experts or correlations table missing")
    pooled = correlations[correlations.layer == -1][["statistic", "spearman", "n"]]
    blocks = [Text("Routing frequency, mean gate weight and REAP (mean over the tokens routed to an expert of gate weight × "
                   "the expert's output norm) against the ΔNLL of dropping it; Spearman rank correlation, all swept layers pooled."),
              FigureBlock("importance_statistics", partial(figs.statistics_vs_delta, experts, correlations),
                          "Each statistic against ΔNLL, one dot per expert."),
              TableBlock(pooled, "Rank correlation with ΔNLL (per layer in correlations.csv).", formats={"spearman": "+.3f", "n": ",d"})]
    if experts["reap"].isna().all():
        blocks.append(Notes(("REAP needs expert output norms (the sweep's trace records them; `capture --save-expert-norms`).",), "missing"))
    return Section(sid, "Do routing statistics predict it?", tuple(blocks))


def pruning_section(r: ImportanceResults, sid: str) -> Section:
    pruning = r.tables.get("pruning")
    if pruning is None or not (pruning.criterion != "none").any():
        return _missing(sid, "Pruning curves", "no pruning curves: the sweep ran with --no-prune")
    best = (r.summary.get("pruning") or {}).get("best_at_largest_share") or {}
    blocks = [Text("The n least important experts of every swept layer pruned at once, in the order each criterion gives "
                   "(ΔNLL of single drops, the routing statistics, or a random order); n stops where top-k experts remain."),
              FigureBlock("importance_pruning", partial(figs.pruning_curves, pruning), "NLL against the share of experts pruned.")]
    if best:
        blocks.append(Text(f"At {best['n_pruned']} experts pruned per layer the best order is {best['criterion']} "
                           f"(ΔNLL {best['delta_nll']:+.4f}), the worst {best['worst_criterion']} ({best['worst_delta_nll']:+.4f})."))
    return Section(sid, "Pruning curves", tuple(blocks))


def specialisation_section(r: ImportanceResults, sid: str) -> Section:
    spec = r.tables.get("specialisation")
    if spec is None or not len(spec):
        return _missing(sid, "Specialisation by intervention", "needs an evaluation corpus of two or more domains "
                        "(e.g. --data humaneval,gsm-symbolic,wiki)")
    answers = (r.summary.get("specialisation") or {}).values()
    blocks = [Text("For each layer and domain: its most domain-specific expert (largest routing frequency on the domain's "
                   "tokens minus elsewhere) is dropped, and the ΔNLL of that domain's tokens is set beside the other tokens'."),
              FigureBlock("importance_specialisation", partial(figs.specialisation_bars, spec), "ΔNLL by domain when a layer's "
                          "most domain-specific expert is dropped."),
              TableBlock(pd.DataFrame(spec), "Per layer and domain.", formats={
                  "frequency_in_domain": ".1%", "frequency_elsewhere": ".1%", "delta_nll_domain": "+.5f",
                  "delta_nll_other_domains": "+.5f", "difference": "+.5f"})]
    blocks.extend(Text(a["statement"]) for a in answers)
    return Section(sid, "Specialisation by intervention", tuple(blocks))
