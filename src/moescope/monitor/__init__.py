"""Routing health while a model trains: `RoutingMonitor`, a transformers TrainerCallback that also runs in a plain loop.

    callback.py   RoutingMonitor: when to record (every N steps), the hooks (RoutingRecorder), Trainer events
    metrics.py    one recorded step -> rows (step, layer, metric, value), computed by the analysis package
    alerts.py     dead experts (cold for N checks), entropy collapse, a falling entropy trend -> alert records
"""

from moescope.monitor.callback import RoutingMonitor

__all__ = ["RoutingMonitor"]
