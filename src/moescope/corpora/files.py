"""User data on disk: a text file, a directory of text files, or a JSONL file with a chosen field.

- ``notes.txt`` (any file that is not ``.jsonl``): one document per blank-line-separated block;
  doc_id ``notes.txt#K`` counts the non-empty blocks from 0.
- ``corpus/``: one document per file (the whole file), every non-hidden file below it that is not
  binary (no NUL byte in its first 8 KiB), in sorted order of relative POSIX path, the doc_id.
- ``data.jsonl`` or ``data.jsonl:FIELD``: one document per non-blank line, taken from the string
  field FIELD (default ``text``); doc_id ``data.jsonl:N`` with N the 1-based line number. Lines whose
  text is empty are skipped; a line that is not an object, or lacks the field, is an error.

Bytes that are not UTF-8 are decoded as U+FFFD rather than refused. Files are read one at a time, so a
large directory costs the memory of its largest file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from moescope.corpora.document import Document, Item
from moescope.errors import CorpusError

_BINARY_PROBE_BYTES = 8192
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _decode(data: bytes) -> str:
    # utf-8-sig drops a BOM; CRLF → LF so block splitting and texts do not depend on the platform.
    return data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n")


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(_BINARY_PROBE_BYTES)


def read_text_blocks(path: Path, *, source: str, domain: str) -> Iterator[Item]:
    """One document per blank-line-separated block of a text file."""
    blocks = (b.strip() for b in _BLANK_LINE.split(_decode(path.read_bytes())))
    for k, block in enumerate(b for b in blocks if b):
        doc_id = f"{path.name}#{k}"
        yield doc_id, Document(doc_id, block, source, domain)


def text_files(root: Path) -> list[str]:
    """Sorted relative POSIX paths of the non-hidden regular files below `root`, binary ones excluded."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            path = Path(dirpath, filename)
            if not filename.startswith(".") and path.is_file() and not _is_binary(path):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def read_directory(root: Path, *, source: str, domain: str) -> Iterator[Item]:
    """One document per text file below `root`, whole-file, in sorted relative-path order."""
    for rel in text_files(root):
        text = _decode((root / rel).read_bytes())
        if text.strip():
            yield rel, Document(rel, text, source, domain)


def read_jsonl(path: Path, field: str, *, source: str, domain: str) -> Iterator[Item]:
    """One document per JSON object line, its text taken from `field`."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw).strip()
            if not line:
                continue
            where = f"{path.name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where} is not valid JSON ({err.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{where} is a JSON {type(obj).__name__}, not an object; each line must be {{...}}")
            if field not in obj:
                fields = ", ".join(map(str, obj)) or "none"
                raise CorpusError(
                    f"{where} has no field {field!r} (it has: {fields}); choose one with {path.name}:FIELD"
                )
            if not isinstance(obj[field], str):
                raise CorpusError(f"{where}: field {field!r} is a {type(obj[field]).__name__}, not a string")
            if not obj[field].strip():
                continue  # an empty text has no tokens to route
            doc_id = f"{path.name}:{lineno}"
            yield doc_id, Document(doc_id, obj[field], source, domain)
