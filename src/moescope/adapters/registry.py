"""Lookup of declared families (adapters/families.py) by transformers model_type."""

from __future__ import annotations

from moescope.adapters.families import FAMILIES, UNSUPPORTED
from moescope.adapters.spec import RouterSpec, UnsupportedFamily


def lookup_family(model_type: str) -> RouterSpec | None:
    return FAMILIES.get(model_type)


def unsupported_reason(model_type: str) -> UnsupportedFamily | None:
    return UNSUPPORTED.get(model_type)
