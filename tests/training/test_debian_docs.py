"""The training-only prose reader: HTML and troff to text, dpkg's file lists, the fixed split, missing packages."""

from __future__ import annotations

import gzip

import pytest

from moescope.errors import CorpusError
from training import debian_docs

INSTALLED = all((debian_docs.DPKG_INFO / f"{p}.list").is_file() for p in debian_docs.PACKAGES)
needs_packages = pytest.mark.skipif(not INSTALLED, reason=f"needs: {debian_docs.INSTALL_HINT}")


def test_html_keeps_the_main_body_and_drops_navigation_scripts_and_permalinks():
    page = """<html><head><title>T</title><style>p {}</style></head><body>
    <div class="related"><a href="x">next</a></div>
    <div class="body" role="main"><h1>Classes<a class="headerlink" href="#c">\u00b6</a></h1>
    <p>Classes   bundle
    data &amp; functionality.</p><pre>class A:
    pass</pre><script>var x = 1;</script><p>Fin.</p></div>
    <div class="footer">© PSF</div></body></html>"""
    assert debian_docs.html_to_text(page, keep="main") == "Classes\nClasses bundle data & functionality.\nclass A:\n    pass\nFin."


def test_html_without_a_main_role_keeps_the_page_but_not_docbook_navigation():
    page = '<div class="navheader">Prev Next</div><div class="chapter"><p>Debian is <b>free</b>.</p></div>'
    assert debian_docs.html_to_text(page) == "Debian is free."


def test_troff_becomes_sections_and_paragraphs():
    page = "\n".join([
        '.\\" a comment', ".TH OPEN 2", ".SH NAME", "open \\- open a file", ".SH DESCRIPTION",
        "The call", ".BR open ()", "returns a", ".I file descriptor", "\\(em a small integer.", ".PP",
        "See \\fBclose\\fP(2).",
    ])
    assert debian_docs.troff_to_text(page) == (
        "NAME\n\nopen - open a file\n\nDESCRIPTION\n\nThe call open() returns a file descriptor - a small integer."
        "\n\nSee close(2)."
    )


def test_missing_packages_are_named_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(debian_docs, "DPKG_INFO", tmp_path)
    with pytest.raises(CorpusError, match="apt-get install -y python3.11-doc debian-reference-en manpages manpages-dev"):
        debian_docs.debian_docs_texts()
    with pytest.raises(CorpusError, match="'manpages'"):
        debian_docs.package_files("manpages")


@needs_packages
def test_installed_debian_reference_reads_as_prose_and_splits_disjointly(monkeypatch):
    monkeypatch.setattr(debian_docs, "PACKAGES", ("debian-reference-en",))
    train, held_out = debian_docs.debian_docs_texts("train"), debian_docs.debian_docs_texts("eval")
    assert train and not set(train) & set(held_out)
    text = "\n".join(train)
    assert "I think learning a computer system is like learning a new foreign language." in text
    assert 'class="' not in text and "<td" not in text  # no markup left
    assert debian_docs.debian_docs_texts("train") == train  # the same pages in the same order every time


@needs_packages
def test_installed_man_page_has_no_troff_left():
    page = next(p for p in debian_docs.package_files("manpages-dev") if p.name == "open.2.gz")
    text = debian_docs.troff_to_text(gzip.decompress(page.read_bytes()).decode())
    assert text.startswith("NAME\n\nopen, openat, creat - open and possibly create a file")
    assert "\\f" not in text and "\n.SH" not in text and "O_CREAT" in text


def test_docstring_examples_run():
    import doctest

    from training import targets

    for module in (debian_docs, targets):
        assert doctest.testmod(module).failed == 0


def test_installed_versions_are_read_from_dpkg_status_for_installed_packages_only(monkeypatch, tmp_path):
    info = tmp_path / "info"
    info.mkdir()
    (info / "manpages.list").write_text("/usr/share/man/man1/x.1.gz\n")
    (tmp_path / "status").write_text("Package: manpages\nStatus: install ok installed\nVersion: 6.03-2\n\n"
                                     "Package: manpages-dev\nVersion: 6.03-2\n\n"  # no .list: not installed
                                     "Package: python3.11-docx\nVersion: 9\n")
    monkeypatch.setattr(debian_docs, "DPKG_INFO", info)
    assert debian_docs.installed_versions() == {"python3.11-doc": None, "debian-reference-en": None,
                                                "manpages": "6.03-2", "manpages-dev": None}
