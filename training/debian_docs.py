"""English prose from Debian documentation packages, for TRAINING the shipped models only.

Not a built-in corpus: the corpora users evaluate on stay installable with pip. This reader serves
`training.train`, which needs far more prose than gensim's Wikipedia sample holds:

- ``python3.11-doc``: the Python 3.11 documentation (Sphinx HTML; the ``role="main"`` body of each
  page; the generated indexes, search page and module index are skipped);
- ``debian-reference-en``: the Debian Reference (DocBook HTML, navigation headers/footers dropped);
- ``manpages``, ``manpages-dev``: the Linux man-pages project (troff; macros and font escapes removed).

Which files belong to a package is read from dpkg's own list (``/var/lib/dpkg/info/<package>.list``),
so other installed packages never leak in. HTML becomes text with the standard library's
`html.parser`: block elements end lines, whitespace is collapsed except inside ``<pre>``.
One document per page; its split group is ``package/path``, hashed by moescope's fixed split, so the
same pages are held out on every machine.

Install with ``apt-get install -y python3.11-doc debian-reference-en manpages manpages-dev``.

Examples
--------
>>> html_to_text('<div class="body" role="main"><h1>Hi</h1><p>One  two.</p><pre>a\\n  b</pre></div>',
...              keep="main")
'Hi\\nOne two.\\na\\n  b'
>>> troff_to_text(".SH NAME\\nopen \\\\- open a file\\n.B flags\\nare \\\\fIbits\\\\fP.")
'NAME\\n\\nopen - open a file flags are bits.'
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from moescope.corpora.split import split_of
from moescope.errors import CorpusError

PACKAGES = ("python3.11-doc", "debian-reference-en", "manpages", "manpages-dev")
INSTALL_HINT = "apt-get install -y " + " ".join(PACKAGES)
DPKG_INFO = Path("/var/lib/dpkg/info")
NAMESPACE = "debian-docs"
MIN_DOC_CHARS = 400
_SKIPPED_PYDOC = re.compile(r"/(genindex[^/]*|search|py-modindex|contents)\.html$")
_BLOCK = frozenset("p div pre li ul ol dl dt dd h1 h2 h3 h4 h5 h6 tr table br blockquote section title".split())
_DROPPED = frozenset("script style head".split())
_DROPPED_CLASSES = frozenset("navheader navfooter related sphinxsidebar footer headerlink toc".split())


class _TextParser(HTMLParser):
    """Collects text; `keep="main"` only inside the element with role="main" (Sphinx pages)."""

    def __init__(self, keep: str | None):
        super().__init__(convert_charrefs=True)
        self.keep, self.parts, self.stack = keep, [], []  # stack: (tag, dropped, main, pre) per open element

    def _state(self) -> tuple[bool, bool, bool]:
        return self.stack[-1][1:] if self.stack else (False, self.keep is None, False)

    def handle_starttag(self, tag, attrs):
        dropped, main, pre = self._state()
        attrs = dict(attrs)
        dropped = dropped or tag in _DROPPED or bool(_DROPPED_CLASSES & set((attrs.get("class") or "").split()))
        main = main or attrs.get("role") == self.keep
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag not in ("br", "img", "meta", "link", "hr", "input"):  # void elements never close
            self.stack.append((tag, dropped, main, pre or tag == "pre"))

    def handle_endtag(self, tag):
        while self.stack:  # close up to the matching tag (HTML in the wild leaves some open)
            if self.stack.pop()[0] == tag:
                break
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        dropped, main, pre = self._state()
        if main and not dropped:
            self.parts.append(data if pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str, keep: str | None = None) -> str:
    """Visible text of an HTML page, one block per line; `keep`: only inside role=`keep`."""
    parser = _TextParser(keep)
    parser.feed(html)
    parser.close()
    lines = (line.rstrip() for line in "".join(parser.parts).split("\n"))
    text = "\n".join(line if line.startswith(" ") and line.strip() else line.strip() for line in lines)
    text = re.sub(r"[ \t]*\u00b6", "", text)  # Sphinx permalink pilcrows
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"\n(?=\n)", "\n", text)).strip("\n").replace("\n\n", "\n")


_TROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\((em|en)"), "-"),
                  (re.compile(r"\\\((aq|cq|oq)"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
                  (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""), (re.compile(r"\\[-e]"), lambda m: "-" if m[0] == "\\-" else "\\"),
                  (re.compile(r"\\[&|^~0 ]"), " "), (re.compile(r"\\\*\(..|\\\*."), ""), (re.compile(r"\\[sn]\S?\d?"), "")]
_PARAGRAPH_MACROS = frozenset(".PP .LP .P .TP .IP .SS .SH .HP .RS .RE .sp .TH .nf .fi .in .br .ad .na".split())
_FONT_MACROS = frozenset(".B .I .R .BR .BI .IB .IR .RB .RI .SM .SB".split())


def troff_to_text(source: str) -> str:
    """Readable text of a man page: section headings and paragraphs, macros and font escapes gone."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in (".SH", ".SS"):
                out += ["\n\n", rest.strip('"'), "\n\n"]
            elif macro in _PARAGRAPH_MACROS:
                out.append("\n\n" if macro in (".PP", ".LP", ".P", ".TP", ".IP", ".HP") else "")
                if macro == ".IP" and rest:
                    out.append(rest.split('"')[1] if rest.startswith('"') else rest.split()[0])
            elif macro in _FONT_MACROS:
                words = re.findall(r'"([^"]*)"|(\S+)', rest)
                joiner = " " if macro in (".B", ".I", ".R", ".SM", ".SB") else ""
                out.append(joiner.join(a or b for a, b in words))
            continue  # other requests (.de, .if, .TS tables...) carry no prose
        out.append(line)
    text = " ".join(out)
    for pattern, repl in _TROFF_ESCAPES:
        text = pattern.sub(repl, text)
    text = re.sub(r"[ \t]+", " ", text).replace("\\", "")
    paragraphs = (p.strip() for p in re.split(r"\s*\n\n\s*", text))
    return "\n\n".join(p for p in paragraphs if p)


