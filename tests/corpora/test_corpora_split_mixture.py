"""Train/eval splits are disjoint, stable and group-aware; mixtures keep domains and stay balanced."""

from __future__ import annotations

import pytest

from moescope.corpora import Document, load_corpus, split_of
from moescope.corpora.mixture import interleave
from moescope.errors import CorpusError

MIXTURE = "humaneval,gsm-symbolic:300,news"

# Pinned: if the hash or the split rule changes, models trained on "train" would be scored on
# text they saw. Change these only together with a note that old train/eval results are void.
HUMANEVAL_EVAL_IDS = [
    14, 15, 16, 17, 21, 25, 36, 43, 51, 52, 94, 97, 120, 123, 124, 132, 135, 146, 154, 158, 163,
]


def _keys(docs: list[Document]) -> set[tuple[str, str]]:
    return {(d.source, d.doc_id) for d in docs}


def test_split_is_pinned() -> None:
    assert [d.doc_id for d in load_corpus("humaneval", split="eval")] == [
        f"HumanEval/{i}" for i in HUMANEVAL_EVAL_IDS
    ]
    assert split_of("humaneval", "HumanEval/14") == "eval"
    assert split_of("humaneval", "HumanEval/0") == "train"


def test_splits_are_disjoint_and_cover_the_corpus() -> None:
    everything = load_corpus(MIXTURE)
    train = load_corpus(MIXTURE, split="train")
    evaluation = load_corpus(MIXTURE, split="eval")
    assert not _keys(train) & _keys(evaluation)
    assert _keys(train) | _keys(evaluation) == _keys(everything)
    assert 0.04 < len(evaluation) / len(everything) < 0.2
    for source in ("humaneval", "gsm-symbolic", "news"):  # every source is held out from, not just one
        assert any(d.source == source for d in evaluation)


def test_split_does_not_depend_on_the_mixture_or_max_docs() -> None:
    alone = _keys(load_corpus("humaneval", split="eval"))
    mixed = {k for k in _keys(load_corpus(MIXTURE, split="eval")) if k[0] == "humaneval"}
    assert alone == mixed
    assert _keys(load_corpus("gsm-symbolic:100", split="eval")) <= _keys(load_corpus("gsm-symbolic:300", split="eval"))


def test_unknown_split_is_a_corpus_error() -> None:
    with pytest.raises(CorpusError, match="train, eval, all"):
        load_corpus("humaneval", split="test")


def test_mixture_keeps_domains_and_reaches_every_source_early() -> None:
    docs = load_corpus(MIXTURE, max_docs=12)
    assert len(docs) == 12
    assert {d.source for d in docs} == {"humaneval", "gsm-symbolic", "news"}
    expected = {"humaneval": "code", "gsm-symbolic": "math", "news": "prose"}
    assert all(d.domain == expected[d.source] for d in docs)
    assert docs == load_corpus(MIXTURE, max_docs=12)


def test_mixture_is_balanced_by_characters() -> None:
    docs = load_corpus("humaneval,news", max_docs=200)
    chars = {"humaneval": 0, "news": 0}
    longest = max(len(d.text) for d in docs)
    for doc in docs:  # at every prefix, the sources are within one document of each other
        chars[doc.source] += len(doc.text)
        assert abs(chars["humaneval"] - chars["news"]) <= longest


def test_interleave_drops_exhausted_streams_and_breaks_ties_by_order() -> None:
    a = [Document("a0", "xx", "a", "code")]
    b = [Document(f"b{i}", "y", "b", "math") for i in range(3)]
    assert [d.doc_id for d in interleave([iter(a), iter(b)])] == ["a0", "b0", "b1", "b2"]
    assert list(interleave([])) == []


@pytest.mark.parametrize("max_docs", [0, -3])
def test_bad_max_docs_is_a_corpus_error(max_docs: int) -> None:
    with pytest.raises(CorpusError, match="max_docs"):
        load_corpus("humaneval", max_docs=max_docs)


def test_duplicate_entry_is_a_corpus_error() -> None:
    with pytest.raises(CorpusError, match="listed twice"):
        load_corpus("humaneval,news,humaneval")
