"""`moescope.intervene(model, drop=..., zero=..., force=...)`: run a model with experts dropped, zeroed or forced.

>>> with moescope.intervene(model, drop={1: [3]}):          # doctest: +SKIP
...     loss = model(input_ids=ids, labels=ids).loss         # MoE layer 1 routes as if expert 3 were pruned

Everything is checked before the model is touched (one InterventionError); inside, hooks only
(intervention/hooks.py), removed on exit and on exception, so the model is restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from moescope.adapters.discover import find_moe_layers
from moescope.adapters.spec import MoELayer
from moescope.intervention.plan import LayerIntervention, plan_interventions
from moescope.intervention.hooks import InterventionHooks


@contextmanager
def intervene(model: nn.Module, *, drop=None, zero=None, force=None, route=None,
              layers: list[MoELayer] | None = None) -> Iterator[list[LayerIntervention]]:
    """Change which experts the MoE layers of `model` use, for the duration of the block.

    Parameters
    ----------
    drop : dict {moe_layer: [expert ids]}
        Removed from selection: the router chooses among the remaining experts under the family's own
        policy (correction bias, group limits, renormalisation, scaling), as a pruned model would.
    zero : dict {moe_layer: [expert ids]}
        Routing unchanged, but those experts contribute nothing (their gate weights are 0).
    force : dict {moe_layer: [expert ids] or fn}
        Ids: always chosen, the other slots by the router's policy. fn(ids int64 [N, k]) -> ids [N, k]:
        the experts each token (row b * T + t of the batch) is sent to, weighted as the block would.
    route : dict {moe_layer: fn}
        fn(ids int64 [N, k], weights float32 [N, k], logits float32 [N, E], weigh) -> (ids, weights): the
        routing each token (row b * T + t) gets, decided from the router's own choice and its logits (log
        probabilities for routers that output probabilities); weigh(ids) gives the weights the block would
        give those ids. What `moescope offload --lossy --model` applies.
    layers : list of MoELayer, optional
        The model's MoE layers (from `find_moe_layers`), when already discovered.

    Yields
    ------
    list of LayerIntervention
        The checked per-layer plans. Layer keys are MoE-layer indices, as in the trace.
    """
    layers = layers if layers is not None else find_moe_layers(model)
    plans = plan_interventions(model, layers, drop=drop, zero=zero, force=force, route=route)
    with InterventionHooks(model, plans):
        yield plans
