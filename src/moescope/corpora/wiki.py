"""Plain-prose paragraphs from a MediaWiki XML dump (the Wikipedia sample shipped in gensim's test data).

The dump is streamed (bz2 → XML events), one page in memory at a time. Wiki markup is removed with
a small set of rules aimed at keeping running prose, not at rendering pages: templates, tables,
references, files, categories and lists are dropped; links keep their visible text. A paragraph is
kept only if it is long enough and ends like a sentence, which discards captions, headings and the
debris of constructs the rules do not understand.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

MIN_PARAGRAPH_CHARS = 200  # shorter blocks are mostly headings, captions and stubs
_SENTENCE_END = (".", "!", "?", '"', "”", ")")

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROPPED_TAGS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|chem)\b.*?</\1\s*>", re.S | re.I
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}; applied until none is left
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost {| ... |}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,5}")
_NON_ARTICLE_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:])(?=\s|$)")


def _remove_innermost(pattern: re.Pattern[str], text: str, repl: str = "") -> str:
    """Apply `pattern` until the text stops changing (nested constructs are removed inside out)."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    """``[[target|label]]`` → label, ``[[target]]`` → target; files, categories, interwiki → nothing."""
    inner = match.group(1)
    if _NON_ARTICLE_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def strip_markup(wikitext: str) -> str:
    """Turn wikitext into plain text, paragraphs separated by blank lines.

    Examples
    --------
    >>> strip_markup("'''Albedo''' is the [[diffuse reflection|diffuse reflectivity]]{{sfn|X}}.")
    'Albedo is the diffuse reflectivity.'
    """
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _DROPPED_TAGS.sub("", text)
    text = _remove_innermost(_TEMPLATE, text)
    text = _remove_innermost(_TABLE, text)
    text = _remove_innermost(_LINK, text, _link_text)  # type: ignore[arg-type]
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = html.unescape(text)
    lines = []
    for line in text.splitlines():
        line = _SPACES.sub(" ", line).strip()
        # Headings, list items, indents, table and template debris are not running prose.
        if line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):
            line = ""
        lines.append(line)
    return "\n".join(lines).strip()


def paragraphs(wikitext: str) -> list[str]:
    """Prose paragraphs of one article: blank-line-separated blocks, lines joined, filtered."""
    blocks = re.split(r"\n\s*\n", strip_markup(wikitext))
    kept = []
    for block in blocks:
        para = " ".join(block.split())
        # Removed templates and refs leave "word ." and "()" behind.
        para = _SPACE_BEFORE_PUNCT.sub(r"\1", para.replace(" ()", "").replace("()", ""))
        if len(para) >= MIN_PARAGRAPH_CHARS and para.endswith(_SENTENCE_END):
            kept.append(para)
    return kept


def iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` for each main-namespace, non-redirect page of a .xml.bz2 dump."""
    with bz2.open(dump, "rb") as stream:
        title, namespace, redirect = "", "", False
        for _, elem in ET.iterparse(stream, events=("end",)):
            tag = elem.tag.rpartition("}")[2]  # drop the "{http://www.mediawiki.org/xml/export-0.10/}"
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                namespace = elem.text or ""
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                if namespace == "0" and not redirect:
                    yield title, elem.text or ""
            elif tag == "page":
                title, namespace, redirect = "", "", False
                elem.clear()  # memory stays one page, not the whole dump
