"""moescope: record and analyse how Mixture-of-Experts language models route their tokens.

>>> import moescope                                                          # doctest: +SKIP
>>> trace = moescope.capture("moescope:tiny-moe", "humaneval", out="traces/run1")
>>> with moescope.record(model) as rec:                                      # your own calls
...     model.generate(**inputs, max_new_tokens=32)
>>> results = moescope.analyze(rec.trace)                                    # tables as DataFrames, figures
>>> moescope.report(results, "report.html")

No subpackage is named like a public function (`record`, `report`, `analyze`, `capture`, `quant_sweep`), so
these names are the functions whatever was imported before.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "capture": "moescope.api",
    "open_trace": "moescope.api",
    "CustomRouter": "moescope.api",
    "CaptureOptions": "moescope.api",
    "CaptureOptionsError": "moescope.recording.options",
    "record": "moescope.recording.session",
    "analyze": "moescope.notebook",
    "report": "moescope.notebook",
    "quant_sweep": "moescope.notebook",
    "Results": "moescope.notebook",
    "RoutingMonitor": "moescope.monitor",
    "intervene": "moescope.intervention",
}


def __getattr__(name):  # keep `import moescope` light: torch/transformers load on first use
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
