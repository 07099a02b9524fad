"""The text sets the shipped models are measured on: held-out text of the training domains, and text from outside them."""

from __future__ import annotations

import codecs
import contextlib
import io
import sysconfig
from pathlib import Path

HELD_OUT_SPEC = {"code": "humaneval,python-stdlib", "math": "gsm-symbolic:4000", "prose": "wiki"}


def held_out_texts(split: str = "eval") -> dict[str, list[str]]:
    """Domain -> texts of `split` (``"train"`` gives the training-side comparison)."""
    from moescope.corpora import load_corpus

    return {domain: [d.text for d in load_corpus(spec, split=split)] for domain, spec in HELD_OUT_SPEC.items()}


def out_of_corpus_texts() -> dict[str, list[str]]:
    import click

    from moescope.corpora import load_corpus

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on first import
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    click_files = sorted(Path(click.__file__).parent.glob("*.py"))
    return {
        "news": [d.text for d in load_corpus("news", split="all")],
        "python-license": [(stdlib / "LICENSE.txt").read_text()],
        "zen-of-python": [codecs.decode(this.s, "rot13")],
        "click-source": [p.read_text() for p in click_files],
    }
