"""Property-based: the corpus readers (text file, JSONL, directory) on arbitrary bytes, odd JSON and Unicode
edge cases either yield documents of non-empty text the tokenizer accepts, or stop with one CorpusError."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moescope.corpora import load_corpus
from moescope.errors import CorpusError, MoescopeError

# Unicode that has broken text pipelines: BOMs, lone surrogates, separators, combining marks, NUL, CR
EDGE_TEXT = ["\ufeff", "\ud800", "\udfff", "\u2028", "\u2029", "\x85", "\r", "\r\n", "\x00", "e\u0301", "\U0001f600",
             "\uffff", "\x1b[31m", " ", "\t", "\n\n", "𝔘𝔫𝔦"]
edge_text = st.lists(st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=8)), max_size=12).map("".join)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), edge_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(edge_text, inner, max_size=3)), max_leaves=6,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _tokenizable(docs, tokenizer) -> None:
    for doc in docs:
        assert isinstance(doc.text, str) and doc.text.strip()
        doc.text.encode("utf-8")  # no lone surrogates: every later step (tokenizer, sha1, Parquet) needs UTF-8
        tokenizer(doc.text, add_special_tokens=False)


def _load(spec: str, tokenizer):
    """The documents, or None after one CorpusError (any other exception fails the test)."""
    try:
        docs = load_corpus(spec)
    except MoescopeError as err:
        assert isinstance(err, CorpusError) and str(err) and "\n" not in str(err), err
        return None
    _tokenizable(docs, tokenizer)
    return docs


def _case(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / uuid.uuid4().hex
    path.mkdir()
    return path


def _decoded_lines(data: bytes) -> list[str]:
    """The file as the README promises to read it: UTF-8 (U+FFFD for bad bytes), a leading BOM dropped, CRLF as LF."""
    return [line.rstrip("\r") for line in data.decode("utf-8", "replace").removeprefix("\ufeff").split("\n")]


def expected_blocks(data: bytes) -> list[str]:
    blocks, block = [], []
    for line in [*_decoded_lines(data), ""]:
        if line.strip():
            block.append(line)
        elif block:
            blocks.append("\n".join(block).strip())
            block = []
    return blocks


def expected_jsonl(data: bytes, field: str) -> list[str] | None:
    """The texts, or None where a line must be refused."""
    texts = []
    for line in _decoded_lines(data):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            return None
        if obj[field].strip():
            texts.append(re.sub("[\ud800-\udfff]", "\ufffd", obj[field]))  # lone surrogates: not text
    return texts


@given(data=st.one_of(st.binary(max_size=400), edge_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_text_file_of_arbitrary_bytes(tmp_path_factory, tokenizer, data):
    path = _case(tmp_path_factory) / "notes.txt"
    path.write_bytes(data)
    docs = _load(str(path), tokenizer)
    expected = expected_blocks(data)
    assert (docs is None) == (expected == [])  # the only error: no documents at all
    assert docs is None or [d.text for d in docs] == expected


@given(lines=st.lists(st.one_of(json_values.map(lambda v: json.dumps(v, ensure_ascii=False)), edge_text,
                                st.dictionaries(st.sampled_from(["text", "body"]), json_values, max_size=2)
                                .map(lambda v: json.dumps(v, ensure_ascii=False))), max_size=6),
       field=st.sampled_from(["text", "body"]))
def test_jsonl_file_of_odd_json(tmp_path_factory, tokenizer, lines, field):
    path = _case(tmp_path_factory) / "data.jsonl"
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    docs = _load(f"{path}:{field}", tokenizer)
    expected = expected_jsonl(data, field)
    assert (docs is None) == (expected is None or expected == []), (docs, expected)
    assert docs is None or [d.text for d in docs] == expected


@given(files=st.dictionaries(st.text(alphabet=st.characters(blacklist_characters="/\0", codec="utf-8"), min_size=1, max_size=8),
                             st.one_of(st.binary(max_size=100), edge_text.map(lambda t: t.encode("utf-8", "surrogatepass"))),
                             max_size=5))
def test_directory_of_arbitrary_files(tmp_path_factory, tokenizer, files):
    root = _case(tmp_path_factory) / "corpus"
    root.mkdir()
    files = {name: data for name, data in files.items() if name not in (".", "..")}
    for name, data in files.items():
        (root / name).write_bytes(data)
    docs = _load(str(root), tokenizer)
    expected = [(name, data.decode("utf-8", "replace").removeprefix("\ufeff").replace("\r\n", "\n"))
                for name, data in sorted(files.items()) if not name.startswith(".") and b"\0" not in data]
    expected = [(name, text) for name, text in expected if text.strip()]
    assert (docs is None) == (expected == [])
    assert docs is None or [(d.doc_id, d.text) for d in docs] == expected


@pytest.mark.parametrize("name, data", [
    ("empty.txt", b""), ("blank.txt", b"\n \n\t\n"), ("bom.txt", b"\xef\xbb\xbf"), ("nul.txt", b"\x00\x00"),
    ("surrogate.jsonl", b'{"text": "\\ud800 lone"}'), ("deep.jsonl", b"[" * 100_000),
    ("bignum.jsonl", b'{"text": "a", "n": ' + b"1" * 5000 + b"}"), ("latin1.txt", "café".encode("latin-1")),
    ("crlf.txt", b"a\r\nb\r\n\r\nc"), ("nontext.jsonl", b'{"text": 3}'), ("list.jsonl", b"[1, 2]"),
])
def test_edge_cases(tmp_path, tokenizer, name, data):
    (tmp_path / name).write_bytes(data)
    spec = str(tmp_path / name)
    _load(spec, tokenizer)
