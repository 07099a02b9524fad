"""Corpus specs: the text after ``--data``, parsed into sources that know how to read themselves.

A spec is a comma-separated list of entries; each entry is one of

- a built-in name (``humaneval``, ``gsm-symbolic:500``...; see `BUILTIN_CORPORA`), which wins over a
  file of the same name (write ``./wiki`` for the file);
- ``hf:NAME[:CONFIG]:SPLIT:FIELD``, a Hugging Face dataset available offline;
- ``PATH.jsonl`` or ``PATH.jsonl:FIELD``, a directory, or any other file (see `files.py`);

optionally prefixed by ``DOMAIN=`` to label user data (``legal=contracts.jsonl:body``); without it
user data is labelled ``user``. Commas cannot appear inside an entry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moescope.corpora import builtin, files, hf
from moescope.corpora.document import USER, Item
from moescope.errors import CorpusError

_DOMAIN_PREFIX = re.compile(r"^([a-z][a-z0-9_-]*)=(.+)$")
_JSONL = re.compile(r"^(.*\.jsonl)(?::([^:/\\]+))?$")
_KIND_DESCRIPTIONS = {
    "text": "a text file, one document per blank-line-separated block",
    "directory": "a directory, one document per text file",
    "jsonl": "a JSONL file, one document per line",
    "hf": "a Hugging Face dataset split read offline",
}


@dataclass(frozen=True)
class Source:
    """One entry of a spec, ready to read.

    `name` is the ``source`` of every document it yields: a built-in name, a normalised path or the
    ``hf:`` spec. `split_namespace` is hashed with each document's split group (split.py): the name
    for built-ins and ``hf:``, the kind for files, so moving a file does not move its documents
    between train and eval (its groups, relative paths and file names, are location-free).
    """

    entry: str  # the entry as written, domain prefix included
    name: str
    kind: str  # "builtin" | "text" | "directory" | "jsonl" | "hf"
    domain: str
    description: str
    version: str | None
    split_namespace: str
    read: Callable[[], Iterator[Item]] = field(compare=False, repr=False)


def parse_spec(spec: str) -> list[Source]:
    """Parse a comma-separated corpus spec; every error is raised here, before any text is read."""
    entries = [entry.strip() for entry in spec.split(",")]
    if not spec.strip() or not all(entries):
        raise CorpusError(f"corpus spec {spec!r} has an empty entry; write e.g. humaneval,gsm-symbolic,wiki")
    sources = [parse_entry(entry) for entry in entries]
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise CorpusError(f"corpus {source.name!r} is listed twice in {spec!r}; list each once")
        seen.add(source.name)
    return sources


def parse_entry(entry: str) -> Source:
    """Parse one entry (no commas) into a Source."""
    domain, body = None, entry
    prefixed = _DOMAIN_PREFIX.match(entry)
    if prefixed and not os.path.exists(entry):
        domain, body = prefixed.group(1), prefixed.group(2)
    if body.startswith("hf:"):
        hf.parse_hf(body)
        hf.check_datasets_installed(body)
        return Source(
            entry=entry, name=body, kind="hf", domain=domain or USER, description=_KIND_DESCRIPTIONS["hf"],
            version=None, split_namespace=body, read=lambda: hf.read_hf(body, domain=domain or USER),
        )
    name, sep, text_arg = body.partition(":")
    if name in builtin.BUILTIN_CORPORA:
        arg = text_arg if sep else None
        builtin.check_builtin(name, arg)
        info = builtin.BUILTIN_CORPORA[name]
        return Source(
            entry=entry, name=name, kind="builtin", domain=domain or info.domain, description=info.description,
            version=builtin.builtin_version(name), split_namespace=name, read=lambda: builtin.read_builtin(name, arg),
        )
    return _parse_path(entry, body, domain or USER)


def _parse_path(entry: str, body: str, domain: str) -> Source:
    jsonl = _JSONL.match(body)
    path_text, field_name = (jsonl.group(1), jsonl.group(2) or "text") if jsonl else (body, None)
    path = Path(path_text)
    if not path.exists():
        if os.sep in path_text or "/" in path_text or "." in path_text:
            raise CorpusError(f"no such file or directory: {path_text}")
        raise builtin.unknown_corpus(path_text)
    name = os.path.normpath(path_text) + (f":{field_name}" if field_name else "")
    if field_name is not None:
        if not path.is_file():
            raise CorpusError(f"{path_text} is not a file; a .jsonl spec names one JSONL file")
        kind, description = "jsonl", f"{_KIND_DESCRIPTIONS['jsonl']}, field {field_name!r}"
        read = lambda: files.read_jsonl(path, field_name, source=name, domain=domain)  # noqa: E731
    elif path.is_dir():
        kind, description = "directory", _KIND_DESCRIPTIONS["directory"]
        read = lambda: files.read_directory(path, source=name, domain=domain)  # noqa: E731
    else:
        kind, description = "text", _KIND_DESCRIPTIONS["text"]
        read = lambda: files.read_text_blocks(path, source=name, domain=domain)  # noqa: E731
    # Files hash by kind, not path: moving a file keeps each document on its side of the split.
    return Source(
        entry=entry, name=name, kind=kind, domain=domain, description=description, version=None,
        split_namespace=kind, read=read,
    )
