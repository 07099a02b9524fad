"""Slow, obviously-correct per-token loop versions of every analysis, written the way the research
notebooks write them (Python loops over tokens, dicts and Counters).

They exist to check the vectorised analyses (tests/analysis) and to time them against (bench/analysis.py);
nothing in moescope calls them. Each module's `compute(shards, ctx)` returns plain Python numbers, lists
and dicts with the same definitions as the fast analysis of the same name.
"""

from moescope.analysis.reference import (
    aux_losses,
    coactivation,
    cross_layer,
    domain_specialisation,
    expert_cache,
    load,
    router_confidence,
    temporal_locality,
    token_cost,
    token_specialisation,
)

REFERENCES = {
    "load": load,
    "aux_losses": aux_losses,
    "router_confidence": router_confidence,
    "coactivation": coactivation,
    "cross_layer": cross_layer,
    "expert_cache": expert_cache,
    "temporal_locality": temporal_locality,
    "domain_specialisation": domain_specialisation,
    "token_specialisation": token_specialisation,
    "token_cost": token_cost,
}
