"""From results folders to the report's sections: which figures and tables each analysis gets, and what
to say when something was not run or not recorded. One module per analysis, as in `analysis/`:

    common.py        formatting, hints, facts about the run, the unreadable-table guard
    load.py          expert load, auxiliary losses           router.py     router structure, confidence
    coactivation.py  experts chosen together                 cross_layer.py  layer N -> N+k predictability
    cache.py         expert cache, temporal locality         domains.py    code / math / prose
    tokens.py        token routing, variable-size experts    simulate.py   placement, offloading
    simulate_bounds.py  what those two add past one cache and one static EPLB (coverage, oracle gap, lossy
                     frontier, fan-out at balance, replica budgets, LP split, decode batches)
    quant.py         the quantization sweep's group          saturation.py router saturation
    importance.py    the importance sweep's group            headline.py   the headline table

Each `*_section` takes an `AnalysisResults` (or `QuantResults`) and returns a `Section` whose figures are
closures over the tables (made only when rendered). Nothing here draws or writes; figures live in
`figures/`, markup in `html.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from moescope.reporting.document import Group, KeyValues, Notes, Section
from moescope.reporting.results import AnalysisResults, MissingResults
from moescope.reporting.sections.cache import cache_section, locality_section
from moescope.reporting.sections.coactivation import coactivation_section
from moescope.reporting.sections.common import SIMULATIONS, UNREADABLE, _guarded, fmt, header_facts, shape_of
from moescope.reporting.sections.cross_layer import cross_layer_section
from moescope.reporting.sections.domains import domain_section
from moescope.reporting.sections.headline import headline
from moescope.reporting.sections.load import aux_section, load_section
from moescope.reporting.sections.quant import quant_group
from moescope.reporting.sections.router import confidence_section, router_structure_section
from moescope.reporting.sections.saturation import saturation_group
from moescope.reporting.sections.simulate import offload_section, placement_section
from moescope.reporting.sections.tokens import size_section, token_section

__all__ = ["SECTION_BUILDERS", "SECTION_OF_ANALYSIS", "UNREADABLE", "analysis_group", "headline", "missing_group", "quant_group", "saturation_group"]


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


# the section of each registered analysis, by its name (the notebook API's `Results.plot(name)`)
SECTION_OF_ANALYSIS: dict[str, Callable] = {
    "load": load_section,
    "aux_losses": aux_section,
    "router_structure": router_structure_section,
    "router_confidence": confidence_section,
    "coactivation": coactivation_section,
    "cross_layer": cross_layer_section,
    "expert_cache": cache_section,
    "temporal_locality": locality_section,
    "domain_specialisation": domain_section,
    "token_specialisation": token_section,
    "token_cost": size_section,
}


def analysis_group(r: AnalysisResults, gid: str, label: str) -> Group:
    shape = shape_of(r)
    ran = set((r.summary.get("analyses") or {}))
    simulation_only = bool(ran) and ran <= set(SIMULATIONS)  # a `moescope placement` / `offload` folder: its sections only
    builders = [(key, title, builder) for key, title, builder in SECTION_BUILDERS
                if not simulation_only or key in SIMULATIONS and key in ran]
    sections = tuple(_guarded(partial(builder, r, f"{gid}-{key}", shape), f"{gid}-{key}", title) for key, title, builder in builders)
    model = str(r.trace.get("model") or "unknown model")
    return Group(gid, label, f"{model} · {fmt(r.trace.get('tokens'), ',d')} tokens", header_facts(r), sections)



def missing_group(m: MissingResults, gid: str, label: str) -> Group:
    from moescope.trace.storage import source_of

    return Group(gid, label, "no results", KeyValues((("path", source_of(m.path)),)),  # an s3:// folder: its URL
                 (Section(f"{gid}-missing", "Results folder", (Notes((m.reason,), "missing"),), ran=False),))
