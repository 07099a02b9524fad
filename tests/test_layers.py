"""Imports run down the pipeline: no module of src/moescope imports a folder listed above its own in
docs/ARCHITECTURE.md ("What each folder may import"), and no two folders import each other."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "moescope"


def layers() -> dict[str, int]:
    """Folder or module name -> its row in the architecture page's list (0 = top)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"## What each folder may import.*?```text\n(.*?)```", text, re.S).group(1)
    rows = {}
    for row, line in enumerate(block.splitlines()):
        names = re.findall(r"([a-z_]+)(?:/|\.py)", line.split("  ")[0])
        rows.update({name: row for name in names})
    return rows


def imports() -> set[tuple[str, str, str]]:
    """(file, its top-level part, the top-level part it imports) for every moescope import, at any depth."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        part = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                bits = name.split(".")
                if bits[0] == "moescope" and len(bits) > 1 and bits[1] != part:
                    found.add((str(path.relative_to(ROOT)), part, bits[1]))
    return found


def test_every_part_of_the_package_has_a_row():
    rows = layers()
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info")}
    assert parts - {"__init__"} <= set(rows), sorted(parts - {"__init__"} - set(rows))


def test_no_import_runs_up():
    rows = layers()
    up = sorted(f"{file} imports moescope.{target}" for file, part, target in imports()
                if target in rows and part in rows and rows[target] < rows[part])
    assert up == []


def test_no_two_parts_import_each_other():
    edges = {(part, target) for _, part, target in imports()}
    cycles = sorted(f"{a} <-> {b}" for a, b in itertools.combinations(sorted({p for e in edges for p in e}), 2)
                    if (a, b) in edges and (b, a) in edges)
    assert cycles == []