def package_files(package: str) -> list[Path]:
    """The regular files dpkg installed for `package`, sorted; raises CorpusError if it is not installed."""
    listing = DPKG_INFO / f"{package}.list"
    if not listing.is_file():
        raise CorpusError(f"training needs the Debian package {package!r}, which is not installed; run: {INSTALL_HINT}")
    return sorted(p for p in map(Path, listing.read_text().split("\n")) if p.suffix and p.is_file())


def _pages(package: str) -> Iterator[tuple[str, str]]:
    """(group, text) of every page of one package, in path order."""
    for path in package_files(package):
        name = str(path)
        if package == "python3.11-doc" and name.endswith(".html") and not _SKIPPED_PYDOC.search(name):
            yield name, html_to_text(path.read_text(errors="replace"), keep="main")
        elif package == "debian-reference-en" and name.endswith(".en.html") and "/index." not in name:
            yield name, html_to_text(path.read_text(errors="replace"))
        elif package.startswith("manpages") and "/man/man" in name and name.endswith(".gz"):
            source = gzip.decompress(path.read_bytes()).decode(errors="replace")
            if not source.lstrip().startswith(".so "):  # a one-line redirect to another page
                yield name, troff_to_text(source)


def installed_versions() -> dict[str, str | None]:
    """Package -> the version dpkg installed (None if not installed): the documentation's text depends on it."""
    versions, package = dict.fromkeys(PACKAGES), None
    status = DPKG_INFO.parent / "status"
    for line in (status.read_text(errors="replace").splitlines() if status.is_file() else []):
        if line.startswith("Package: "):
            package = line.removeprefix("Package: ").strip()
        elif line.startswith("Version: ") and package in versions and is_installed(package):
            versions[package] = line.removeprefix("Version: ").strip()
    return versions


def is_installed(package: str) -> bool:
    return (DPKG_INFO / f"{package}.list").is_file()


def check_installed() -> None:
    """Raise CorpusError in one line naming the apt command when any package is missing."""
    missing = [p for p in PACKAGES if not is_installed(p)]
    if missing:
        raise CorpusError(f"training needs Debian packages {', '.join(missing)} (not installed); run: {INSTALL_HINT}")


def debian_docs_texts(split: str = "train") -> list[str]:
    """Texts of `split` ("train" or "eval") of every package, in package then path order."""
    check_installed()
    return [text for package in PACKAGES for group, text in _pages(package)
            if len(text) >= MIN_DOC_CHARS and split_of(NAMESPACE, f"{package}/{group}") == split]
