"""User data on disk: a text file, a directory of text files, or a JSONL file with a chosen field.

- ``notes.txt`` (any file that is not ``.jsonl``): one document per blank-line-separated block;
  doc_id ``notes.txt#K`` counts the non-empty blocks from 0.
- ``corpus/``: one document per file (the whole file), every non-hidden file below it that is not
  binary (no NUL byte in its first 8 KiB), in sorted order of relative POSIX path, the doc_id.
- ``data.jsonl`` or ``data.jsonl:FIELD``: one document per non-blank line, taken from the string
  field FIELD (default ``text``); doc_id ``data.jsonl:N`` with N the 1-based line number. Lines whose
  text is empty are skipped; a line that is not an object, or lacks the field, is an error.

Bytes that are not UTF-8 (and lone surrogates spelled in JSON) become U+FFFD rather than being refused;
CRLF line ends become LF; a byte-order mark is dropped at the start of a file only. Text
and JSONL files are streamed line by line and directories file by file, so memory is bounded by the
largest document, not the corpus.
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


def _decode(data: bytes, *, first: bool = True) -> str:
    # utf-8-sig drops a BOM (only a file's first line can start with one); CRLF → LF so block splitting
    # and texts do not depend on the platform.
    return data.decode("utf-8-sig" if first else "utf-8", errors="replace").replace("\r\n", "\n")


_SURROGATES = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    """JSON can spell lone UTF-16 surrogates (``"\\ud800"``), which are not text: U+FFFD, like bad bytes."""
    return _SURROGATES.sub("\ufffd", text)


def read_text_blocks(path: Path, *, source: str, domain: str) -> Iterator[Item]:
    """One document per blank-line-separated block of a text file, streamed line by line."""
    block: list[str] = []
    k = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f):
            line = _decode(raw, first=lineno == 0).rstrip("\r\n")
            if line.strip():
                block.append(line)
                continue
            if block:
                yield _block_item(path, k, block, source, domain)
                block, k = [], k + 1
        if block:
            yield _block_item(path, k, block, source, domain)


def _block_item(path: Path, k: int, lines: list[str], source: str, domain: str) -> Item:
    doc_id = f"{path.name}#{k}"
    return doc_id, Document(doc_id, "\n".join(lines).strip(), source, domain)


def text_files(root: Path) -> list[str]:
    """Sorted relative POSIX paths of the non-hidden regular files below `root`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            path = Path(dirpath, filename)
            if not filename.startswith(".") and path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def read_directory(root: Path, *, source: str, domain: str) -> Iterator[Item]:
    """One document per text file below `root`, whole-file, in sorted relative-path order."""
    for rel in text_files(root):
        data = (root / rel).read_bytes()
        if b"\0" in data[:_BINARY_PROBE_BYTES]:
            continue  # images, archives, compiled files: not text
        text = _decode(data)
        if text.strip():
            yield rel, Document(rel, text, source, domain)


def read_jsonl(path: Path, field: str, *, source: str, domain: str) -> Iterator[Item]:
    """One document per JSON object line, its text taken from `field`."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, first=lineno == 1).strip()
            if not line:
                continue
            where = f"{path.name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where} is not valid JSON ({err.msg}); fix or remove that line") from None
            except (ValueError, RecursionError):  # a number of over 4300 digits; nesting deeper than Python's stack
                raise CorpusError(f"{where} is JSON this reader cannot take (a huge number or deep nesting); "
                                  "fix or remove that line") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{where} is a JSON {type(obj).__name__}, not an object; each line must be {{...}}")
            if field not in obj:
                fields = ", ".join(map(repr, obj)) or "none"  # repr: a key may hold a newline
                raise CorpusError(
                    f"{where} has no field {field!r} (it has: {fields}); choose one with {path.name}:FIELD"
                )
            if not isinstance(obj[field], str):
                raise CorpusError(f"{where}: field {field!r} is a {type(obj[field]).__name__}, not a string")
            if not obj[field].strip():
                continue  # an empty text has no tokens to route
            doc_id = f"{path.name}:{lineno}"
            yield doc_id, Document(doc_id, _without_surrogates(obj[field]), source, domain)
