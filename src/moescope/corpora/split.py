"""Deterministic train/eval split by a stable hash, so a model trained on `train` never sees `eval`.

Each document belongs to a *split group* chosen by its source: usually the document itself, but a
whole article for Wikipedia paragraphs and a whole template for GSM-Symbolic problems, so that near
copies never straddle the split. The hash is BLAKE2b of ``namespace + "\\x1f" + group``, where the
namespace is the built-in corpus name (or the kind of user file, so that moving a file changes
nothing): it does not depend on Python's hash seed, the machine, the order of documents or how many
there are.
"""

from __future__ import annotations

import hashlib

from moescope.errors import CorpusError

SPLITS = ("train", "eval", "all")
EVAL_PER_MILLE = 100  # 10% of split groups are held out for evaluation


def check_split(split: str) -> str:
    """Return `split` if it is one of `SPLITS`, else raise CorpusError."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split


def split_of(namespace: str, group: str) -> str:
    """Return ``"train"`` or ``"eval"`` for the split group `group` in `namespace`.

    Examples
    --------
    >>> split_of("humaneval", "HumanEval/0")
    'train'
    >>> split_of("humaneval", "HumanEval/0") == split_of("humaneval", "HumanEval/0")
    True
    """
    key = f"{namespace}\x1f{group}".encode("utf-8", errors="surrogatepass")
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 1000
    return "eval" if bucket < EVAL_PER_MILLE else "train"


def in_split(namespace: str, group: str, split: str) -> bool:
    """True when the group belongs to `split` (``"all"`` holds every group)."""
    return split == "all" or split_of(namespace, group) == split
