"""User data (text files, directories, JSONL, offline Hugging Face datasets) and every error path."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest

from moescope.corpora import Document, describe_corpus, iter_corpus, load_corpus, split_of
from moescope.errors import CorpusError


def test_text_file_is_one_document_per_block(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbffirst block\r\nstill first\r\n\r\n  \t\n\n\nsecond \xff block\n\n")
    docs = load_corpus(str(path))
    assert docs == [
        Document("notes.txt#0", "first block\nstill first", str(path), "user"),
        Document("notes.txt#1", "second \ufffd block", str(path), "user"),
    ]


def test_directory_is_one_document_per_text_file_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "z.md").write_text("zed\n\nstill the same document")
    (tmp_path / "b" / "deep" / "a.py").write_text("print('a')\n")
    (tmp_path / "b" / "c.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\0\0")  # binary: skipped
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (tmp_path / "empty.txt").write_text("  \n")
    docs = load_corpus(f"{tmp_path}/")
    assert [d.doc_id for d in docs] == ["b/c.txt", "b/deep/a.py", "z.md"]
    assert docs[0].text == "caf\ufffd latin-1"
    assert docs[2].text == "zed\n\nstill the same document"
    assert {d.source for d in docs} == {os.path.normpath(str(tmp_path))}


def test_jsonl_default_and_chosen_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}, {"text": "", "body": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert [(d.doc_id, d.text) for d in load_corpus(str(path))] == [("data.jsonl:1", "alpha"), ("data.jsonl:2", "beta")]
    assert [d.text for d in load_corpus(f"{path}:body")] == ["one", "two", "three"]


def test_domain_prefix_labels_user_data(tmp_path: Path) -> None:
    path = tmp_path / "contracts.jsonl"
    path.write_text(json.dumps({"body": "The party of the first part."}) + "\n")
    docs = load_corpus(f"legal={path}:body,humaneval", max_docs=3)
    assert {(d.source.endswith("contracts.jsonl:body"), d.domain) for d in docs} == {(True, "legal"), (False, "code")}
    assert describe_corpus(f"legal={path}:body")["sources"][0]["domain"] == "legal"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', "{not json"], r"data\.jsonl line 2 is not valid JSON"),
        (['{"text": "ok"}', '["a", "list"]'], r"data\.jsonl line 2 is a JSON list, not an object"),
        (
            ['{"text": "ok"}', "", '{"body": "x", "id": 3}'],
            r"data\.jsonl line 3 has no field 'text' \(it has: 'body', 'id'\)",
        ),
        (['{"text": 7}'], r"data\.jsonl line 1: field 'text' is a int, not a string"),
    ],
)
def test_bad_jsonl_lines_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wikipedia", r"unknown corpus 'wikipedia': use a built-in \(humaneval, python-stdlib, gsm-symbolic, wiki"),
        ("missing/notes.txt", "no such file or directory: missing/notes.txt"),
        ("missing.jsonl:body", "no such file or directory: missing.jsonl"),
        ("humaneval,,wiki", "empty entry"),
        ("", "empty entry"),
        ("hf:only-a-name", r"write hf:NAME\[:CONFIG\]:SPLIT:FIELD"),
    ],
)
def test_bad_specs_fail_before_reading(
    spec: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError, match=message):
        iter_corpus(spec)  # raised at call time, not at first next()


def test_empty_sources_are_errors(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "emptydir").mkdir()
    for spec in (tmp_path / "blank.txt", tmp_path / "emptydir"):
        with pytest.raises(CorpusError, match="holds no documents"):
            load_corpus(str(spec))


def test_split_with_no_documents_says_so(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("a single document")
    assert split_of("text", "one.txt#0") == "train"  # namespace = file kind, group = doc_id
    assert load_corpus(str(path), split="train")
    with pytest.raises(CorpusError, match="has 1 documents but none in the 'eval' split"):
        load_corpus(str(path), split="eval")


def test_moving_a_file_keeps_its_split(tmp_path: Path) -> None:
    text = "\n\n".join(f"paragraph {i}" for i in range(60))
    for where in ("here", "there/deeper"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "notes.txt").write_text(text)
    here = [d.doc_id for d in load_corpus(str(tmp_path / "here" / "notes.txt"), split="eval")]
    there = [d.doc_id for d in load_corpus(str(tmp_path / "there/deeper/notes.txt"), split="eval")]
    assert here and here == there


def test_jsonl_spec_on_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(CorpusError, match="is not a file"):
        load_corpus(str(tmp_path / "d.jsonl"))


def test_hf_without_datasets_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "datasets" else real(m, *a))
    with pytest.raises(CorpusError, match="needs the 'datasets' package.*file.jsonl:FIELD"):
        load_corpus("hf:openai/gsm8k:main:test:question")


class _FakeTable:
    """The slice of datasets.Dataset that read_hf uses."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows
        self.column_names = list(rows[0])

    def select_columns(self, columns: list[str]) -> list[dict[str, object]]:
        return [{c: r[c] for c in columns} for r in self.rows]


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """A stand-in `datasets` module recording each load_dataset call and the offline setting it saw."""
    calls: list[tuple[object, ...]] = []
    module = types.ModuleType("datasets")
    module.config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False, HF_HUB_OFFLINE=False)

    def load_dataset(name: str, config: str | None, *, split: str) -> _FakeTable:
        calls.append((name, config, split, os.environ.get("HF_DATASETS_OFFLINE"), module.config.HF_HUB_OFFLINE))
        if name == "not/cached":
            raise ConnectionError("Couldn't reach 'not/cached' on the Hub (offline mode is enabled)")
        if split == "validation":
            raise ValueError('Unknown split "validation". Should be one of [\'train\', \'test\'].')
        rows = [{"question": "What is 2+2?", "n": 1}, {"question": "", "n": 2}, {"question": "Why?", "n": 3}]
        return _FakeTable(rows)

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: object() if m == "datasets" else real(m, *a))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return calls


