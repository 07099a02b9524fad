"""Interventions on MoE routing and what they show: which experts matter.

    context.py      moescope.intervene(model, drop=, zero=, force=)  (hooks: intervention/hooks.py)
    plan.py         the checks every intervention passes before the model is touched
    statistics.py   routing statistics per expert from a trace: frequency, mean gate weight, REAP; rank correlation
    importance.py   the sweep: ΔNLL per dropped expert (prefix replayed), pruning curves, specialisation by domain
    tables.py       the sweep's tables and summary
"""

from moescope.intervention.context import intervene
from moescope.intervention.plan import LayerIntervention, plan_interventions

__all__ = ["LayerIntervention", "intervene", "plan_interventions"]
