"""Corpora: the text moescope routes through a model, each document labelled with its domain.

`iter_corpus` streams the documents of a spec (built-in names, files, directories, JSONL, offline
Hugging Face datasets, or a comma-separated mixture of them); `load_corpus` is its list-returning
twin; `describe_corpus` is the JSON-ready record of a spec that a trace manifest stores.

Examples
--------
>>> docs = load_corpus("humaneval", split="eval", max_docs=2)
>>> [(d.source, d.domain) for d in docs]
[('humaneval', 'code'), ('humaneval', 'code')]
>>> sorted(BUILTIN_CORPORA)
['gsm-symbolic', 'humaneval', 'news', 'python-stdlib', 'wiki']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from moescope.corpora.builtin import BUILTIN_CORPORA, BuiltinCorpus
from moescope.corpora.document import Document
from moescope.corpora.mixture import interleave
from moescope.corpora.spec import Source, parse_spec
from moescope.corpora.split import EVAL_PER_MILLE, SPLITS, check_split, in_split, split_of
from moescope.errors import CorpusError

__all__ = [
    "BUILTIN_CORPORA",
    "BuiltinCorpus",
    "Document",
    "SPLITS",
    "describe_corpus",
    "iter_corpus",
    "load_corpus",
    "split_of",
]


def source_split(source: Source, split: str | None, builtin_split: str) -> str:
    """The split read from `source`: `split` when given, else a built-in corpus's `builtin_split` and all of
    the user's own data (files, folders, JSONL, hf:): nobody's data is silently cut to a tenth."""
    if split is not None:
        return split
    return builtin_split if source.kind == "builtin" else "all"


def _split_stream(source: Source, split: str) -> Iterator[Document]:
    """The documents of one source that fall in `split`; an empty result is an error, not silence."""
    seen = kept = 0
    for group, doc in source.read():
        seen += 1
        if in_split(source.split_namespace, group, split):
            kept += 1
            yield doc
    if seen == 0:
        raise CorpusError(f"corpus {source.entry!r} holds no documents; check that it has non-empty text")
    if kept == 0:
        raise CorpusError(
            f"corpus {source.entry!r} has {seen} documents but none in the {split!r} split "
            f"({EVAL_PER_MILLE / 10:g}% of groups are eval); add documents or use split='all'"
        )


def iter_corpus(spec: str, *, split: str | None = "all", builtin_split: str = "all",
                max_docs: int | None = None) -> Iterator[Document]:
    """Stream the documents of a corpus spec.

    The spec is parsed (and every file, package and argument checked) before this returns; text is
    read lazily, one source file at a time, so memory stays bounded for large directories.

    Parameters
    ----------
    spec : str
        Comma-separated entries: built-in names (see `BUILTIN_CORPORA`), ``PATH.txt``, ``DIR``,
        ``PATH.jsonl[:FIELD]``, ``hf:NAME[:CONFIG]:SPLIT:FIELD``, each optionally ``DOMAIN=``-prefixed.
    split : {"all", "train", "eval"} or None
        Which side of the fixed hash split to keep (10% of split groups are eval), for every source.
        None: built-in corpora give `builtin_split`, the user's own data is read whole.
    builtin_split : {"all", "train", "eval"}
        The split of built-in corpora when `split` is None (a subcommand's documented default).
    max_docs : int, optional
        Stop after this many documents of the mixture.

    Returns
    -------
    Iterator[Document]
        Sources interleaved fewest-characters-first, so every prefix samples all of them.

    Raises
    ------
    CorpusError
        Unknown name, missing file or package, malformed JSONL (on the line it is read), or a source
        with no documents in `split` (when that source is exhausted).
    """
    if split is not None:
        check_split(split)
    check_split(builtin_split)
    if max_docs is not None and max_docs < 1:
        raise CorpusError(f"max_docs must be a positive integer or None, not {max_docs!r}")
    streams = [_split_stream(source, source_split(source, split, builtin_split)) for source in parse_spec(spec)]
    return islice(interleave(streams), max_docs)


def load_corpus(spec: str, *, split: str | None = "all", builtin_split: str = "all",
                max_docs: int | None = None) -> list[Document]:
    """`iter_corpus` as a list; see there for parameters."""
    return list(iter_corpus(spec, split=split, builtin_split=builtin_split, max_docs=max_docs))


def describe_corpus(
    spec: str, *, split: str | None = "all", builtin_split: str = "all", max_docs: int | None = None,
    documents: Iterable[Document] | None = None,
) -> dict[str, Any]:
    """JSON-serialisable description of a corpus spec, with document and character counts.

    Parameters
    ----------
    spec, split, builtin_split, max_docs
        As for `iter_corpus`; each source records the split it was read with.
    documents : iterable of Document, optional
        What was loaded with these arguments, to count instead of reading the corpus again. Without
        it the corpus is read once more (bounded memory); the counts are what `iter_corpus` yields.

    Examples
    --------
    >>> d = describe_corpus("humaneval", split="eval")
    >>> d["sources"][0]["domain"], d["docs"] == d["sources"][0]["docs"]
    ('code', True)
    """
    sources = parse_spec(spec)
    counts = {source.name: [0, 0] for source in sources}  # name -> [docs, characters]
    if documents is None:
        documents = iter_corpus(spec, split=split, builtin_split=builtin_split, max_docs=max_docs)
    for doc in documents:
        if doc.source not in counts:
            raise CorpusError(f"document {doc.doc_id!r} comes from {doc.source!r}, which {spec!r} does not name")
        counts[doc.source][0] += 1
        counts[doc.source][1] += len(doc.text)
    described = [
        {
            "entry": source.entry,
            "source": source.name,
            "kind": source.kind,
            "domain": source.domain,
            "description": source.description,
            "version": source.version,
            "split_namespace": source.split_namespace,
            "split": source_split(source, split, builtin_split),
            "docs": counts[source.name][0],
            "chars": counts[source.name][1],
        }
        for source in sources
    ]
    return {
        "spec": spec,
        "split": split,
        "max_docs": max_docs,
        "split_rule": f"blake2b-64(namespace + '\\x1f' + group) % 1000 < {EVAL_PER_MILLE} -> eval",
        "interleave": "fewest characters emitted first",
        "sources": described,
        "docs": sum(s["docs"] for s in described),
        "chars": sum(s["chars"] for s in described),
    }
