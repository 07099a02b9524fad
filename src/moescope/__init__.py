"""moescope: record and analyse how Mixture-of-Experts language models route their tokens.

>>> import moescope                                                          # doctest: +SKIP
>>> trace = moescope.capture("moescope:tiny-moe", "humaneval", out="traces/run1")
>>> trace.sql("SELECT layer, count(*) FROM routing GROUP BY layer")
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import moescope` light: torch/transformers load on first use
    if name in ("capture", "open_trace", "CustomRouter", "CaptureOptions"):
        from moescope import api

        return getattr(api, name)
    if name == "intervene":
        from moescope.intervention import intervene

        return intervene
    raise AttributeError(name)
