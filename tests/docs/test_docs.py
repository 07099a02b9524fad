"""The documentation site builds with `mkdocs build --strict`, and every command and code block of the getting-started
page and the guides runs as written (a block that cannot run here is marked `<!-- not run: why -->`)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
RUN_PAGES = [DOCS / "getting-started.md", *sorted((DOCS / "guides").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
RUNNABLE = ("bash", "python")


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, why it is not run or None) of every fenced block of `page`, in order."""
    return [(m["lang"], m["body"], m["why"]) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install 'moescope[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("capture", "analyze", "placement", "offload", "report", "top"):
        assert f"moescope {command}" in cli  # the generated reference holds every subcommand's help
    models = (tmp_path / "site" / "models" / "index.html").read_text(encoding="utf-8")
    assert "deepseek_v3" in models and "qwen3_moe" in models


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.stem)
def test_every_block_is_runnable_output_or_says_why_not(page):
    found = blocks(page)
    assert found, f"{page.name} has no code blocks"
    for lang, body, why in found:
        assert lang in (*RUNNABLE, "text"), f"{page.name}: a ```{lang or '(no language)'} block: use bash, python or text"
        assert why is None or why.strip(), f"{page.name}: a not-run block must say why"


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.stem)
def test_the_page_runs_as_written(page, tmp_path):
    """Each page's blocks in order, in one fresh folder, with the environment's `moescope` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    ran = 0
    for lang, body, why in blocks(page):
        if lang not in RUNNABLE or why is not None:
            continue
        command = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{page.name}: this block failed:\n{body}\n{done.stderr[-3000:]}"
        ran += 1
    assert ran, f"{page.name}: no block ran"


def _command_lines(text: str) -> list[str]:
    """Every `moescope ...` command (`.venv/bin/moescope ...` too) of a page's bash and plain blocks, continuation
    lines joined, comments dropped."""
    found = []
    for m in FENCE.finditer(text):
        if m["lang"] not in ("bash", ""):
            continue
        for line in m["body"].replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                command = re.sub(r"^\S*/moescope ", "moescope ", part)
                if command.startswith("moescope "):
                    found.append(command)
    return found


DOC_PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(page):
    """Pages that are not run (the benchmarks, the reference) still show commands the CLI accepts as written."""
    import shlex

    from moescope.cli.main import build_parser

    parser = build_parser()
    subcommands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in _command_lines(page.read_text(encoding="utf-8")):
        words = command.split()
        if "<" in command or "..." in command or words[1] not in subcommands:  # a placeholder, or printed output
            continue
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as stop:
            pytest.fail(f"{page.name}: `{command}` does not parse (exit {stop.code})")
