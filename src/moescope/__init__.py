"""moescope: record and analyse how Mixture-of-Experts language models route their tokens."""

__version__ = "0.1.0"
