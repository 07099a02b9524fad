"""One exception hierarchy: every error a user can cause is a MoescopeError with a one-line message.

The CLI prints `error: <message>` and exits non-zero for these; anything else is a bug and keeps its
traceback. Messages say what went wrong *and* what to do about it.
"""


class MoescopeError(Exception):
    """Base class for errors caused by input, configuration or environment (not by a bug)."""


class ModelLoadError(MoescopeError):
    """The model could not be found or loaded."""


class NoRouterFoundError(MoescopeError):
    """The model has no MoE router moescope recognises."""


class CorpusError(MoescopeError):
    """The corpus is missing, empty or malformed."""


class TraceError(MoescopeError):
    """A trace on disk is missing, corrupt, locked, or of an unknown schema."""


class ImportFormatError(MoescopeError):
    """A file to import (e.g. JSONL) is malformed."""


class RoutingPolicyError(MoescopeError):
    """A layer's routing cannot be re-derived as asked (from another input, or with experts dropped or forced)."""


class InterventionError(MoescopeError):
    """An intervention (drop / zero / force experts) names layers or experts the model does not have, or asks
    for something the layer's routing cannot do."""


class ImportanceError(MoescopeError):
    """An importance sweep cannot run as asked (no layer can drop experts; its folder holds another sweep)."""