def test_hf_loads_offline_and_restores_settings(fake_datasets: list[tuple[object, ...]]) -> None:
    docs = load_corpus("math=hf:openai/gsm8k:main:test:question")
    assert [(d.doc_id, d.text, d.domain) for d in docs] == [
        ("test/0", "What is 2+2?", "math"),
        ("test/2", "Why?", "math"),  # the empty row 1 is skipped
    ]
    assert docs[0].source == "hf:openai/gsm8k:main:test:question"
    assert fake_datasets == [("openai/gsm8k", "main", "test", "1", True)]  # offline during the call
    assert "HF_DATASETS_OFFLINE" not in os.environ  # ...and not after
    assert sys.modules["datasets"].config.HF_HUB_OFFLINE is False
    load_corpus("hf:plain:train:question")
    assert fake_datasets[-1][:3] == ("plain", None, "train")


def test_hf_errors_name_the_problem(fake_datasets: list[tuple[object, ...]]) -> None:
    with pytest.raises(CorpusError, match="not available offline.*offline mode is enabled"):
        load_corpus("hf:not/cached:train:text")
    with pytest.raises(CorpusError, match="Unknown split \"validation\".*check CONFIG and SPLIT"):
        load_corpus("hf:openai/gsm8k:main:validation:question")
    with pytest.raises(CorpusError, match="no field 'text'; its fields are: question, n"):
        load_corpus("hf:openai/gsm8k:main:test:text")
    with pytest.raises(CorpusError, match="row 0 field 'n' is a int"):
        load_corpus("hf:openai/gsm8k:main:test:n")


def test_hf_with_the_real_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    local = tmp_path / "local_dataset"
    local.mkdir()
    (local / "train.jsonl").write_text('{"q": "first"}\n{"q": "second"}\n')
    docs = load_corpus(f"hf:{local}:train:q")
    assert [(d.doc_id, d.text) for d in docs] == [("train/0", "first"), ("train/1", "second")]
    with pytest.raises(CorpusError, match="not available offline"):
        load_corpus("hf:surely-not/cached-anywhere:train:text")
