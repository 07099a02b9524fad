"""What an intervention asks of each MoE layer, checked against the model before anything is touched.

    drop={layer: [experts]}         removed from selection: the router chooses among the rest by its own policy
    zero={layer: [experts]}         routing unchanged; those experts' gate weights are 0, so they contribute nothing
    force={layer: [experts]}        always chosen (the other slots by the router's policy)
    force={layer: fn}               fn(ids int64 [N, k]) -> ids [N, k]: route chosen tokens (rows = the block's
                                    flattened batch, b * T + t) to chosen experts, weighted as the block would

Layers are MoE-layer indices as in the trace (0..L-1 over MoE layers only). Every problem — an unknown
layer, an expert id out of range, fewer than top-k experts left, a layer whose routing cannot be re-derived —
is one InterventionError naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from moescope.adapters.policy import LayerPolicy, layer_policy
from moescope.adapters.spec import MoELayer, Selection
from moescope.errors import InterventionError, RoutingPolicyError


@dataclass(frozen=True)
class LayerIntervention:
    """One MoE layer's part of an intervention."""

    layer: MoELayer
    drop: tuple[int, ...] = ()
    zero: tuple[int, ...] = ()
    force: tuple[int, ...] | Callable | None = None
    route: Callable | None = None  # fn(ids, weights, logits, weigh) -> (ids, weights): see intervene(route=)

    @property
    def reroutes(self) -> bool:
        """Whether the layer's selection is recomputed (drop / force / route), not only its weights (zero)."""
        return bool(self.drop) or self.force is not None or self.route is not None


def plan_interventions(model: nn.Module, layers: list[MoELayer], *, drop=None, zero=None, force=None,
                       route=None) -> list[LayerIntervention]:
    """One LayerIntervention per MoE layer named in drop / zero / force / route, in layer order."""
    asked = {kind: _by_layer(kind, mapping, layers)
             for kind, mapping in (("drop", drop), ("zero", zero), ("force", force), ("route", route))}
    plans = []
    for index in sorted(set().union(*asked.values())):
        layer = layers[index]
        plan = LayerIntervention(
            layer,
            drop=_experts("drop", layer, asked["drop"].get(index, ())),
            zero=_experts("zero", layer, asked["zero"].get(index, ())),
            force=_force(layer, asked["force"].get(index)),
            route=_route(layer, asked["route"].get(index)),
        )
        _check(model, plan)
        plans.append(plan)
    return plans


def _by_layer(kind: str, mapping, layers: list[MoELayer]) -> dict[int, object]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise InterventionError(f"{kind}= takes a dict {{moe_layer: [expert ids]}}, not {type(mapping).__name__}")
    out = {}
    for key, value in mapping.items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(layers):
            raise InterventionError(f"{kind}: unknown MoE layer {key!r}; the model has MoE layers 0..{len(layers) - 1} "
                                    "(MoE-layer indices, as in the trace)")
        out[key] = value
    return out


def _experts(kind: str, layer: MoELayer, values) -> tuple[int, ...]:
    values = [values] if isinstance(values, int) else list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < layer.n_experts]
    if bad:
        raise InterventionError(f"{kind}: expert id {bad[0]!r} is out of range for MoE layer {layer.index}, which has "
                                f"experts 0..{layer.n_experts - 1}")
    return tuple(sorted(set(values)))


def _force(layer: MoELayer, value):
    if value is None or callable(value):
        return value
    experts = _experts("force", layer, value)
    if not 0 < len(experts) <= layer.top_k:
        raise InterventionError(f"force: MoE layer {layer.index} routes each token to top-k = {layer.top_k} experts; "
                                f"give 1 to {layer.top_k} expert ids (or a function of the ids), not {len(experts)}")
    return experts


def _route(layer: MoELayer, value):
    if value is not None and not callable(value):
        raise InterventionError(f"route: MoE layer {layer.index} takes a function (ids, weights, logits, weigh) -> "
                                f"(ids, weights), not {type(value).__name__}")
    return value


def _check(model: nn.Module, plan: LayerIntervention) -> None:
    layer = plan.layer
    where = f"MoE layer {layer.index} ({layer.spec.family})"
    if layer.spec.selection == Selection.ROUTER_TOPK:
        raise InterventionError(f"{where}: its experts take no expert ids and weights (the block reads the router "
                                "output itself), so moescope cannot change what they receive")
    if layer.n_experts - len(plan.drop) < layer.top_k:
        raise InterventionError(f"drop: dropping {len(plan.drop)} of the {layer.n_experts} experts of {where} leaves "
                                f"fewer than top-k = {layer.top_k} to route each token to")
    if isinstance(plan.force, tuple) and set(plan.force) & set(plan.drop):
        raise InterventionError(f"{where}: experts {sorted(set(plan.force) & set(plan.drop))} are both dropped and forced")
    if plan.reroutes:
        policy = bound_policy(model, layer)
        problem = policy.reroute_problem
        if plan.route is not None and (plan.drop or plan.force is not None):
            problem = "route= replaces the whole routing; do not combine it with drop= or force= on one layer"
        elif policy.hash_table() is not None and (plan.drop or isinstance(plan.force, tuple)):
            problem = "it selects experts by a token-id table (hash routing); only zero= and force= with a function work"
        elif isinstance(plan.force, tuple) and not policy.can_force_list:
            problem = "each of its choices depends on the one before (sparsemixer); force it with a function of the ids"
        if problem:
            raise InterventionError(f"{where}: cannot drop or force experts here: {problem}")


def bound_policy(model: nn.Module, layer: MoELayer) -> LayerPolicy:
    try:
        return layer_policy(model, layer)
    except RoutingPolicyError as err:
        raise InterventionError(f"cannot drop or force experts: {err}") from None
