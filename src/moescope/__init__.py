"""moescope: record and analyse how Mixture-of-Experts language models route their tokens.

>>> import moescope                                                          # doctest: +SKIP
>>> trace = moescope.capture("moescope:tiny-moe", "humaneval", out="traces/run1")
>>> with moescope.record(model) as rec:                                      # your own calls
...     model.generate(**inputs, max_new_tokens=32)
>>> results = moescope.analyze(rec.trace)                                    # tables as DataFrames, figures
>>> moescope.report(results, "report.html")

Every name is moescope.api's (the one Python API; the CLI is argument parsing over it). No subpackage or module is
named like a public function, so these names are the functions whatever was imported before.
"""

from moescope.version import __version__  # noqa: F401

_PUBLIC = ("capture", "record", "open_trace", "analyze", "report", "quant_sweep", "compare", "placement", "offload",
           "importance", "saturation", "replay_check", "verify", "export", "import_trace", "sql", "inspect", "top",
           "demo", "Results", "QuantSweep", "Trace", "CaptureOptions", "CaptureOptionsError", "CustomRouter",
           "RoutingMonitor", "intervene")  # all of them moescope.api's


def __getattr__(name):  # keep `import moescope` light: torch/transformers load on first use
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module("moescope.api"), name)
    raise AttributeError(name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
