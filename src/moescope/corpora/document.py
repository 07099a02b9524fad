"""The unit every corpus yields: one document with its origin and domain label."""

from __future__ import annotations

from dataclasses import dataclass

# Domains of the built-in corpora; user data may carry any other label (see `spec.py`).
CODE = "code"
MATH = "math"
PROSE = "prose"
USER = "user"  # default label of user data given without a `DOMAIN=` prefix


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes
    ----------
    doc_id : str
        Identifier unique within `source` (a HumanEval task id, a relative path, ``"Albedo#3"``...).
    text : str
        The document's text, decoded (undecodable bytes become U+FFFD).
    source : str
        The corpus it came from: a built-in name (``"humaneval"``) or the user's spec (``"data/notes.txt"``).
    domain : str
        What kind of text it is: ``"code"``, ``"math"``, ``"prose"`` or a user-chosen label.
    """

    doc_id: str
    text: str
    source: str
    domain: str


# What a corpus reader yields: (split group, document). The group is the unit the train/eval split
# hashes (see split.py): the document itself, or something larger that must not straddle the split.
Item = tuple[str, Document]
